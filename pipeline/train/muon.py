"""LLaMA-Factory's Muon (`use_muon`): its update, step for step, as the client optimizer DeepSpeed wraps.

LLaMA-Factory 0.9.5 (third_party/muon/muon.py, after Moonlight and Keller Jordan's Muon; train/trainer_utils.py
`_create_muon_optimizer`) trains every trainable 2-D parameter whose transformers name contains neither "embed"
nor "lm_head" with Muon, and everything else with an AdamW of its own, in one optimizer:

- Muon: momentum buffer b = 0.95 b + g; Nesterov g + 0.95 b; 5 Newton-Schulz iterations (quintic, coefficients
  3.4445, -4.7750, 2.0315) in bfloat16 on the wide orientation, after dividing by the Frobenius norm + 1e-7;
  weight decay p *= 1 - lr x weight_decay; p -= lr x 0.2 sqrt(max(rows, cols)) x update (the scale that makes the
  update's RMS match AdamW's, so learning_rate means what it means for AdamW).
- AdamW: adam_beta1, adam_beta2, adam_epsilon, but eps is added to sqrt(v) before the bias correction
  (m / (eps + sqrt(v)) x sqrt(1 - beta2^t) / (1 - beta1^t)), not after it as in torch's AdamW; and the decay
  p *= 1 - lr x weight_decay reaches every parameter, biases and norm gains too (one group, one `wd`).

Neither DeepSpeed's Muon (deepspeed.runtime.zero.muon: momentum as an average, (1 - 0.95) g + 0.95 b, lr scale
sqrt(max(1, rows / cols)), Gram Newton-Schulz in fp16 by default, its Adam's eps after the bias correction, and
under ZeRO the momentum fed before gradient clipping) nor torch.optim.Muon (momentum as an average, eps clamped,
no AdamW half) computes this update, so it is re-implemented here. A Muon step needs each matrix's whole
gradient; at ZeRO stage 0 DeepSpeed hands the client optimizer the parameters themselves (fp32) or per-parameter
fp32 master copies (bf16 / fp16: FP16_UnfusedOptimizer), but ZeRO 1-3 hand it flat partitions that cut matrices
apart, so use_muon asks for zero_stage 0 (pipeline.recipe.rules.optimizers).

Groups carry `muon` (True / False) and the usual `lr` / `weight_decay`, so the LR schedule and a resume's
pipeline.train.checkpoint.apply_changes treat them like the AdamW groups; the state is per parameter
(momentum_buffer; step, moment1, moment2), saved and restored by DeepSpeed's checkpoint like AdamW's.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from pipeline.model.optimizer_state import takes_muon
from pipeline.train.per_param import PerParameterOptimizer

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic's a, b, c (Keller Jordan's, as LLaMA-Factory)
NS_STEPS = 5
NS_EPS = 1e-7  # added to the Frobenius norm before dividing
MOMENTUM = 0.95
NESTEROV = True
RMS_MATCH = 0.2  # lr x 0.2 sqrt(max(rows, cols)): the update's RMS about AdamW's (Moonlight)


def orthogonalize(grad: torch.Tensor, steps: int = NS_STEPS) -> torch.Tensor:
    """The Newton-Schulz approximation of U V^T for grad = U S V^T, in bfloat16 (as LLaMA-Factory runs it)."""
    a, b, c = NS_COEFFICIENTS
    tall = grad.size(0) > grad.size(1)
    x = grad.bfloat16()
    if tall:
        x = x.T
    x = x / (x.norm() + NS_EPS)
    for _ in range(steps):
        gram = x @ x.T
        poly = b * gram + c * gram @ gram
        x = a * x + poly @ x
    return x.T if tall else x


def muon_lr(lr: float, shape: Iterable[int]) -> float:
    """The step size of a Muon matrix: lr x 0.2 sqrt(its larger side)."""
    rows, cols = list(shape)[:2]
    return lr * RMS_MATCH * math.sqrt(max(rows, cols))


def muon_groups(named_params: Iterable[tuple[str, Any]], hf_name: Callable[[str], str], weight_decay: float,
                learning_rate: float | None = None) -> list[dict[str, Any]]:
    """[Muon matrices, AdamW rest] over the trainable parameters, empty ones left out, both decayed (as
    LLaMA-Factory's one group). `hf_name` maps our parameter name to transformers' (the rule reads that name)."""
    groups = [{"params": [], "muon": True, "weight_decay": weight_decay},
              {"params": [], "muon": False, "weight_decay": weight_decay}]
    for name, param in named_params:
        if param.requires_grad:
            ndim = len(getattr(param, "ds_shape", param.shape))
            groups[0 if takes_muon(hf_name(name), ndim) else 1]["params"].append(param)
    if learning_rate is not None:
        for group in groups:
            group["lr"] = learning_rate
    return [g for g in groups if g["params"]]


class MuonAdamW(PerParameterOptimizer):
    """Muon on the groups marked `muon`, LLaMA-Factory's AdamW on the others (see the module docstring)."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(groups, {"lr": lr, "weight_decay": 0.0, "momentum": MOMENTUM, "nesterov": NESTEROV,
                                  "ns_steps": NS_STEPS, "betas": betas, "eps": eps})

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        (self._muon if group["muon"] else self._adamw)(param, group)

    def _muon(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad, state = param.grad, self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(grad)
        buf = state["momentum_buffer"]
        buf.mul_(group["momentum"]).add_(grad)
        direction = grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf
        update = orthogonalize(direction, group["ns_steps"])
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(update, alpha=-muon_lr(group["lr"], param.shape))

    def _adamw(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad, state = param.grad, self.state[param]
        if "step" not in state:
            state["step"] = 0
            state["moment1"] = torch.zeros_like(grad)
            state["moment2"] = torch.zeros_like(grad)
        state["step"] += 1
        beta1, beta2 = group["betas"]
        state["moment1"].lerp_(grad, 1 - beta1)
        state["moment2"].lerp_(grad.square(), 1 - beta2)
        direction = state["moment1"] / (group["eps"] + state["moment2"].sqrt())
        scale = (1 - beta1 ** state["step"]) / (1 - beta2 ** state["step"]) ** 0.5
        param.mul_(1 - group["lr"] * group["weight_decay"])
        param.add_(direction, alpha=-group["lr"] / scale)
