"""LLaMA-Factory's APOLLO (`use_apollo`, `apollo_*`): apollo_torch 1.0.3's APOLLOAdamW, step for step, as the client
optimizer DeepSpeed wraps.

LLaMA-Factory 0.9.5 (train/trainer_utils.py `_create_apollo_optimizer`) builds GaLore's three groups
(pipeline.train.galore.low_rank_groups) with apollo_torch's optimizer, which shares GaLore's AdamW loop but uses
the low-rank moments only to measure how Adam would rescale the gradient (apollo_torch apollo.py):

- The projection (apollo_torch random_projector.py, or with apollo_proj: svd GaLore's SVD basis): at the
  parameter's steps 0, gap, 2 gap, ... a new random matrix, N(0, 1) / sqrt(rank) from a torch.Generator on the
  gradient's device seeded with the parameter's seed, (rows, rank) on the left or (rank, cols) on the right (std:
  right when rows >= cols); the seed then advances (the last of 15 int64 draws of a CPU generator seeded with it).
  The first seed is the parameter's 1-based position among all the optimizer's parameters; LLaMA-Factory's
  layer-wise APOLLO gives each parameter an optimizer of its own, so there every seed starts at 1.
- Adam on the projected gradient r: m, v, n = m / (sqrt(v) + eps), as GaLore.
- The scaling factor: channel-wise, the norms of n over the projected side divided by those of r (+ 1e-8), one per
  row (rows >= cols) or per column; tensor-wise, one ratio of Frobenius norms.
- The update is the whole gradient times that factor, through Fira's norm-growth limiter (from the second step on,
  its norm may grow by at most 1% a step over the last one kept), times sqrt(apollo_scale); then the step size
  lr sqrt(1 - beta2^t) / (1 - beta1^t) and the decay after the update, as GaLore.

LLaMA-Factory passes apollo_scale_front in the parameter group, where apollo_torch does not read it (scale_front is
its constructor's argument), so the scale is always applied after the limiter there; here too (the key prints a
notice). The seeds and the random bases are optimizer state tensors and integers, saved and restored by DeepSpeed's
checkpoint; ZeRO 0 only, for GaLore's reason (pipeline.recipe.rules).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.recipe.args import TrainArgs
from pipeline.train.galore import ProjectedAdamW, laid_out, low_rank_groups, new_basis, project
from pipeline.model.optimizer_state import side

NEXT_SEED_DRAWS = 15  # random_projector.py's ADV_DEFAULT: the next seed is the last of this many int64 draws
SCALE_EPS = 1e-8  # added to the projected gradient's norms before dividing (apollo.py)
GROWTH = 1.01  # the norm-growth limiter's bound per step (Fira)


def next_seed(seed: int) -> int:
    """random_projector.py's next_seed: the last of 15 int64 draws of a CPU generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (NEXT_SEED_DRAWS,), generator=generator).tolist()[-1]


def random_basis(grad: torch.Tensor, rank: int, where: str, seed: int) -> dict[str, torch.Tensor]:
    """random_projector.py's get_orthogonal_matrix: N(0, 1) / sqrt(rank) in fp32 from a generator on the gradient's
    device (so a CUDA run draws other numbers than a CPU one, as there), cast to the gradient's dtype."""
    rows, cols = grad.shape
    shape = (rows, rank) if where == "left" else (rank, cols)
    generator = torch.Generator(device=grad.device).manual_seed(seed)
    matrix = torch.randn(shape, generator=generator, device=grad.device, dtype=torch.float32) / math.sqrt(rank)
    return {"ortho_u" if where == "left" else "ortho_v": matrix.to(grad.dtype)}


def apollo_groups(model: Any, train: TrainArgs) -> list[dict[str, Any]]:
    """The recipe's APOLLO groups (low_rank_groups with apollo_torch's group keys)."""
    extras = {"rank": train.apollo_rank, "proj": train.apollo_proj, "proj_type": train.apollo_proj_type,
              "update_proj_gap": train.apollo_update_interval, "scale": train.apollo_scale,
              "scale_type": train.apollo_scale_type}
    return low_rank_groups(model, train.apollo_target, train.weight_decay, train.learning_rate, extras,
                           "apollo_target")


class APOLLOAdamW(ProjectedAdamW):
    """apollo_torch's APOLLOAdamW (see the module docstring); `layerwise`: every parameter's first seed is 1, as
    LLaMA-Factory's per-parameter optimizers have it."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float,
                 layerwise: bool = False) -> None:
        super().__init__(groups, lr, betas, eps)
        self.layerwise = layerwise

    def _first_seed(self, param: torch.Tensor) -> int:
        """The parameter's 1-based position among all the optimizer's parameters (apollo.py's params_idx)."""
        if self.layerwise:
            return 1
        params = [p for group in self.param_groups for p in group["params"]]
        return next(k for k, p in enumerate(params, start=1) if p is param)

    def _project(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        where = side(param.shape, group["proj_type"])
        if "ortho_u" not in state and "ortho_v" not in state or state["step"] % group["update_proj_gap"] == 0:
            if group["proj"] == "svd":
                state.update(new_basis(param.grad, group["rank"], where))
            else:
                seed = state["seed"] if "seed" in state else self._first_seed(param)
                state.update(random_basis(param.grad, group["rank"], where, seed))
                state["seed"] = next_seed(seed)
        if group["proj"] == "svd":
            laid_out(state)  # a random matrix is drawn row by row, as a checkpoint restores it
        return project(param.grad, state, where)

    def _restore(self, param: torch.Tensor, low: torch.Tensor, direction: torch.Tensor, state: dict[str, Any],
                 group: dict[str, Any]) -> torch.Tensor:
        if group["scale_type"] == "channel":
            dim = 0 if param.shape[0] < param.shape[1] else 1
            factor = torch.norm(direction, dim=dim) / (torch.norm(low, dim=dim) + SCALE_EPS)
            if dim == 1:
                factor = factor.unsqueeze(1)
        else:
            factor = torch.norm(direction) / (torch.norm(low) + SCALE_EPS)
        update = param.grad * factor
        norm = torch.norm(update)
        if "scaled_grad" in state:  # Fira's limiter: the norm grows by at most GROWTH over the last one kept
            limiter = max(norm / (state["scaled_grad"] + SCALE_EPS), GROWTH) / GROWTH
            update = update / limiter
            state["scaled_grad"] = norm / limiter
        else:
            state["scaled_grad"] = norm
        return update * math.sqrt(group["scale"])
