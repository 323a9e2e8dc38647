"""Causal self-attention by explicit matmuls, in query chunks: the CPU path for sft rows and packing buckets.

Why not SDPA here: on CPU, torch's fused (flash) kernel runs its backward in small per-head tiles that
use the machine poorly; on the lengths sft rows and packing buckets have, its backward took 3-6x its
forward. Measured on the benchmark's idle 2-core machine, forward + backward, bf16 (bench/README.md,
packing, "attention kernel"): this path is 2.1-2.2x faster than SDPA on 64-128 tokens, 1.2-1.5x on
256-512, 1.24x at 1,024 and level at 2,048. DENSE_MAX_LEN stops it at 512, for memory (below) and because
a 1,024 bucket is rare in packed rows of sft data. Queries are taken CHUNK at a time, each
chunk against the keys up to its last query only, so the future keys a causal mask would discard are
mostly never multiplied (at 512 tokens, 62% of the full square instead of 100%).

The costs: memory, each chunk's (n, H, chunk, keys) probabilities are kept for the backward (about
H * L / 2 values a token; at 512 tokens in bf16 no more than the block's other saved activations); and
many small ops, each a parallel region, which lose to SDPA's one region when other processes compete
for the cores (several ranks, each with all cores' threads, on one machine).

Precision is that of transformers' eager attention in the same dtype, within two bf16 ulps of a float64
reference as torch's fused kernel is (tests/model/test_causal_attention.py): q is scaled once and the
matmuls run in the input dtype (bf16 accumulates in fp32 inside each matmul and rounds its output); the
softmax and its backward are exponentiated and summed in fp32 by torch's CPU kernels, whose bf16 results
are stored; key and value gradients are summed over chunks in fp32. The backward is the textbook one:
dV = P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K, dK = dS^T Q (dS scaled). Grouped
key/value heads (GQA) are repeated to the query heads (as SDPA's enable_gqa does) and their gradients summed back.
"""
from __future__ import annotations

import torch

DENSE_MAX_LEN = 512  # longest sequence taken by this path; longer ones go to SDPA (speed and memory, see above)
CHUNK = 128  # queries per chunk: 64-128 were fastest at 256-2,048 tokens on the benchmark's CPU


def dense_applies(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    """Causal self-attention on CPU, no dropout, square and not too long: where this path is faster.

    With or without gradients alike, so that a forward gives the same bits in training and under no_grad
    (a DPO policy forward and its no-grad reference forward of the same weights must agree exactly)."""
    return (q.device.type == "cpu" and dropout_p == 0.0 and q.shape[-2] == k.shape[-2] <= DENSE_MAX_LEN
            and q.dtype in (torch.float32, torch.bfloat16))


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) + causal mask) v for q (n, H, L, D) and k, v (n, H_kv, L, D); H_kv divides H."""
    return _CausalAttention.apply(q, k, v)


def _chunks(length: int) -> list[tuple[int, int]]:
    return [(a, min(a + CHUNK, length)) for a in range(0, length, CHUNK)]


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        n, h, length, d = q.shape
        groups = h // k.shape[1]
        if groups > 1:  # query head i uses key/value head i // groups
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scale = d ** -0.5
        q = (q * scale).contiguous()  # scaled once (as SDPA's math path does), not every chunk's scores
        k, v = k.contiguous(), v.contiguous()
        out = q.new_empty(n, h, length, d)
        probs = []
        for a, b in _chunks(length):  # queries a..b-1 see keys 0..b-1; in the last (b - a) keys, the future
            scores = torch.matmul(q[:, :, a:b], k[:, :, :b].transpose(-1, -2))
            future = torch.ones(b - a, b - a, dtype=torch.bool, device=q.device).triu(1)
            scores[..., a:].masked_fill_(future, float("-inf"))
            probs.append(torch.softmax(scores, dim=-1))  # on CPU bf16 is exponentiated and summed in fp32
            out[:, :, a:b] = torch.matmul(probs[-1], v[:, :, :b])
        ctx.save_for_backward(q, k, v, *probs)
        ctx.groups, ctx.scale = groups, scale
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, *probs = ctx.saved_tensors  # q is scaled
        grad = grad.contiguous()
        n, h, length, d = q.shape
        acc = torch.promote_types(q.dtype, torch.float32)
        grad_q = torch.empty_like(q)
        grad_k = grad_v = None
        # last chunk first: it sees every key, so its key and value gradients start the sums
        for (a, b), p in reversed(list(zip(_chunks(length), probs))):
            g = grad[:, :, a:b]
            dv = torch.matmul(p.transpose(-1, -2), g)
            # dS = P * (dP - rowsum(dP * P)), the rowsum in fp32: autograd's own softmax backward kernel
            ds = torch._softmax_backward_data(torch.matmul(g, v[:, :, :b].transpose(-1, -2)), p, -1, p.dtype)
            grad_q[:, :, a:b] = torch.matmul(ds, k[:, :, :b])
            dk = torch.matmul(ds.transpose(-1, -2), q[:, :, a:b])
            if grad_k is None:
                grad_k, grad_v = dk.to(acc), dv.to(acc)
            else:
                grad_k[:, :, :b] += dk
                grad_v[:, :, :b] += dv
        if ctx.groups > 1:
            grad_k, grad_v = (z.view(n, h // ctx.groups, ctx.groups, length, d).sum(dim=2) for z in (grad_k, grad_v))
        return grad_q.mul_(ctx.scale), grad_k.to(q.dtype), grad_v.to(q.dtype)
