"""neat_packing on a GPU: torch's varlen FlashAttention kernel against each example run alone (CUDA only).

The CPU suite checks the varlen glue with stand-in kernels (tests/model/test_packed_attention.py); this file is
the one place the real kernel runs. It is skipped without CUDA; bench/gpu_check.sh runs it on a lent GPU.
The truth is the same weights in fp32 run on each example by itself (dense causal SDPA; with a sliding window,
SDPA with the band mask): nothing of the packed path computes it. In bf16/fp16 the packed row cannot match it to fp32 rounding, so the bar is the
unpacked run's own: the packed logits and gradients are as close to the truth as those of each example run
alone in the same dtype (within 2x, plus a floor of 1%). A kernel that let segments see each other or the
future misses that by tens of percent (checked on CPU with broken stand-ins when this test was written).
"""
from __future__ import annotations

import inspect

import pytest
import torch

from pipeline.model import attention
from pipeline.model.config import PRESETS
from pipeline.model.gpt import GPTModel

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")

LENGTHS = (37, 120, 5, 64, 90)  # one row of 316 real tokens + 4 of padding
ROW = 320


def _config(preset: str):
    """The preset's shape, small; "+window": a 48-position sliding window in layer 0 (segments of 64-120 slide)."""
    preset, _, window = preset.partition("+")
    base = PRESETS[preset]
    if preset == "tiny":
        return base.replace(context_length=ROW, drop_rate=0.0)
    return base.replace(vocab_size=4096, context_length=ROW, emb_dim=256, n_layers=2, n_heads=8, n_kv_heads=2,
                        ffn_dim=512, drop_rate=0.0, head_size=64 if base.head_size else None,
                        layer_windows=(48, None) if window else ())


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))


def _row(cfg) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """ids, segment ids and restarting positions of one packed row (1, ROW); and the count of real tokens."""
    g = torch.Generator().manual_seed(0)
    ids = torch.zeros(1, ROW, dtype=torch.long)
    seg = torch.full((1, ROW), len(LENGTHS))
    pos = torch.zeros(1, ROW, dtype=torch.long)
    at = 0
    for k, n in enumerate(LENGTHS):
        ids[0, at:at + n] = torch.randint(0, cfg.vocab_size, (n,), generator=g)
        seg[0, at:at + n], pos[0, at:at + n] = k, torch.arange(n)
        at += n
    pos[0, at:] = torch.arange(ROW - at)
    return ids.cuda(), seg.cuda(), pos.cuda(), at


def _alone(model, ids: torch.Tensor, vocab: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Each example run by itself: its logits (concatenated) and the gradient of the mean squared logit."""
    logits, at = [], 0
    for n in LENGTHS:
        logits.append(model(ids[:, at:at + n])[0])
        at += n
    out = torch.cat(logits)
    (out.float().square().sum() / (at * vocab)).backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out.float(), grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("preset", ["tiny", "qwen3-0.6b", "llama-3.2-1b", "qwen3-0.6b+window"])
def test_varlen_kernel_packed_examples_equal_each_alone(monkeypatch, preset, dtype):
    real = attention._varlen_kernel()
    if real is None:
        pytest.skip(f"torch {torch.__version__} has no torch.nn.attention.varlen")
    if "+window" in preset and "window_size" not in inspect.signature(real).parameters:
        pytest.skip(f"torch {torch.__version__}'s varlen_attn has no window_size (windowed rows take the buckets)")
    calls = []
    monkeypatch.setattr(attention, "_varlen_kernel", lambda: (calls.append(1), real)[1])
    cfg = _config(preset)
    ids, seg, pos, real_tokens = _row(cfg)
    truth_logits, truth_grads = _alone(GPTModel(cfg, seed=4).cuda().train(), ids, cfg.vocab_size)
    model = GPTModel(cfg, seed=4).to("cuda", dtype).train()
    assert not calls
    alone_logits, alone_grads = _alone(model, ids, cfg.vocab_size)
    packed = model(ids, segment_ids=seg, position_ids=pos)[0, :real_tokens]
    assert calls, "the varlen kernel did not run on the packed row"
    (packed.float().square().sum() / (real_tokens * cfg.vocab_size)).backward()
    packed_grads = {n: p.grad.float() for n, p in model.named_parameters()}

    def close(got: torch.Tensor, same_dtype_alone: torch.Tensor, truth: torch.Tensor, what: str) -> None:
        bar = 2 * _rel(same_dtype_alone, truth) + 1e-2
        err = _rel(got, truth)
        assert err <= bar, f"{what}: packed error {err:.2e} against fp32, each example alone {bar:.2e} (bar)"

    close(packed.float(), alone_logits, truth_logits, "logits")
    for name, truth in truth_grads.items():
        close(packed_grads[name], alone_grads[name], truth, f"gradient {name}")
