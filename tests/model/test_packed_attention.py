"""segment_ids (block-diagonal causal attention, restarting positions) and per-block activation checkpointing.

The property neat_packing relies on: every example packed into a row computes exactly what it computes
alone, so its loss and its gradient equal the unpacked run's (fp32, to rounding). The reference is the
same model run on each example by itself, unpadded; nothing of the packed path is used to compute it.
"""
from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from pipeline.model import attention, causal_attention
from pipeline.model.config import PRESETS
from pipeline.model.gpt import GPTModel, segment_mask

VARLEN = attention._varlen
LENGTHS = (5, 9, 3)  # three examples; the packed row is 17 real tokens + 3 padding
ROW = 20


def _examples(vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(0, vocab, (n,), generator=g)
        labels = torch.randint(0, vocab, (n,), generator=g)
        labels[: n // 3] = -100  # a prompt part, as in sft
        out.append((ids, labels))
    return out


def _pack(examples, pad_id: int = 50256):
    """One row: examples back to back, then padding with its own segment; positions restart per segment."""
    ids = torch.full((1, ROW), pad_id)
    labels = torch.full((1, ROW), -100)
    seg = torch.full((1, ROW), len(examples))
    pos = torch.zeros((1, ROW), dtype=torch.long)
    at = 0
    for k, (x, y) in enumerate(examples):
        n = len(x)
        ids[0, at:at + n], labels[0, at:at + n], seg[0, at:at + n] = x, y, k
        pos[0, at:at + n] = torch.arange(n)
        at += n
    pos[0, at:] = torch.arange(ROW - at)
    return ids, labels, seg, pos


def _grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def packed_equals_unpacked(model, vocab: int) -> None:
    """Per example: logits, summed loss and gradient of the packed row equal the example run alone.

    Shared by every decoder family (called with a GPT-2 here; RoPE families pass their own model)."""
    examples = _examples(vocab)
    ids, labels, seg, pos = _pack(examples, vocab - 1)
    logits = model(ids, segment_ids=seg, position_ids=pos)
    at = 0
    for k, (x, y) in enumerate(examples):
        n = len(x)
        alone = model(x[None])
        assert torch.allclose(logits[0, at:at + n], alone[0], atol=1e-5, rtol=0), f"logits of example {k}"
        loss_alone, count = model(x[None], labels=y[None], reduction="sum")
        loss_alone.backward()
        want = _grads(model)
        only_k = torch.where(seg == k, labels, torch.full_like(labels, -100))  # the loss of example k only
        loss_packed, count_packed = model(ids, labels=only_k, segment_ids=seg, position_ids=pos, reduction="sum")
        assert count_packed == count
        assert torch.allclose(loss_packed, loss_alone, atol=1e-5, rtol=1e-6), f"loss of example {k}"
        loss_packed.backward()
        got = _grads(model)
        assert got.keys() == want.keys()
        for name in want:
            assert torch.allclose(got[name], want[name], atol=1e-6, rtol=1e-5), f"gradient {name}, example {k}"
        at += n


@pytest.mark.parametrize("kernel", ["matmuls", "sdpa"])
def test_gpt2_packed_examples_equal_unpacked_loss_logits_and_gradients(monkeypatch, kernel):
    """Both kernels behind the buckets: explicit matmuls (short buckets on CPU) and SDPA (long ones)."""
    if kernel == "sdpa":
        monkeypatch.setattr(causal_attention, "DENSE_MAX_LEN", 0)
    cfg = PRESETS["tiny"].replace(context_length=32, drop_rate=0.0)
    model = GPTModel(cfg, seed=4).train()
    packed_equals_unpacked(model, cfg.vocab_size)


def _per_segment(q, k, v, cu_q, cu_k, max_q, *, grouped: bool, left: int = -1):
    """Causal SDPA on each segment alone: the documented contract of torch's CUDA varlen kernel; `left` >= 0:
    window_size (left, 0), inclusive bounds: query i sees the keys i - left <= j <= i (the reference mask of
    torch's own test/test_varlen_attention.py, forward_sdpa: keys from i - window_size[0] to i + window_size[1])."""
    assert torch.equal(cu_q, cu_k) and cu_q.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        seg = [z[a:b].transpose(0, 1)[None] for z in (q, k, v)]  # (1, H, L, D)
        i = torch.arange(b - a)
        allowed = (i[None, :] <= i[:, None]) & ((i[:, None] - i[None, :] <= left) | (left < 0))
        out[a:b] = F.scaled_dot_product_attention(*seg, attn_mask=allowed, enable_gqa=grouped)[0].transpose(0, 1)
    return out


def _varlen_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                enable_gqa=False):
    """A stand-in for the latest `varlen_attn` signature: window (-1, 0) = causal, (left, 0) a sliding window,
    grouped heads allowed."""
    assert window_size[1] == 0 and enable_gqa == (k.shape[1] != q.shape[1])
    return _per_segment(q, k, v, cu_q, cu_k, max_q, grouped=enable_gqa, left=window_size[0])


def _varlen_window(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    """A stand-in for torch 2.11's `varlen_attn`: `window_size`, and as many key/value heads as query heads."""
    assert window_size[1] == 0 and k.shape[1] == q.shape[1] == v.shape[1]
    return _per_segment(q, k, v, cu_q, cu_k, max_q, grouped=False, left=window_size[0])


def _varlen_is_causal(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
    """A stand-in for the first `varlen_attn` signature: `is_causal`, and as many key/value heads as queries."""
    assert is_causal and k.shape[1] == q.shape[1] == v.shape[1]
    return _per_segment(q, k, v, cu_q, cu_k, max_q, grouped=False)


@pytest.mark.parametrize("kernel", [_varlen_gqa, _varlen_window, _varlen_is_causal],
                         ids=["enable_gqa", "window_size", "is_causal"])
@pytest.mark.parametrize("preset", ["tiny", "qwen3-0.6b"])
def test_varlen_path_glue_gives_the_same_results(monkeypatch, kernel, preset):
    """The CUDA path's reshaping, segment boundaries and grouped heads, run on CPU with a per-segment reference
    kernel in each of the three signatures torch has shipped."""
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: kernel)
    monkeypatch.setattr(attention, "varlen_device", lambda device, dtype, p: True)
    cfg = _tiny(preset).replace(context_length=32)
    packed_equals_unpacked(GPTModel(cfg, seed=4).train(), cfg.vocab_size)


@pytest.mark.parametrize("kernel", [_varlen_gqa, _varlen_window, _varlen_is_causal],
                         ids=["enable_gqa", "window_size", "is_causal"])
def test_sliding_window_packed_examples_equal_unpacked(monkeypatch, kernel):
    """A 4-position window in layer 0, none in layer 1, examples of 5 and 9 tokens: each example in a packed row
    computes what it computes alone (its own band: pipeline.model.attention.windowed), through the varlen glue,
    whose stand-ins honour flash's inclusive window_size (left, 0), and where the kernel has no window_size (the
    first signature) through the buckets, its kernel never called."""
    calls = []
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: kernel)
    monkeypatch.setattr(attention, "varlen_device", lambda device, dtype, p: True)
    monkeypatch.setattr(attention, "_varlen", lambda *a: (calls.append(1), VARLEN(*a))[1])
    cfg = _tiny("qwen3-0.6b").replace(vocab_size=256, context_length=32, layer_windows=(4, None))
    packed_equals_unpacked(GPTModel(cfg, seed=4).train(), cfg.vocab_size)
    assert bool(calls) == (kernel is not _varlen_is_causal)


def test_a_window_longer_than_the_row_keeps_the_varlen_kernel_without_window_size(monkeypatch):
    """Mistral v0.1's 4,096-position window with rows of cutoff_len 2,048 never binds (windowed leaves the spec as
    it is), so a torch whose varlen_attn has only is_causal keeps that kernel for such rows, as for a model without
    a window: here a 32-position window and a row of 20."""
    calls = []
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: _varlen_is_causal)
    monkeypatch.setattr(attention, "varlen_device", lambda device, dtype, p: True)
    monkeypatch.setattr(attention, "_varlen", lambda *a: (calls.append(1), VARLEN(*a))[1])
    cfg = _tiny("qwen3-0.6b").replace(vocab_size=256, context_length=32, layer_windows=(32, None))
    ids, _, seg, pos = _pack(_examples(cfg.vocab_size), cfg.vocab_size - 1)
    with torch.no_grad():
        GPTModel(cfg, seed=4).eval()(ids, segment_ids=seg, position_ids=pos)
    assert len(calls) == 2  # both layers


def test_segment_bounds_cut_rows_and_segments():
    seg = torch.tensor([[0, 0, 1, 1, 1, 9], [0, 1, 1, 1, 1, 1]])
    bounds = attention.segment_bounds(seg)
    assert bounds.cu_seqlens.tolist() == [0, 2, 5, 6, 7, 12] and bounds.max_len == 5


def test_path_choice(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not attention.use_varlen(cpu, torch.bfloat16, 0.0)
    assert not attention.use_varlen(cuda, torch.float32, 0.0)
    assert not attention.use_varlen(cuda, torch.bfloat16, 0.1)
    assert attention.use_varlen(cuda, torch.bfloat16, 0.0) == (attention._varlen_kernel() is not None)
    for kernel, takes_window in ((_varlen_gqa, True), (_varlen_window, True), (_varlen_is_causal, False)):
        monkeypatch.setattr(attention, "_varlen_kernel", lambda: kernel)
        assert attention.use_varlen(cuda, torch.bfloat16, 0.0)
        assert attention.use_varlen(cuda, torch.bfloat16, 0.0, has_window=True) == takes_window  # a window needs window_size


def test_windowed_band_is_transformers_sliding_window_overlay():
    """windowed's band: a query at i sees i - window < j <= i (transformers masking_utils.sliding_window_overlay
    `kv_idx > q_idx - sliding_window` AND causal_mask_function `kv_idx <= q_idx`), written out for window 3; the last
    queries of a cache; unchanged where no sequence is longer than the window."""
    want = torch.tensor([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [1, 1, 1, 0, 0],
                         [0, 1, 1, 1, 0],
                         [0, 0, 1, 1, 1]], dtype=torch.bool)
    cpu = torch.device("cpu")
    assert torch.equal(attention.windowed(None, 3, 5, 5, cpu)[0, 0], want)
    assert torch.equal(attention.windowed(None, 3, 2, 5, cpu)[0, 0], want[3:])  # two new tokens after three cached
    assert attention.windowed(None, 5, 5, 5, cpu) is None and attention.windowed(None, None, 5, 5, cpu) is None
    pad = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    assert torch.equal(attention.windowed(pad, 3, 5, 5, cpu)[0, 0], want)
    seg = torch.tensor([[0, 0, 0, 0, 1]])
    assert torch.equal(attention.segment_mask(seg, 3)[0, 0], want & (seg.view(5, 1) == seg.view(1, 5)))


def test_without_segments_examples_see_each_other():
    """Control: the same row without segment_ids (plain packing) changes later examples' logits."""
    cfg = PRESETS["tiny"].replace(context_length=32, drop_rate=0.0)
    model = GPTModel(cfg, seed=4).eval()
    examples = _examples(cfg.vocab_size)
    ids, _, seg, pos = _pack(examples)
    plain = model(ids, position_ids=pos)
    neat = model(ids, segment_ids=seg, position_ids=pos)
    n0 = LENGTHS[0]
    assert torch.allclose(plain[0, :n0], neat[0, :n0], atol=1e-5)  # the first example has nothing before it
    assert not torch.allclose(plain[0, n0:n0 + LENGTHS[1]], neat[0, n0:n0 + LENGTHS[1]], atol=1e-3)


def test_segment_mask_is_causal_block_diagonal():
    seg = torch.tensor([[0, 0, 1, 1, 1, 2]])
    m = segment_mask(seg)[0, 0].int()
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [0, 0, 1, 0, 0, 0],
                         [0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 1, 1, 0],
                         [0, 0, 0, 0, 0, 1]])
    assert torch.equal(m, want)


@pytest.mark.parametrize("packed", [False, True])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(packed):
    """With dropout on: the recomputed forward must replay the same dropout masks."""
    cfg = PRESETS["tiny"].replace(context_length=32, drop_rate=0.1)
    model = GPTModel(cfg, seed=2).train()
    ids, labels, seg, pos = _pack(_examples(cfg.vocab_size, seed=1))
    kwargs = dict(segment_ids=seg, position_ids=pos) if packed else {}
    results = []
    for enabled in (False, True):
        model.set_gradient_checkpointing(enabled)
        torch.manual_seed(7)
        loss = model(ids, labels=labels, **kwargs)
        loss.backward()
        results.append((loss.detach(), _grads(model)))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-7, rtol=1e-6), name


def test_checkpointing_is_off_in_eval_and_with_cache():
    cfg = PRESETS["tiny"].replace(context_length=32)
    model = GPTModel(cfg, seed=2).eval()
    model.set_gradient_checkpointing(True)
    ids = torch.randint(0, cfg.vocab_size, (1, 6))
    logits, past = model(ids, use_cache=True)
    assert len(past) == cfg.n_layers and torch.allclose(logits, model(ids), atol=1e-6)


ROPE_PRESETS = ("llama-3.2-1b", "qwen2.5-0.5b", "qwen3-0.6b")


@pytest.mark.parametrize("preset", ROPE_PRESETS)
def test_rope_families_packed_examples_equal_unpacked(preset):
    """The same promise for the RoPE families (RMSNorm, SwiGLU, GQA, Qwen3's q/k norm): positions restart
    per example, so rotary angles match the example run alone. Tiny widths of each published shape."""
    from pipeline.model import config

    if preset not in config.PRESETS:
        pytest.skip(f"no {preset} preset in this checkout (model families, issue 13)")
    cfg = config.PRESETS[preset].replace(vocab_size=50257, context_length=64, emb_dim=64, n_layers=2, n_heads=4,
                                         n_kv_heads=2, ffn_dim=96, drop_rate=0.0,
                                         head_size=16 if config.PRESETS[preset].head_size else None)
    model = GPTModel(cfg, seed=4).train()
    packed_equals_unpacked(model, cfg.vocab_size)


def _many_segments_batch(vocab: int, seed: int = 3):
    """Two rows of 96 with segments from 2 to 40 tokens (several buckets), padding at the end of one row."""
    g = torch.Generator().manual_seed(seed)
    rows = [(40, 3, 17, 2, 30), (9, 33, 25, 21)]  # 92 real tokens (+4 padding) and 88 (+8 padding)
    t = 96
    ids = torch.randint(0, vocab, (2, t), generator=g)
    labels = torch.randint(0, vocab, (2, t), generator=g)
    seg = torch.zeros(2, t, dtype=torch.long)
    pos = torch.zeros(2, t, dtype=torch.long)
    for r, lengths in enumerate(rows):
        at = 0
        for k, n in enumerate(lengths):
            seg[r, at:at + n], pos[r, at:at + n] = k, torch.arange(n)
            at += n
        seg[r, at:], pos[r, at:], labels[r, at:] = len(lengths), torch.arange(t - at), -100
    return ids, labels, seg, pos


def _tiny(preset: str):
    from pipeline.model import config

    base = config.PRESETS[preset]
    if preset == "tiny":
        return base.replace(context_length=128, drop_rate=0.0)
    return base.replace(vocab_size=50257, context_length=128, emb_dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                        ffn_dim=96, drop_rate=0.0, head_size=16 if base.head_size else None)


@pytest.mark.parametrize("preset", ["tiny", "qwen3-0.6b", "qwen3-0.6b+window"])
def test_bucket_path_equals_the_mask_path(monkeypatch, preset):
    """CPU packed rows go through length buckets; the (B, 1, T, T) mask is the reference: same loss and
    gradients in fp32 (GPT-2, and a RoPE family with GQA and q/k norms; with a 7-position sliding window in layer
    0, segments longer and shorter than it), with segments in several buckets."""
    from pipeline.model import gpt

    monkeypatch.setattr(attention, "BUCKET_CALL_COST", 0)  # one bucket per length group: several buckets
    name, _, window = preset.partition("+")
    cfg = _tiny(name)
    if window:  # a small vocabulary: the head is no part of what this case adds
        cfg = cfg.replace(layer_windows=(7, None), vocab_size=256)
    model = GPTModel(cfg, seed=5).train()
    ids, labels, seg, pos = _many_segments_batch(cfg.vocab_size)
    assert len(attention.segment_buckets(seg).shapes) >= 3
    results = {}
    for path in ("mask", "buckets"):
        if path == "mask":
            monkeypatch.setattr(gpt, "packed_attention", lambda s, dtype, p, has_window: attention.segment_mask(s))
        else:
            monkeypatch.setattr(gpt, "packed_attention", attention.packed_attention)
        loss = model(ids, labels=labels, segment_ids=seg, position_ids=pos)
        loss.backward()
        results[path] = (loss.detach(), _grads(model))
    (l0, g0), (l1, g1) = results["mask"], results["buckets"]
    assert torch.allclose(l0, l1, atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-6, rtol=1e-5), name


def test_segment_buckets_cover_every_token_once(monkeypatch):
    """Every token has exactly one slot; a bucket's segments are padded at the end with their last token."""
    monkeypatch.setattr(attention, "BUCKET_CALL_COST", 0)
    _, _, seg, _ = _many_segments_batch(50257)
    b = attention.segment_buckets(seg)
    flat = torch.arange(seg.numel())
    assert sum(n * length for n, length in b.shapes) == b.gather.numel()
    assert torch.equal(b.gather[b.back], flat)  # each token's own slot holds it
    at = 0
    for n, length in b.shapes:
        block = b.gather[at:at + n * length].view(n, length)
        for row in block:
            real = row[:int((row[1:] != row[:-1]).sum()) + 1]
            assert torch.equal(real, torch.arange(int(real[0]), int(real[0]) + len(real)))  # a contiguous segment
            assert bool((row[len(real):] == real[-1]).all())  # padded with its last token
            assert len(set(seg.flatten()[real].tolist())) == 1
        at += n * length


def test_choose_buckets_groups_similar_lengths():
    import numpy as np

    lengths = np.array([5, 300, 7, 290, 6, 280, 120])
    buckets = attention.choose_buckets(lengths)
    assert sorted(i for b in buckets for i in b.tolist()) == list(range(len(lengths)))
    assert {tuple(sorted(b.tolist())) for b in buckets} >= {(1, 3, 5), (0, 2, 4)}  # long ones apart from short
    assert len(attention.choose_buckets(np.array([60] * 19))) == 1  # equal lengths: one bucket, no padding
