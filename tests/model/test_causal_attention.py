"""The explicit-matmul causal attention (pipeline.model.causal_attention) against torch's SDPA in float64.

The reference is F.scaled_dot_product_attention run in double precision (nothing of the code under test);
in fp32 the results must agree to rounding, in bf16 within two ulps of the largest value, as torch's own
bf16 SDPA is.
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
    """Max abs error of the output and of dq, dk, dv against SDPA in float64, relative to the reference's largest
    magnitude."""
    ref_in = [z.detach().double().requires_grad_() for z in (q, k, v)]
    ref = F.scaled_dot_product_attention(*ref_in, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
    ref.backward(grad.double())
    for z in (q, k, v):
        z.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    pairs = [(out.detach(), ref.detach())] + [(z.grad, r.grad) for z, r in zip((q, k, v), ref_in)]
    return [float((got.double() - want).abs().max() / want.abs().max()) for got, want in pairs]


@pytest.fixture(params=["one chunk", "chunks of 4"])
def chunk(request, monkeypatch):
    """The default chunk (one chunk at these lengths) and chunks of 4 queries (several, the last one short)."""
    if request.param == "chunks of 4":
        monkeypatch.setattr(module, "CHUNK", 4)


@pytest.mark.parametrize("shape", SHAPES)
def test_fp32_equals_sdpa_in_double(shape, chunk):
    q, k, v, grad = _inputs(shape, torch.float32)
    assert max(_errors(causal_attention, q, k, v, grad)) < 1e-6


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_bf16_is_within_two_ulps_as_torchs_own_bf16_sdpa(shape, chunk, seed):
    """bf16 (8 significant bits): output and gradients within 2^-6 of the largest reference value (two ulps at
    the top), the bound torch's own bf16 SDPA meets too (checked here, so the bound is not ours alone)."""
    q, k, v, grad = _inputs(shape, torch.bfloat16, seed)
    assert max(_errors(causal_attention, q, k, v, grad)) < 2 ** -6
    def sdpa(*qkv):
        return F.scaled_dot_product_attention(*qkv, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])

    assert max(_errors(sdpa, q, k, v, grad)) < 2 ** -6


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
