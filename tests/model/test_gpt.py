"""The model itself: structure mirrors config.layout, loss at labelled positions only, masks and the KV cache."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.config import PRESETS, layout
from pipeline.model.gpt import GPTModel

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def model():
    return GPTModel(TINY.replace(context_length=32), seed=3).eval()


def test_structure_matches_layout_and_hf_names():
    cfg = TINY.replace(tie_weights=False, qkv_bias=False)
    m = GPTModel(cfg, seed=0)
    params = dict(m.named_parameters())
    for spec in layout(cfg):
        got = sum(p.numel() for n, p in params.items() if n.rsplit(".", 1)[0] == spec.name)
        assert got == spec.params, spec.name
    assert sum(p.numel() for p in m.parameters()) == sum(s.params for s in layout(cfg))
    assert "layers.1.self_attn.qkv_proj.weight" in params and "layers.1.mlp.up_proj.weight" in params and "lm_head.weight" in params
    assert "layers.0.self_attn.qkv_proj.bias" not in params
    assert all(not n.endswith(".attn.bias") for n, _ in m.state_dict().items())  # no causal-mask buffer
    tied = GPTModel(TINY, seed=0)
    assert tied.lm_head.weight is tied.embed_tokens.weight
    assert "lm_head.weight" not in dict(tied.named_parameters())  # counted once


def test_init_is_gpt2_style_and_seeded():
    cfg = PRESETS["mini"]
    a, b, c = GPTModel(cfg, seed=1), GPTModel(cfg, seed=1), GPTModel(cfg, seed=2)
    assert torch.equal(a.layers[0].self_attn.qkv_proj.weight, b.layers[0].self_attn.qkv_proj.weight)
    assert not torch.equal(a.layers[0].self_attn.qkv_proj.weight, c.layers[0].self_attn.qkv_proj.weight)
    assert abs(a.embed_tokens.weight.std().item() - 0.02) < 0.001
    assert abs(a.layers[0].mlp.up_proj.weight.std().item() - 0.02) < 0.001
    proj = torch.cat([a.layers[i].mlp.down_proj.weight.flatten() for i in range(cfg.n_layers)])
    assert abs(proj.std().item() - 0.02 / math.sqrt(2 * 4)) < 0.0005
    assert torch.count_nonzero(a.layers[0].self_attn.qkv_proj.bias) == 0 and torch.all(a.norm.weight == 1)


def test_loss_at_labelled_positions_equals_full_cross_entropy(model):
    torch.manual_seed(0)
    ids = torch.randint(0, TINY.vocab_size, (3, 20))
    labels = torch.randint(0, TINY.vocab_size, (3, 20))
    labels[0, :12] = -100
    labels[1, 5:] = -100
    labels[2, ::2] = -100
    logits = model(ids)
    full = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert torch.allclose(model(ids, labels=labels), full, atol=1e-6, rtol=0)
    total, count = model(ids, labels=labels, reduction="sum")
    assert count == int((labels != -100).sum())
    ref_sum = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    assert torch.allclose(total, ref_sum, rtol=1e-6)


def test_loss_gradients_match_full_head(model):
    m = GPTModel(TINY.replace(context_length=16), seed=5)
    ids = torch.randint(0, TINY.vocab_size, (2, 16))
    labels = ids.roll(-1, 1)
    labels[:, :8] = -100
    m(ids, labels=labels).backward()
    fast = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    F.cross_entropy(m(ids).flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    for n, p in m.named_parameters():
        assert torch.allclose(fast[n], p.grad, atol=1e-7, rtol=1e-4), n


def test_right_padding_leaves_real_tokens_unchanged(model):
    ids = torch.randint(0, TINY.vocab_size, (1, 10))
    padded = torch.cat([ids, torch.full((1, 4), 50256)], 1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 4)], 1).long()
    assert torch.allclose(model(padded, attention_mask=mask)[:, :10], model(ids), atol=1e-5)


def test_left_padding_with_mask_and_positions_equals_unpadded(model):
    ids = torch.randint(0, TINY.vocab_size, (1, 10))
    padded = torch.cat([torch.full((1, 5), 50256), ids], 1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 10)], 1).long()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(padded, attention_mask=mask, position_ids=pos)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[:, 5:], model(ids), atol=1e-5)


def test_kv_cache_forward_equals_full_forward(model):
    ids = torch.randint(0, TINY.vocab_size, (2, 12))
    full = model(ids)
    logits, past = model(ids[:, :7], use_cache=True)
    assert torch.allclose(logits, full[:, :7], atol=1e-5)
    logits, past = model(ids[:, 7:10], past_kv=past, use_cache=True)  # several new tokens at once
    assert torch.allclose(logits, full[:, 7:10], atol=1e-5)
    for t in (10, 11):
        logits, past = model(ids[:, t:t + 1], past_kv=past, use_cache=True)
        assert torch.allclose(logits[:, 0], full[:, t], atol=1e-5)
    assert past[0][0].shape == (2, TINY.n_heads, 12, TINY.head_dim)


def test_too_long_input_is_refused(model):
    with pytest.raises(ValueError, match="exceeds context_length 32"):
        model(torch.zeros(1, 33, dtype=torch.long))
