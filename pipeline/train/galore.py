"""LLaMA-Factory's GaLore (`use_galore`, `galore_*`): galore_torch's GaLoreAdamW, step for step, as the client
optimizer DeepSpeed wraps.

LLaMA-Factory 0.9.5 (train/trainer_utils.py `_create_galore_optimizer`) hands galore_torch 1.0's GaLoreAdamW three
groups: the parameters it exempts from decay (names holding "bias", and nn.LayerNorm's: transformers' RMSNorm is no
nn.LayerNorm, so Llama's and Qwen's norm gains decay), the other non-GaLore ones, and the GaLore matrices: every
trainable weight of an nn.Linear whose transformers module name contains one of `galore_target` (`all`: the last
name part of every Linear but the output head `lm_head`), with rank, update_proj_gap, scale and proj_type. One
update of a parameter with gradient g (galore_torch adamw.py, galore_projector.py):

- GaLore matrices only: at the parameter's steps 0, gap, 2 gap, ... (its step count before this update) a new
  orthonormal basis from torch.linalg.svd(g) (fp32, full_matrices=False): the first `rank` right singular vectors
  (rows of Vh) where the projection is on the right, the first `rank` left ones (columns of U) on the left, both for
  `full`. `std` projects the shorter side (right when rows >= cols), `reverse_std` the longer. g becomes the small
  g P^T (right), P^T g (left) or U^T g V^T (full); the moments live in that small shape.
- Adam: m = beta1 m + (1 - beta1) g, v = beta2 v + (1 - beta2) g^2, n = m / (sqrt(v) + eps), with eps added
  before the bias correction, which is folded into the step size lr sqrt(1 - beta2^t) / (1 - beta1^t) (torch's
  AdamW adds eps after it).
- GaLore matrices: n is projected back (n P, P n or U n V) and multiplied by `scale`.
- p -= step size x n; then the decay p += p x (-lr x weight_decay), after the update, on the updated weight (torch's
  AdamW decays before).

galore_torch keeps a GaLoreProjector object in the optimizer state; here the basis is state tensors (`ortho_u`,
the left basis; `ortho_v`, the right one, in the SVD's memory layout: new_basis), so DeepSpeed's checkpoint saves
and restores them with the moments and a resumed run continues with the basis in force. Where galore_torch's `reverse_std` would multiply mismatched shapes
(rank >= the rows of a wide matrix), the side chosen at projection is used for the way back.

A GaLore step needs each matrix's whole gradient for its SVD: at ZeRO stage 0 DeepSpeed hands the client optimizer
the parameters themselves (fp32) or per-parameter fp32 master copies (bf16 / fp16), ZeRO 1-3 flat partitions that
cut matrices apart, so use_galore asks for zero_stage 0 (pipeline.recipe.rules.optimizers.galore_fits), as
use_muon does.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.recipe.args import TrainArgs
from pipeline.model.optimizer_state import NAMES, linear_targets, side
from pipeline.train.per_param import PerParameterOptimizer


def column_major(matrix: torch.Tensor) -> torch.Tensor:
    """A copy of `matrix` laid out column by column (strides (1, rows)), unless it already is."""
    return matrix if matrix.stride(0) == 1 and matrix.stride(1) == matrix.shape[0] else matrix.t().contiguous().t()


def new_basis(grad: torch.Tensor, rank: int, where: str) -> dict[str, torch.Tensor]:
    """The orthonormal basis from the gradient's SVD, as galore_projector.py's get_orthogonal_matrix: torch.linalg.svd
    in fp32 (full_matrices=False, the same call, so the same singular-vector signs), cast back to the gradient's
    dtype; {'ortho_u': U[:, :rank]} on the left, {'ortho_v': Vh[:rank]} on the right, both for 'full'.

    Layout: torch.linalg.svd returns U and Vh column by column (LAPACK's order) and galore_torch multiplies with
    slices of them; the rounding of a matmul depends on its operands' layout, so the basis keeps that order (as a
    copy of the slice: a view would keep the whole U alive), and a basis restored from a checkpoint is put back
    in it (`laid_out`): the same bits as galore_torch, and a resumed run the same as the run it continues."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    basis = {}
    if where in ("left", "full"):
        basis["ortho_u"] = column_major(u[:, :rank].to(grad.dtype))
    if where in ("right", "full"):
        basis["ortho_v"] = column_major(vh[:rank, :].to(grad.dtype))
    return basis


def laid_out(state: dict[str, Any]) -> None:
    """A restored basis (a checkpoint gives it row by row) back in new_basis' column order."""
    for key in ("ortho_u", "ortho_v"):
        if key in state:
            state[key] = column_major(state[key])


def project(grad: torch.Tensor, basis: dict[str, torch.Tensor], where: str) -> torch.Tensor:
    """The gradient in the low-rank space: g V^T (right), U^T g (left), U^T g V^T (full)."""
    if where == "right":
        return torch.matmul(grad, basis["ortho_v"].t())
    if where == "left":
        return torch.matmul(basis["ortho_u"].t(), grad)
    return torch.matmul(basis["ortho_u"].t(), grad) @ basis["ortho_v"].t()


def project_back(low: torch.Tensor, basis: dict[str, torch.Tensor], where: str, scale: float) -> torch.Tensor:
    """A low-rank update back in the weight's shape, times `scale`: n V (right), U n (left), U n V (full)."""
    if where == "right":
        full = torch.matmul(low, basis["ortho_v"])
    elif where == "left":
        full = torch.matmul(basis["ortho_u"], low)
    else:
        full = torch.matmul(basis["ortho_u"], low) @ basis["ortho_v"]
    return full * scale


def hf_linear_modules(model: Any) -> dict[str, Any]:
    """transformers module name -> our module, for the modules that are an nn.Linear in transformers (GPT-2's
    projections are Conv1D there, which LLaMA-Factory's isinstance(module, nn.Linear) leaves out)."""
    from pipeline.model.adapter import family_of_model

    family = family_of_model(model)
    return {family.to_hf(name): module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and not family.is_conv1d(f"{name}.weight")}


def layernorm_params(model: Any) -> set[int]:
    """ids of the parameters of the modules that are an nn.LayerNorm in transformers (GPT-2's ln_*; our LayerNorm
    class), which LLaMA-Factory's _get_decay_parameter_names exempts from decay beside biases."""
    from pipeline.model.gpt import LayerNorm

    return {id(p) for m in model.modules() if isinstance(m, LayerNorm) for p in m.parameters(recurse=False)}


def low_rank_groups(model: Any, target: str, weight_decay: float, learning_rate: float, extras: dict[str, Any],
                    key: str) -> list[dict[str, Any]]:
    """LLaMA-Factory's groups for GaLore and APOLLO (`_create_galore_optimizer`, `_create_apollo_optimizer`), in
    its order, empty ones left out: [not decayed, decayed, projected (decayed, with `extras`)], each marked
    `low_rank` for describe. `key` names the recipe's target key in the message when it selects no matrix (the
    recipe's mistake: LLaMA-Factory would train its AdamW alone, without a word)."""
    from pipeline.errors import UserError

    linears = hf_linear_modules(model)
    targets = linear_targets(list(linears), target)
    chosen = {id(p) for name, module in linears.items() if any(t in name for t in targets)
              for p in module.parameters(recurse=False) if p.requires_grad and p.ndim > 1}
    if not chosen:
        feature = key.split("_")[0]
        raise UserError(f"{key} {target!r} selects no trainable weight of an nn.Linear of this model (module names: "
                        f"{', '.join(sorted(linears)[:6])}, ...; GPT-2's projections are Conv1D, which "
                        f"LLaMA-Factory's {NAMES[feature]} skips): it would project nothing; name Linear modules "
                        f"(q_proj, mlp, ...), or remove use_{feature}")
    exempt = layernorm_params(model)
    groups: list[dict[str, Any]] = [{"params": [], "low_rank": False, "weight_decay": 0.0},
                                    {"params": [], "low_rank": False, "weight_decay": weight_decay},
                                    {"params": [], "low_rank": True, "weight_decay": weight_decay, **extras}]
    for name, param in model.named_parameters():
        if param.requires_grad:
            index = 2 if id(param) in chosen else 0 if "bias" in name or id(param) in exempt else 1
            groups[index]["params"].append(param)
    for group in groups:
        group["lr"] = learning_rate
    return [g for g in groups if g["params"]]


def galore_groups(model: Any, train: TrainArgs) -> list[dict[str, Any]]:
    """The recipe's GaLore groups (low_rank_groups with rank / update_proj_gap / scale / proj_type)."""
    extras = {"rank": train.galore_rank, "update_proj_gap": train.galore_update_interval, "scale": train.galore_scale,
              "proj_type": train.galore_proj_type}
    return low_rank_groups(model, train.galore_target, train.weight_decay, train.learning_rate, extras,
                           "galore_target")


class ProjectedAdamW(PerParameterOptimizer):
    """galore_torch's (and apollo_torch's) AdamW, correct_bias on as LLaMA-Factory builds it: the groups marked
    `low_rank` keep their moments in a projected space (`_project`) and turn the normalised step back into the
    weight's shape (`_restore`), which a subclass defines; the others step by the plain loop (module docstring)."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0, "low_rank": False})

    def _project(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def _restore(self, param: torch.Tensor, low: torch.Tensor, direction: torch.Tensor, state: dict[str, Any],
                 group: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        state = self.state[param]
        state.setdefault("step", 0)
        grad = self._project(param, state, group) if group["low_rank"] else param.grad
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        state["exp_avg"].mul_(beta1).add_(grad, alpha=1.0 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        denom = state["exp_avg_sq"].sqrt().add_(group["eps"])
        step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
        direction = state["exp_avg"] / denom
        if group["low_rank"]:
            direction = self._restore(param, grad, direction, state, group)
        param.add_(direction, alpha=-step_size)
        if group["weight_decay"] > 0.0:
            param.add_(param, alpha=-group["lr"] * group["weight_decay"])


class GaLoreAdamW(ProjectedAdamW):
    """galore_torch's GaLoreAdamW: the basis from the gradient's SVD at the parameter's steps 0, gap, 2 gap, ...;
    the step projected back and times `scale`."""

    def _project(self, param: torch.Tensor, state: dict[str, Any], group: dict[str, Any]) -> torch.Tensor:
        where = side(param.shape, group["proj_type"])
        if "ortho_u" not in state and "ortho_v" not in state or state["step"] % group["update_proj_gap"] == 0:
            state.update(new_basis(param.grad, group["rank"], where))
        laid_out(state)
        return project(param.grad, state, where)

    def _restore(self, param: torch.Tensor, low: torch.Tensor, direction: torch.Tensor, state: dict[str, Any],
                 group: dict[str, Any]) -> torch.Tensor:
        return project_back(direction, state, side(param.shape, group["proj_type"]), group["scale"])
