"""Attention over packed rows (neat_packing): one interface, the kernel chosen by device and dtype.

A packed row holds several examples; `segment_ids` (B, T) says which example each token belongs to.
Every token may attend only to earlier tokens of its own segment (block-diagonal causal attention).

Which path runs where:
- CUDA, bf16/fp16, no attention dropout in training, torch with torch.nn.attention.varlen: the
  variable-length FlashAttention kernel (`varlen_attn`): the row is cut into its segments
  (cumulative lengths) and each is attended causally on its own; no T x T mask exists, and the work is
  that of the segments, not of the whole row. Run on an H200 with torch 2.11 (tests/gpu/).
- Everywhere else (CPU; fp32; attention dropout; older torch): length buckets (`Buckets`). The rows'
  segments are sorted by length and cut into a few buckets; each bucket is gathered into an (n, L) block
  of segments padded at the end to the bucket's longest, attended by causal SDPA (`is_causal`), and the
  outputs are gathered back into row order. Padding sits after a segment's real tokens, so under
  causality no real query sees it, and its outputs are dropped (their gradients are exact zeros). Why not
  one (B, 1, T, T) mask: with a mask SDPA computes every query of a row against every key, T^2 pairs per
  row; the buckets need sum(L_j^2) over their segments, 2.5x fewer pairs on the benchmark's Alpaca-like rows
  of 512 and 7x fewer on book-like ones. Measured: 1.1-1.6x less attention CPU time (the CPU kernel is
  less efficient on short blocks), 2-16% less CPU time per packed step (bench/README.md, packing).

Sliding windows (ModelConfig.layer_windows: a query at position i sees the keys i - window < j <= i, transformers'
sliding_window_overlay): `windowed` gives each window its own spec, once per forward. A window binds only where a
sequence is longer than it; below that the spec is returned as it is (is_causal, the buckets' causal kernel: no cost
for the common case). Where it binds: a boolean band mask ANDed into the dense mask (SDPA with a mask); the buckets
path gives a bucket longer than the window the band as a mask (SDPA); the varlen kernel takes window_size
(window - 1, 0) (flash's inclusive left bound), in the signatures that have window_size; a torch whose varlen_attn has
none runs the packed rows longer than a window on the buckets path.

Softcapped scores (Gemma 2's attn_logit_softcapping: cap x tanh(scores / cap)) are no kernel's: `softcapped_attention`
computes them explicitly (transformers' eager path, the only one it runs for Gemma 2), packed rows through
`segment_mask`.

`segment_mask` (causal AND same segment, (B, 1, T, T) boolean; AND the band with a window) stays as the reference
that both paths are tested against. The model builds a `packed_attention(...)` spec once per forward and passes it to
every layer as its mask; `attend` dispatches. All paths compute the same function
(tests/model/test_packed_attention.py: the bucket path against the mask path and against each example run
alone, GPT-2 and the RoPE families; the varlen glue on CPU against per-segment SDPA, with stand-ins of all three
`varlen_attn` signatures; tests/gpu/test_packed_attention_cuda.py: the real kernel on a GPU against each
example run alone).
"""
from __future__ import annotations

import inspect
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.model import causal_attention as dense


class Varlen(NamedTuple):
    """Segments of the flattened (B*T) tokens: boundaries (int32, n + 1) and the longest segment; the sliding window
    of the layers it is for (None: causal over the whole segment)."""

    cu_seqlens: torch.Tensor
    max_len: int
    window: int | None = None


class Buckets(NamedTuple):
    """Segments of the flattened (B*T) tokens regrouped by length for per-segment causal SDPA.

    gather: (S,) indices into the B*T tokens, bucket after bucket; bucket j is n_j segments each padded at
    the end to L_j by repeating its last token (shapes[j] = (n_j, L_j), S = sum of n_j * L_j). back: (B*T,)
    the slot in `gather` of each token's own (unpadded) occurrence. window: the sliding window of the layers it is for
    (None: causal over the whole segment).
    """

    gather: torch.Tensor
    shapes: tuple[tuple[int, int], ...]
    back: torch.Tensor
    window: int | None = None


BUCKET_GRAIN = 16  # lengths are grouped in steps of this many tokens before the buckets are chosen
BUCKET_CALL_COST = 128 * 128  # a bucket's fixed cost (an SDPA call, its gathers) in units of one query-key pair


def _varlen_kernel():
    """torch's varlen FlashAttention entry point, or None where torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Varlen) -> torch.Tensor:
    """Causal varlen attention over (N, H, D) tokens, whichever `varlen_attn` signature this torch has.

    Why ask the signature: torch has shipped three. The first takes `is_causal`; torch 2.11 (seen on an H200
    with 2.11.0+cu130) takes `window_size` ((-1, 0) = causal) but no grouped heads; later ones add
    `enable_gqa`. The machine a user brings pins its own torch. Without `enable_gqa`, each key/value head is
    repeated for its group of query heads (what grouped-query attention means). A sliding window is window_size
    (window - 1, 0): flash's bounds are inclusive, (4, 0) is four keys before the query and the query itself, as
    transformers' flash path passes (sliding_window - 1, ...); use_varlen sends a windowed model here only where
    the signature has window_size."""
    kernel = _varlen_kernel()
    params = inspect.signature(kernel).parameters
    bounds = (mask.cu_seqlens, mask.cu_seqlens, mask.max_len, mask.max_len)
    left = -1 if mask.window is None else mask.window - 1
    options: dict[str, object] = {"window_size": (left, 0)} if "window_size" in params else {"is_causal": True}
    if k.shape[1] != q.shape[1]:
        if "enable_gqa" in params:
            options["enable_gqa"] = True
        else:
            k, v = (z.repeat_interleave(q.shape[1] // z.shape[1], dim=1) for z in (k, v))
    return kernel(q, k, v, *bounds, **options)


def varlen_device(device: torch.device, dtype: torch.dtype, dropout_p: float) -> bool:
    """Where the varlen FlashAttention kernel may run: CUDA, half precision, no attention dropout."""
    return device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0


def use_varlen(device: torch.device, dtype: torch.dtype, dropout_p: float, has_window: bool = False) -> bool:
    """Whether packed rows take the varlen kernel; `has_window` (some layer's sliding window binds) also needs a
    `varlen_attn` that takes window_size (the first signature has only is_causal)."""
    kernel = _varlen_kernel()
    return (varlen_device(device, dtype, dropout_p) and kernel is not None
            and (not has_window or "window_size" in inspect.signature(kernel).parameters))


def band_mask(t: int, total: int, window: int, device: torch.device) -> torch.Tensor:
    """(1, 1, t, total) boolean: the last t of `total` positions as queries, each seeing the keys
    q - window < k <= q (transformers' sliding_window_overlay AND causal_mask_function)."""
    q = torch.arange(total - t, total, device=device).view(t, 1)
    k = torch.arange(total, device=device).view(1, total)
    return ((k <= q) & (k > q - window)).view(1, 1, t, total)


Spec = torch.Tensor | Varlen | Buckets | None  # what a layer's attention gets as its mask (see `attend`)


def binds(window: int | None, total: int) -> bool:
    """Whether a sliding window changes anything for sequences of `total` positions: only past its length."""
    return window is not None and total > window


def windowed(spec: Spec, window: int | None, t: int, total: int, device: torch.device) -> Spec:
    """The attention spec of the layers with this sliding window, from the forward's (t queries, the last of `total`
    positions; packed rows: t = total = the row). Unchanged where no sequence is longer than the window, so that
    the causal paths run as without one; else the band ANDed into a dense mask (None: the causal band alone), or
    the window carried by the packed spec."""
    if not binds(window, total):
        return spec
    if isinstance(spec, (Varlen, Buckets)):
        return spec._replace(window=window)
    band = band_mask(t, total, window, device)
    return band if spec is None else spec & band


def segment_mask(segment_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """(B, 1, T, T) boolean mask (True = may attend): causal and within the same segment, and within `window`.

    Padding at the end of a packed row gets its own segment id, so its rows are never empty (a query
    always sees itself) and no real token sees it.
    """
    t = segment_ids.shape[1]
    causal = band_mask(t, t, window or t, segment_ids.device)
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


def choose_buckets(lengths: np.ndarray) -> list[np.ndarray]:
    """Segments (by index into `lengths`) cut into buckets of similar length, longest first.

    The cost of a bucket of n segments padded to L is n * L * L query-key pairs (what the causal kernel
    touches, twice the causal half: its blocks straddle the diagonal) plus BUCKET_CALL_COST; lengths are
    grouped by BUCKET_GRAIN and the grouping that minimises the total is found by dynamic programming over
    the groups sorted by length (at most T / BUCKET_GRAIN groups, so this is cheap once per forward)."""
    order = np.argsort(-lengths, kind="stable")
    keys = -(-lengths[order] // BUCKET_GRAIN)
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])  # first segment of each group, in `order`
    bounds = np.r_[starts, len(order)]
    g = len(starts)
    best = np.full(g + 1, np.inf)
    best[g] = 0.0
    cut = np.zeros(g, dtype=np.int64)
    for i in range(g - 1, -1, -1):  # best[i]: groups i.. bucketed; a bucket spans groups i..e-1, padded to group i
        longest = float(lengths[order[bounds[i]]])
        for e in range(i + 1, g + 1):
            cost = (bounds[e] - bounds[i]) * longest * longest + BUCKET_CALL_COST + best[e]
            if cost < best[i]:
                best[i], cut[i] = cost, e
    buckets, i = [], 0
    while i < g:
        buckets.append(order[bounds[i]:bounds[cut[i]]])
        i = cut[i]
    return buckets


def segment_buckets(segment_ids: torch.Tensor) -> Buckets:
    """The Buckets of packed rows: a segment is a run of equal ids within a row (padding included, as its own
    segment, so that every token has an output as in the mask path)."""
    b, t = segment_ids.shape
    ids = segment_ids.detach().cpu().numpy()
    starts = np.ones((b, t), dtype=bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    first = np.flatnonzero(starts.ravel())
    lengths = np.diff(np.r_[first, b * t])
    gather, shapes, back = [], [], np.empty(b * t, dtype=np.int64)
    offset = 0
    for members in choose_buckets(lengths):
        n, longest = len(members), int(lengths[members[0]])
        steps = np.minimum(np.arange(longest)[None, :], lengths[members][:, None] - 1)  # (n, L): pad = last token
        gather.append((first[members][:, None] + steps).ravel())
        shapes.append((n, longest))
        for row, (start, length) in enumerate(zip(first[members], lengths[members])):
            back[start:start + length] = offset + row * longest + np.arange(length)
        offset += n * longest
    device = segment_ids.device
    return Buckets(torch.from_numpy(np.concatenate(gather)).to(device), tuple(shapes), torch.from_numpy(back).to(device))


def packed_attention(segment_ids: torch.Tensor, dtype: torch.dtype, dropout_p: float,
                     has_window: bool = False) -> Buckets | Varlen:
    """The per-forward attention spec for packed rows: varlen boundaries where that kernel runs, else Buckets;
    `has_window`: some layer's sliding window binds on these rows (the function `windowed` then sets it per layer);
    a window no row is longer than leaves the kernel choice as without one."""
    if use_varlen(segment_ids.device, dtype, dropout_p, has_window):
        return segment_bounds(segment_ids)
    return segment_buckets(segment_ids)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Spec, *,
           is_causal: bool, dropout_p: float, softcap: float | None = None,
           scale: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of q (B, H, T, D) over k, v (B, H_kv, T, D) -> (B, H, T, D); H_kv divides H (GQA / MQA);
    `mask` None, a boolean mask, Varlen segments or Buckets of segments (a window in the last two: `windowed`).
    softcap (Gemma 2's attn_logit_softcapping) or sinks (GPT-OSS's logit per head, (H,)): the explicit path,
    softcapped_attention (no kernel caps scores or takes a sink), whose scores are multiplied by `scale` (None:
    head_dim ** -0.5, the kernels' own, which q arrives prescaled for)."""
    if softcap is not None or sinks is not None:
        return softcapped_attention(q, k, v, mask, is_causal=is_causal, dropout_p=dropout_p, softcap=softcap,
                                    scale=q.shape[-1] ** -0.5 if scale is None else scale, sinks=sinks)
    if isinstance(mask, Buckets):
        return _attend_buckets(q, k, v, mask, dropout_p)
    if isinstance(mask, Varlen):
        b, h, t, d = q.shape
        flat = [z.transpose(1, 2).reshape(b * t, z.shape[1], d) for z in (q, k, v)]  # (B*T, H, D)
        y = _varlen(*flat, mask)
        return y.view(b, t, h, d).transpose(1, 2)
    if mask is None and is_causal:
        return _causal(q, k, v, dropout_p)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout_p,
                                          enable_gqa=k.shape[1] != q.shape[1])  # grouped key/value heads (GQA)


def _causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Causal self-attention: explicit matmuls where they are faster (short sequences on CPU), else SDPA."""
    if dense.dense_applies(q, k, dropout_p):
        return dense.causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p,
                                          enable_gqa=k.shape[1] != q.shape[1])


class _ToSlots(torch.autograd.Function):
    """tokens (B*T, ...) -> bucket slots (S, ...) by `gather`; the backward reads each token's gradient from its
    own slot (`back`). The padding slots repeat a segment's last token but feed only padding queries, whose
    outputs are dropped, so their gradient is zero: reading it instead of summing it (index_select's own
    backward, a scatter-add that was slower than the attention itself on CPU) is exact."""

    @staticmethod
    def forward(ctx, tokens: torch.Tensor, gather: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(back)
        return tokens.index_select(0, gather)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (back,) = ctx.saved_tensors
        return grad.index_select(0, back), None, None


class _ToTokens(torch.autograd.Function):
    """bucket slots (S, ...) -> tokens (B*T, ...) by `back` (one slot per token): the backward puts each token's
    gradient in its slot, zero in the padding slots (index_copy_, no scatter-add: the slots are distinct)."""

    @staticmethod
    def forward(ctx, slots: torch.Tensor, back: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(back)
        ctx.slots = slots.shape[0]
        return slots.index_select(0, back)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (back,) = ctx.saved_tensors
        return grad.new_zeros((ctx.slots, *grad.shape[1:])).index_copy_(0, back, grad), None


def _attend_buckets(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buckets: Buckets,
                    dropout_p: float) -> torch.Tensor:
    """Causal attention per bucket of segments, between one gather into the buckets and one back into row order; a
    bucket longer than the sliding window gets the band as a mask (its padding, after each segment's real tokens,
    stays unseen by them as under causality)."""
    b, h, t, d = q.shape
    slots = [_ToSlots.apply(z.transpose(1, 2).reshape(b * t, z.shape[1], d), buckets.gather, buckets.back)
             for z in (q, k, v)]  # (S, heads, D) each
    sizes = [n * length for n, length in buckets.shapes]
    outs = []
    # split, not slicing: a slice's backward fills a zero tensor of all S slots per bucket, split's is one cat
    for (n, length), *qkv in zip(buckets.shapes, *(z.split(sizes) for z in slots)):
        qb, kb, vb = (z.view(n, length, z.shape[1], d).transpose(1, 2) for z in qkv)
        band = windowed(None, buckets.window, length, length, q.device)
        y = _causal(qb, kb, vb, dropout_p) if band is None else attend(qb, kb, vb, band, is_causal=False,
                                                                      dropout_p=dropout_p)
        outs.append(y.transpose(1, 2).reshape(n * length, h, d))
    y = _ToTokens.apply(outs[0] if len(outs) == 1 else torch.cat(outs), buckets.back)
    return y.view(b, t, h, d).transpose(1, 2)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Spec, *, is_causal: bool,
                         dropout_p: float, softcap: float | None, scale: float,
                         sinks: torch.Tensor | None = None) -> torch.Tensor:
    """transformers' eager_attention_forward with softcap (models/gemma2/modeling_gemma2.py:181-206, 5.24), the one
    path Gemma 2 runs there too (_supports_sdpa False): scores q k^T * scale (query_pre_attn_scalar ** -0.5: one
    multiply, q is not prescaled as for the kernels), then softcap * tanh(scores / softcap), the mask, softmax in fp32 cast back, dropout, @ v.
    `mask` is None (causal when is_causal, else every key) or boolean: packed rows reach it as segment_mask
    (GPTModel.forward), never as Buckets / Varlen.

    sinks (GPT-OSS, one logit per head): a column of each head's sink beside the masked scores, the softmax over both,
    the sink's column dropped (GptOss's eager_attention_forward, modeling_gpt_oss.py:227-255; transformers runs no
    SDPA for it, _supports_sdpa False). Why not SDPA with an extra all-zero key whose score the sink is, through a
    float mask: the mask is then a (B, H, T, T + 1) tensor as large as these scores, and the sink's gradient would
    have to flow through SDPA's attn_mask, which its fused kernels do not all give; this path is exact and simple,
    at the explicit path's memory (T x T scores per head)."""
    if isinstance(mask, (Buckets, Varlen)):
        raise ValueError("softcapped attention takes a boolean mask: packed rows need segment_mask")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is None and is_causal:
        mask = band_mask(q.shape[-2], k.shape[-2], k.shape[-2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        probs = F.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
        return torch.matmul(F.dropout(probs.to(q.dtype), p=dropout_p), v)
    probs = F.dropout(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), p=dropout_p)
    return torch.matmul(probs, v)
