"""Causal self-attention of short sequences by explicit matmuls: the CPU training path for rows and buckets.

Why not SDPA here: on CPU, torch's fused (flash) kernel runs its backward in small per-head tiles that
use a 2-core machine poorly; on the lengths sft rows and packing buckets have (up to a few hundred
tokens) its backward took 3-6x its forward, and the whole fwd+bwd was 2-4x slower than four batched
matmuls and a softmax (bench/README.md, packing: "attention kernel"). The price of matmuls is memory:
the (n, H, L, L) probabilities are kept for the backward, which is why this runs only up to
DENSE_MAX_LEN, where they are no larger than the block's other saved activations (H * L * 2 bytes
a token in bf16, against several hidden-width vectors).

Precision is that of the fused kernel's: scores, softmax and the softmax gradient in fp32; the four
matmuls in the input dtype (bf16 accumulates in fp32 inside the matmul). The backward is the textbook
one: dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dO * O)), dQ = dS K, dK = dS^T Q (each scaled).
Grouped key/value heads (GQA) are handled without repeating K and V: the G query heads of a key/value
head are stacked into one (G * L)-row block that multiplies the same K and V.
"""
from __future__ import annotations

import torch

DENSE_MAX_LEN = 512  # longest sequence taken by explicit matmuls; longer ones go to SDPA (memory, see above)


def dense_applies(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    """Causal self-attention on CPU, no dropout, square and short: where this path is faster.

    With or without gradients alike, so that a forward gives the same bits in training and under no_grad
    (a DPO policy forward and its no-grad reference forward of the same weights must agree exactly)."""
    return (q.device.type == "cpu" and dropout_p == 0.0 and q.shape[-2] == k.shape[-2] <= DENSE_MAX_LEN
            and q.dtype in (torch.float32, torch.bfloat16))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for q (n, H, L, D) and k, v (n, H_kv, L, D); H_kv divides H."""
    return _CausalAttention.apply(q, k, v)


def _causal_mask(length: int, groups: int, device: torch.device) -> torch.Tensor:
    """(groups * L, L) True above the diagonal of each group's (L, L) block: the keys a query may not see."""
    return torch.ones(length, length, dtype=torch.bool, device=device).triu(1).repeat(groups, 1)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, h, length, d = q.shape
        h_kv = k.shape[1]
        groups = h // h_kv
        scale = d ** -0.5
        qg = q.reshape(n, h_kv, groups * length, d)  # head i uses key/value head i // groups (SDPA's enable_gqa)
        scores = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale)
        scores.masked_fill_(_causal_mask(length, groups, q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, v)
        ctx.save_for_backward(qg, k, v, probs, out)
        ctx.scale = scale
        return out.view(n, h, length, d)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        qg, k, v, probs, out = ctx.saved_tensors
        grad = grad_out.reshape(out.shape)
        grad_v = torch.matmul(probs.transpose(-1, -2), grad)
        delta = (grad.float() * out.float()).sum(dim=-1, keepdim=True)  # rowsum(dO * O) = rowsum(dP * P)
        grad_scores = torch.matmul(grad, v.transpose(-1, -2)).float().sub_(delta).mul_(probs.float())
        grad_scores = grad_scores.mul_(ctx.scale).to(qg.dtype)
        grad_q = torch.matmul(grad_scores, k)
        grad_k = torch.matmul(grad_scores.transpose(-1, -2), qg)
        return grad_q.view(grad_out.shape), grad_k, grad_v
