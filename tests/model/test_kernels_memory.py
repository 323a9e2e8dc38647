"""The decoding kernel (oneDNN's fp32 Linear under inference mode) and huge-page weights: same function,
same parameters; speed is measured in bench/generation.py, never here."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.config import PRESETS
from pipeline.model.generate import generate
from pipeline.model.gpt import GPTModel
from pipeline.model.kernels import ONE_ROW_MIN_WEIGHT, Linear, linear, onednn_linear_available, use_onednn
from pipeline.model.memory import HUGE_PAGE, dense_weight, huge_pages_available
from pipeline.model.weights import load_model, save_hf, save_model


@pytest.mark.parametrize("shape", [(3, 5, 64), (2, 1, 64), (7, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_f_linear_under_inference_mode(shape, bias):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 64, generator=g), torch.randn(300, generator=g) if bias else None
    x = torch.randn(*shape, generator=g)
    with torch.inference_mode():
        assert use_onednn(x, w) == onednn_linear_available()
        assert not use_onednn(x[:1, -1:] if x.dim() == 3 else x[:1], w)  # one row: MKL's gemv
        got = linear(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_one_row_takes_onednn_only_for_large_weights_and_several_threads():
    """Batch-1 decoding: a matrix-vector product goes to oneDNN's threads only where the weight is large."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(ONE_ROW_MIN_WEIGHT // 64 + 1, 64, generator=g)
    x = torch.randn(1, 1, 64, generator=g)
    threads = torch.get_num_threads()
    try:
        with torch.inference_mode():
            torch.set_num_threads(2)
            assert use_onednn(x, w) == onednn_linear_available()
            assert not use_onednn(x, w[:1000])
            got = linear(x, w)
            torch.set_num_threads(1)
            assert not use_onednn(x, w)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


def test_linear_keeps_autograd_outside_inference_mode():
    layer = Linear(8, 4)
    x = torch.randn(2, 8, requires_grad=True)
    assert not use_onednn(x, layer.weight)
    layer(x).sum().backward()  # F.linear: gradients exist
    assert x.grad is not None and layer.weight.grad is not None
    with torch.no_grad():  # no_grad alone keeps F.linear, bit for bit
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))


def test_dense_weight_copies_only_when_it_must():
    t = torch.randn(4, 4)
    assert dense_weight(t, torch.float32) is t
    big = torch.randn(1024, 1024, dtype=torch.bfloat16)  # 4 MiB in fp32: over one huge page
    out = dense_weight(big.t(), torch.float32)
    assert out.numel() * 4 >= HUGE_PAGE
    assert out.dtype == torch.float32 and out.is_contiguous() and torch.equal(out, big.t().float())
    assert out.untyped_storage().nbytes() == out.numel() * 4  # no slack: checkpoint writers see one tensor
    if huge_pages_available():
        assert out.data_ptr() % 4096 == 0  # its own mapping
    del big
    out.add_(1)  # writable, alive without its source


def test_bf16_checkpoint_loads_trains_and_generates_the_same(tmp_path):
    """A bf16 HF checkpoint converted to fp32 at load (the copies that land on huge pages): the model trains
    (autograd over those tensors), saves, and decodes the same greedy tokens with and without the cache."""
    cfg = PRESETS["llama-3.2-1b"].replace(n_layers=2, emb_dim=64, n_heads=4, n_kv_heads=2, head_size=16,
                                          ffn_dim=128, vocab_size=9000, context_length=64)
    save_hf(GPTModel(cfg, seed=1), tmp_path / "hf", dtype="bf16")
    model = load_model(tmp_path / "hf")
    assert model.lm_head.weight.dtype == torch.float32 and model.lm_head.weight is model.embed_tokens.weight
    x = torch.randint(0, 9000, (2, 12), generator=torch.Generator().manual_seed(0))
    model(x[:, :-1], labels=x[:, 1:]).backward()
    assert model.lm_head.weight.grad is not None
    save_model(model, tmp_path / "own")
    assert torch.equal(load_model(tmp_path / "own").lm_head.weight, model.lm_head.weight)
    prompts = [[5, 6, 7, 8], [9, 10]]
    assert generate(model, prompts, max_new_tokens=6) == generate(model, prompts, max_new_tokens=6, use_cache=False)
