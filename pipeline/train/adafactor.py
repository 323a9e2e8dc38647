"""`optim: adafactor`: transformers' Adafactor as its Trainer builds it, step for step, as the client optimizer
DeepSpeed wraps.

transformers 5.x (trainer_optimizer.py `_get_adafactor`) builds transformers.optimization.Adafactor over the
Trainer's two decay groups with lr = learning_rate, scale_parameter=False and relative_step=False (the schedule
drives the rate) and the class's other defaults: eps (1e-30, 1e-3), clip_threshold 1.0, decay_rate -0.8, beta1 None
(no first moment), warmup_init False. torch.optim.Adafactor is another algorithm (no update clipping, its own
epsilon and decay), so transformers' is re-written here (optimization.py:1057-1294, `Adafactor.step`), one
parameter at a time, in its order of operations, so the result is its to the bit.

One update of a tensor with gradient g (upcast to float32 when bf16 / fp16), step t, lr the scheduled rate:
beta2t = 1 - t^-0.8; u = g^2 + 1e-30; a tensor of 2 or more dimensions keeps the running means of u over its rows
(shape[:-1]) and over its columns (shape[:-2] + shape[-1:]), R = beta2t R + (1 - beta2t) mean(u, -1) and likewise C,
and its update is g / sqrt(R_i / mean(R) x C_j); any other tensor keeps v = beta2t v + (1 - beta2t) u, update
g / sqrt(v). The update is divided by max(1, RMS(update) / clip_threshold) and multiplied by lr; weight decay (the
group's) is p -= p x weight_decay x lr, then p -= update. RMS(p) is kept in the state as transformers keeps it
(used only with scale_parameter).

Rows and columns are transformers' (PEFT's for an adapter): a weight stored transposed here (GPT-2's Conv1D
weights, LoRA's A and B: pipeline.model.adapter's peft_params) is factored as its transpose, through a group flag,
`transposed`, that survives DeepSpeed's swap of the parameters for fp32 master copies (bf16 at ZeRO 0: one master
per tensor, in its shape). Its gradient is made contiguous in transformers' layout first, so the row and column
means and the clipping RMS sum in transformers' order: the same bits. The statistics are float32 whatever the
weights' dtype, and a resume restores them so (Adafactor.load_state_dict). The factoring needs whole
matrices: ZeRO 1-3 hand the optimizer flat slices, so optim adafactor asks for zero_stage 0
(pipeline.recipe.rules.optimizers.optim_fits).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.train.per_param import PerParameterOptimizer

# transformers' Adafactor defaults (optimization.py Adafactor.__init__) and _get_adafactor's two overrides
DEFAULTS = {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None, "weight_decay": 0.0,
            "scale_parameter": False, "relative_step": False, "warmup_init": False}


def transposed_params(model: Any) -> set[int]:
    """ids of the parameters stored as the transpose of transformers' / PEFT's tensor: GPT-2's Conv1D weights in
    full, the adapters' tensors their peft_params flag (LoRA's A and B)."""
    from pipeline.model.adapter import AdapterLinear, family_of_model

    family = family_of_model(model)
    ids = {id(p) for name, p in model.named_parameters() if family.is_conv1d(name)}
    for module in model.modules():
        if isinstance(module, AdapterLinear):
            ids |= {id(p) for p, flipped in module.peft_params().values() if flipped}
    return ids


def split_transposed(groups: list[dict[str, Any]], transposed: set[int]) -> list[dict[str, Any]]:
    """Each group, in order, as its parameters in transformers' layout, then those stored transposed (a group with
    `transposed`: true); empty ones left out."""
    out = []
    for group in groups:
        for flipped in (False, True):
            params = [p for p in group["params"] if (id(p) in transposed) == flipped]
            if params:
                out.append({**group, "params": params, "transposed": flipped})
    return out


def _rms(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.norm(2) / (tensor.numel() ** 0.5)


def _approx_sq_grad(row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """1 / sqrt of the factored second moment (optimization.py `_approx_sq_grad`, fairseq's)."""
    r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    c_factor = col.unsqueeze(-2).rsqrt()
    return torch.mul(r_factor, c_factor)


class Adafactor(PerParameterOptimizer):
    """transformers' Adafactor with scale_parameter and relative_step off (see the module docstring); groups from
    split_transposed over pipeline.train.optim.param_groups."""

    def __init__(self, groups: list[dict[str, Any]], lr: float) -> None:
        super().__init__(groups, {"lr": lr, **DEFAULTS})

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, then each saved statistic put back as it was saved, float32: torch's load_state_dict casts every
        floating-point state tensor to its parameter's dtype (bf16 under pure_bf16), and transformers' step only
        upcasts a loaded bf16 statistic back (`.to(grad)`), rounded. Kept float32, a resumed run steps as the
        uninterrupted one did."""
        super().load_state_dict(state_dict)
        saved = [i for group in state_dict["param_groups"] for i in group["params"]]
        for i, param in zip(saved, (p for group in self.param_groups for p in group["params"])):
            for key, value in state_dict["state"].get(i, {}).items():
                if torch.is_tensor(value) and value.is_floating_point():
                    self.state[param][key] = value.to(device=param.device, copy=True)

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        flip = group.get("transposed", False)
        # transformers' layout in memory too: its row and column means (and the clipping RMS) sum in that order
        grad = param.grad.t().contiguous() if flip else param.grad
        if grad.dtype in {torch.float16, torch.bfloat16}:
            grad = grad.float()
        state = self.state[param]
        shape = grad.shape
        factored = len(shape) >= 2
        if len(state) == 0:
            state["step"] = 0
            if factored:
                state["exp_avg_sq_row"] = torch.zeros(shape[:-1]).to(grad)
                state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:]).to(grad)
            else:
                state["exp_avg_sq"] = torch.zeros_like(grad)
            state["RMS"] = 0
        target = param.t() if flip else param
        p_data_fp32 = target.float() if param.dtype in {torch.float16, torch.bfloat16} else target
        state["step"] += 1
        state["RMS"] = _rms(p_data_fp32)
        lr = group["lr"]  # scale_parameter and relative_step off: _get_lr is the group's rate
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = (grad**2) + group["eps"][0]
        if factored:
            row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=(1.0 - beta2t))
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=(1.0 - beta2t))
            update = _approx_sq_grad(row, col)
            update.mul_(grad)
        else:
            exp_avg_sq = state["exp_avg_sq"]
            exp_avg_sq.mul_(beta2t).add_(update, alpha=(1.0 - beta2t))
            update = exp_avg_sq.rsqrt().mul_(grad)
        update.div_((_rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if group["weight_decay"] != 0:
            p_data_fp32.add_(p_data_fp32, alpha=(-group["weight_decay"] * lr))
        p_data_fp32.add_(-update)
        if param.dtype in {torch.float16, torch.bfloat16}:
            target.copy_(p_data_fp32)
