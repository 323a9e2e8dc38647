"""The explicit-matmul causal attention (pipeline.model.causal_attention) against torch's SDPA in float64.

The reference is F.scaled_dot_product_attention run in double precision (nothing of the code under test);
in fp32 the results must agree to rounding, in bf16 be as close to the reference as torch's own bf16 SDPA.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import attention, causal_attention as module
from pipeline.model.causal_attention import DENSE_MAX_LEN, causal_attention, dense_applies

SHAPES = [(3, 4, 4, 9, 8), (2, 8, 2, 13, 16), (1, 4, 1, 5, 8)]  # (n, heads, key/value heads, length, head dim)


def _inputs(shape, dtype, seed=0):
    n, h, h_kv, length, d = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, h, length, d, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(n, h_kv, length, d, generator=g).to(dtype).requires_grad_() for _ in range(2))
    return q, k, v, torch.randn(n, h, length, d, generator=g).to(dtype)


def _errors(fn, q, k, v, grad):
    """Max abs error of the output and of dq, dk, dv against SDPA in float64."""
    ref_in = [z.detach().double().requires_grad_() for z in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    ref.backward(grad.double())
    for z in (q, k, v):
        z.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return [float((out.detach().double() - ref.detach()).abs().max())] + [float((z.grad.double() - r.grad).abs().max())
                                                          for z, r in zip((q, k, v), ref_in)]


@pytest.fixture(params=["one chunk", "chunks of 4"])
def chunk(request, monkeypatch):
    """The default chunk (one chunk at these lengths) and chunks of 4 queries (several, the last one short)."""
    if request.param == "chunks of 4":
        monkeypatch.setattr(module, "CHUNK", 4)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_equals_sdpa_in_double(shape, chunk):
    q, k, v, grad = _inputs(shape, torch.float32)
    assert max(_errors(causal_attention, q, k, v, grad)) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_is_as_close_to_double_as_torchs_own_bf16_sdpa(shape, chunk):
    q, k, v, grad = _inputs(shape, torch.bfloat16)
    ours = _errors(causal_attention, q, k, v, grad)
    torchs = _errors(lambda *qkv: F.scaled_dot_product_attention(*qkv, is_causal=True,
                                                                  enable_gqa=k.shape[1] != q.shape[1]), q, k, v, grad)
    for mine, theirs in zip(ours, torchs):  # output, dq, dk, dv: within 2.5x of SDPA's error, a few bf16 ulps
        assert mine <= 2.5 * theirs + 1e-3


def test_same_bits_with_and_without_gradients(chunk):
    """A DPO policy forward (grad) and its reference forward (no_grad) of the same weights must agree exactly."""
    q, k, v, _ = _inputs(SHAPES[1], torch.bfloat16)
    with torch.no_grad():
        frozen = causal_attention(q, k, v)
    assert torch.equal(causal_attention(q, k, v), frozen)


def test_which_kernel_runs(monkeypatch):
    """Short causal self-attention on CPU without dropout: matmuls; long, dropout, a cache step or a mask: SDPA."""
    q, k, v, _ = _inputs((1, 2, 2, 6, 4), torch.float32)
    assert dense_applies(q, k, 0.0) and not dense_applies(q, k, 0.1)
    assert not dense_applies(q[:, :, -1:], k, 0.0)  # one new token against a KV cache
    assert not dense_applies(q.half(), k.half(), 0.0)
    long = torch.zeros(1, 1, DENSE_MAX_LEN + 1, 4)
    assert dense_applies(long[:, :, :-1], long[:, :, :-1], 0.0) and not dense_applies(long, long, 0.0)
    calls = []
    monkeypatch.setattr(attention.dense, "causal_attention", lambda *qkv: calls.append(1) or causal_attention(*qkv))
    attention.attend(q, k, v, None, is_causal=True, dropout_p=0.0)
    assert calls == [1]
    attention.attend(q, k, v, torch.ones(6, 6, dtype=torch.bool).tril(), is_causal=False, dropout_p=0.0)
    attention.attend(q, k, v, None, is_causal=True, dropout_p=0.5)
    assert calls == [1]
