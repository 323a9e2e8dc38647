"""Cross-entropy of the output head over row blocks, without the full (positions x vocab) fp32 logits.

Why: with a frozen head (LoRA, freeze-tuning) the plain path materialises the logits in fp32 for the
loss and a gradient of the same size, and spends ~16% of a packed LoRA step in those memory-bound passes
(bench/README.md, dense step profile). Here each block of rows gets its logits, log-sum-exp, loss and
the gradient with respect to the hidden states at once, in the forward (the loss is the last op, so its
gradient is known up to the incoming scale); only a (rows x hidden) gradient is kept for the backward.
Same value as F.cross_entropy over the full logits, to float rounding (tests/model/test_head_loss.py).

Used only where that is exact and safe: grad enabled, the head a bias-free nn.Linear whose weight is
frozen and not partitioned (ZeRO-3 gathers weights through module hooks, which this bypasses), hidden
states in the weight's dtype, bf16 or fp32, no autocast. fp16 keeps the plain path: there the loss scale
must multiply the logit gradient before its cast to fp16, or small probabilities underflow.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CHUNK_ROWS = 128  # fastest on the benchmark's CPU among 64-1024; 128 x 50257 fp32 logits = 26 MB


def fused_applies(head: nn.Module, hidden: torch.Tensor) -> bool:
    weight = getattr(head, "weight", None)
    return (torch.is_grad_enabled() and hidden.requires_grad and type(head) is nn.Linear and head.bias is None
            and weight is not None and not weight.requires_grad and not hasattr(weight, "ds_id")
            and hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float32)
            and not torch.is_autocast_enabled(hidden.device.type))


def head_cross_entropy_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) (N, V) against targets (N,), in fp32."""
    if fused_applies(head, hidden):
        return _ChunkedHeadCrossEntropy.apply(hidden, head.weight, targets)
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], CHUNK_ROWS):
            rows = slice(start, start + CHUNK_ROWS)
            logits = (hidden[rows] @ weight.T).float()  # the same bf16 matmul as head(hidden), then fp32
            target = targets[rows]
            target_logit = logits.gather(1, target[:, None])
            shift = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(shift).exp_()  # in place: one fp32 block, five passes over it in all
            norm = exp.sum(dim=1, keepdim=True)
            total += (norm.log() + shift - target_logit).sum()  # log-sum-exp minus the target's logit
            grad_logits = exp.div_(norm)  # softmax ...
            grad_logits[torch.arange(target.numel(), device=target.device), target] -= 1.0  # ... minus one-hot
            grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden.float() * grad_total).to(grad_hidden.dtype), None, None
