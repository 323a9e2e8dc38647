"""The client optimizer handed to DeepSpeed: torch AdamW, weight decay only on matrices, fused kernel.

Biases, LayerNorm gains and other 1-D parameters are not decayed (GPT-2 / nanoGPT practice): shrinking a
norm's gain towards 0 is not regularisation. LoRA's A and B are matrices and are decayed. DeepSpeed wraps
this optimizer (fp32 master weights under bf16/fp16, ZeRO partitioning) and steps it.

Why fused: torch's default AdamW on a CPU is its per-tensor loop (foreach and fused are defaults on CUDA
only), about ten small ops per trainable tensor per step: 320 for a 4-block LoRA model. Each op is
microseconds of work but opens a parallel region, and on a loaded machine each of those waits for a
descheduled thread: in a profile of a packed LoRA step under load, `sqrt`, `mul_`, `lerp_`, `addcdiv_` of the
optimizer took 20 ms a call (bench/README.md, packing). The fused kernel (torch's `_fused_adamw_`, CPU and
CUDA) is one op for all tensors of a group; its update equals the loop's to float rounding (a few ulp), and
a resumed run continues with the implementation its checkpoint's param groups name, so resume stays exact.
"""
from __future__ import annotations

from typing import Any, Iterable

from pipeline.recipe.args import TrainArgs

FUSED_DEVICES = ("cpu", "cuda")


def param_groups(named_params: Iterable[tuple[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters: decayed matrices, undecayed vectors."""
    decay, no_decay = [], []
    for _, param in named_params:
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def fused_supported(groups: list[dict[str, Any]]) -> bool:
    """torch's fused AdamW takes floating-point tensors on a CPU or CUDA device (not meta, not mixed)."""
    params = [p for g in groups for p in g["params"]]
    return (all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
            and len({p.device.type for p in params}) == 1)


def make_optimizer(model: Any, train: TrainArgs) -> Any:
    """AdamW over the trainable parameters, weight decay on matrices only (param_groups), fused where torch has it."""
    import torch

    groups = param_groups(model.named_parameters(), train.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                             eps=train.adam_epsilon, weight_decay=train.weight_decay,
                             fused=True if fused_supported(groups) else None)
