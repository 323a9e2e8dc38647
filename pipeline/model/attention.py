"""Attention over packed rows (neat_packing): one interface, the kernel chosen by device and dtype.

A packed row holds several examples; `segment_ids` (B, T) says which example each token belongs to.
Every token may attend only to earlier tokens of its own segment (block-diagonal causal attention).

Which path runs where:
- CUDA, bf16/fp16, no attention dropout in training, torch with torch.nn.attention.varlen: the
  variable-length FlashAttention kernel (`varlen_attn`): the row is cut into its segments
  (cumulative lengths) and each is attended causally on its own; no T x T mask exists, and the work is
  that of the segments, not of the whole row.
- Everywhere else (CPU; fp32; attention dropout; older torch): torch's scaled_dot_product_attention
  with a (B, 1, T, T) boolean mask, causal AND same segment.

The model builds a `packed_attention(...)` spec once per forward and passes it to every layer as its
mask; `attend` dispatches. Both paths compute the same function (tests/model/test_packed_attention.py
checks the varlen glue on CPU against per-segment SDPA with a stand-in kernel).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class Varlen(NamedTuple):
    """Segments of the flattened (B*T) tokens: boundaries (int32, n + 1) and the longest segment."""

    cu_seqlens: torch.Tensor
    max_len: int


def _varlen_kernel():
    """torch's varlen FlashAttention entry point, or None where torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def use_varlen(device: torch.device, dtype: torch.dtype, dropout_p: float) -> bool:
    return (device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0
            and _varlen_kernel() is not None)


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean mask (True = may attend): causal and within the same segment.

    Padding at the end of a packed row gets its own segment id, so its rows are never empty (a query
    always sees itself) and no real token sees it.
    """
    t = segment_ids.shape[1]
    pos = torch.arange(t, device=segment_ids.device)
    causal = (pos.view(1, t) <= pos.view(t, 1)).view(1, 1, t, t)
    same = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    return causal & same.unsqueeze(1)


def segment_bounds(segment_ids: torch.Tensor) -> Varlen:
    """Cumulative segment lengths over the flattened rows: a segment is a run of equal ids within a row."""
    b, t = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = torch.flatten(torch.nonzero(starts.flatten()))
    cu = torch.cat([first, torch.tensor([b * t], device=first.device)]).to(torch.int32)
    return Varlen(cu, int((cu[1:] - cu[:-1]).max()))  # one host sync per forward, shared by the layers


def packed_attention(segment_ids: torch.Tensor, dtype: torch.dtype, dropout_p: float) -> torch.Tensor | Varlen:
    """The per-forward attention spec for packed rows: varlen boundaries where that kernel runs, else the mask."""
    if use_varlen(segment_ids.device, dtype, dropout_p):
        return segment_bounds(segment_ids)
    return segment_mask(segment_ids)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | Varlen | None, *,
           is_causal: bool, dropout_p: float) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H_kv, T, D) -> (B, H, T, D); H_kv divides H (GQA / MQA);
    `mask` None, a boolean mask, or Varlen segments."""
    if isinstance(mask, Varlen):
        b, h, t, d = q.shape
        flat = [z.transpose(1, 2).reshape(b * t, z.shape[1], d) for z in (q, k, v)]  # (B*T, H, D)
        y = _varlen_kernel()(*flat, mask.cu_seqlens, mask.cu_seqlens, mask.max_len, mask.max_len,
                             window_size=(-1, 0), enable_gqa=flat[1].shape[1] != h)
        return y.view(b, t, h, d).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                          enable_gqa=k.shape[1] != q.shape[1])  # grouped key/value heads (GQA)
