"""The model eval, the benchmarks and chat compute with: the recipe's model with the chosen weights, loaded for
inference in the run's precision.

Which weights is each caller's own question (pipeline.runtime.layout.current_weights for eval and the benchmarks,
chat's --model), as is the device; how a choice becomes a model is one answer here, so that what eval scores is what
chat talks to: the base (weights None), the base + the adapter, or the checkpoint at weights.path
(pipeline.model.build.load_for_inference), with the weights in the dtype the run trained them in
(pipeline.recipe.precision.weights_dtype: bf16 under pure_bf16, an adapter on them fp32, else fp32).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from pipeline.runtime.layout import Weights

if TYPE_CHECKING:
    import torch


def load_weights(r: Mapping[str, Any], weights: Weights | None, device: "str | torch.device | None" = None) -> Any:
    """The recipe's model with `weights` (None: the base model alone), in eval mode on `device` (None: CUDA when there
    is one, else the CPU), its weights in the run's dtype."""
    from pipeline.model.build import load_for_inference
    from pipeline.model.weights import DTYPES
    from pipeline.recipe.args import recipe_args
    from pipeline.recipe.precision import weights_dtype

    chosen = (weights.kind, weights.path) if weights is not None else ("base",)
    return load_for_inference(recipe_args(r).model, *chosen, device=device, dtype=DTYPES[weights_dtype(r)])
