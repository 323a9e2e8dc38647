"""The chunked head loss equals the plain cross-entropy over the full logits: value and gradients.

References are computed here with F.cross_entropy on the whole (N, V) logits, not with the module's code.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import head_loss
from pipeline.model.config import PRESETS
from pipeline.model.gpt import GPTModel
from pipeline.model.lora import apply_lora


def _head(vocab: int, dim: int, dtype: torch.dtype, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(dim, vocab, bias=False).to(dtype)
    head.weight.requires_grad_(False)
    return head


@pytest.mark.parametrize("rows", [1, 127, 128, 300])  # CHUNK_ROWS is 128: one block, exact, several, a tail
def test_fp32_value_and_hidden_gradient_equal_full_logits(rows):
    head = _head(1000, 48, torch.float32)
    hidden = torch.randn(rows, 48, requires_grad=True)
    targets = torch.randint(0, 1000, (rows,))
    assert head_loss.fused_applies(head, hidden)
    total = head_loss.head_cross_entropy_sum(head, hidden, targets)
    (total * 0.37).backward()  # an incoming scale, as a mean reduction or a loss scale gives
    got = hidden.grad.clone()
    hidden.grad = None
    ref = F.cross_entropy(hidden @ head.weight.T, targets, reduction="sum")
    (ref * 0.37).backward()
    assert torch.allclose(total, ref, rtol=1e-6, atol=0)
    assert torch.allclose(got, hidden.grad, rtol=1e-5, atol=1e-8)


def test_bf16_equals_the_plain_bf16_path():
    """The plain path: bf16 head matmul, fp32 cross-entropy; its logit gradient cast to bf16 for the matmul."""
    head = _head(2000, 64, torch.bfloat16, seed=1)
    base = torch.randn(200, 64).bfloat16()
    targets = torch.randint(0, 2000, (200,))
    fused_in = base.clone().requires_grad_()
    fused = head_loss.head_cross_entropy_sum(head, fused_in, targets)
    (fused / 200).backward()
    plain_in = base.clone().requires_grad_()
    plain = F.cross_entropy(head(plain_in).float(), targets, reduction="sum")
    (plain / 200).backward()
    assert fused.dtype == torch.float32
    assert torch.allclose(fused, plain, rtol=1e-5, atol=0)
    assert torch.allclose(fused_in.grad.float(), plain_in.grad.float(), rtol=2e-2, atol=1e-5)


def test_no_labelled_rows_gives_zero_and_a_zero_gradient():
    head = _head(50, 8, torch.float32)
    hidden = torch.randn(0, 8, requires_grad=True)
    total = head_loss.head_cross_entropy_sum(head, hidden, torch.zeros(0, dtype=torch.long))
    total.backward()
    assert total.item() == 0.0 and hidden.grad.shape == (0, 8)


def test_plain_path_where_the_chunked_one_would_be_wrong_or_unsafe():
    hidden = torch.randn(4, 8, requires_grad=True)
    assert head_loss.fused_applies(_head(50, 8, torch.float32), hidden)
    trained = _head(50, 8, torch.float32)
    trained.weight.requires_grad_(True)  # full fine-tuning: the head needs its own gradient
    assert not head_loss.fused_applies(trained, hidden)
    with_bias = nn.Linear(8, 50)
    with_bias.requires_grad_(False)
    assert not head_loss.fused_applies(with_bias, hidden)
    half = _head(50, 8, torch.float16)
    assert not head_loss.fused_applies(half, hidden.detach().half().requires_grad_())  # loss scaling order
    assert not head_loss.fused_applies(_head(50, 8, torch.bfloat16), hidden)  # mixed dtypes
    partitioned = _head(50, 8, torch.float32)
    partitioned.weight.ds_id = 3  # a ZeRO-3 parameter: gathered only through the module's hooks
    assert not head_loss.fused_applies(partitioned, hidden)
    with torch.no_grad():
        assert not head_loss.fused_applies(_head(50, 8, torch.float32), hidden)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not head_loss.fused_applies(_head(50, 8, torch.float32), hidden)


def lora_model(cfg, dtype: torch.dtype, seed: int = 4) -> GPTModel:
    """A GPTModel with LoRA on every Linear (frozen head), its B drawn non-zero so that every adapter gets a
    gradient, in `dtype`."""
    model = GPTModel(cfg, seed=seed)
    apply_lora(model, "all", rank=4, alpha=8, seed=2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name and p.requires_grad:
                p.normal_(0, 0.05)
    return model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_model_loss_and_adapter_gradients_equal_full_logits(dtype, monkeypatch):
    """The model's training loss (chunked head) against the cross-entropy of its full logits."""
    calls = []
    real = head_loss._ChunkedHeadCrossEntropy.apply
    monkeypatch.setattr(head_loss._ChunkedHeadCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    cfg = PRESETS["tiny"].replace(context_length=64)
    model = lora_model(cfg, dtype)
    torch.manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (3, 60))
    labels = ids.roll(-1, 1)
    labels[:, :20] = -100
    loss = model(ids, labels=labels)
    loss.backward()
    assert calls == [1]
    fast = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    ref = F.cross_entropy(model(ids).float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    ref.backward()
    tol = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-5, 5e-2)}[dtype]
    assert torch.allclose(loss, ref, rtol=tol[0], atol=0)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(fast[n], p.grad.float(), rtol=tol[1], atol=1e-6 if dtype == torch.float32 else 1e-3), n
