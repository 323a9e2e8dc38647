"""The client optimizer handed to DeepSpeed: torch AdamW, weight decay only on matrices.

Biases, LayerNorm gains and other 1-D parameters are not decayed (GPT-2 / nanoGPT practice): shrinking a
norm's gain towards 0 is not regularisation. LoRA's A and B are matrices and are decayed. DeepSpeed wraps
this optimizer (fp32 master weights under bf16/fp16, ZeRO partitioning) and steps it.
"""
from __future__ import annotations

from typing import Any, Iterable

from pipeline.recipe.args import TrainArgs


def param_groups(named_params: Iterable[tuple[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters: decayed matrices, undecayed vectors."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: Any, train: TrainArgs) -> Any:
    """AdamW over the trainable parameters, weight decay on matrices only (param_groups)."""
    import torch

    groups = param_groups(model.named_parameters(), train.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                             eps=train.adam_epsilon, weight_decay=train.weight_decay)
