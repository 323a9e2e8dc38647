"""DeepSeek-V3's latent KV cache: per layer and token the cache keeps the normalised kv latent (kv_lora_rank) and the
one rotated key part all heads share (qk_rope_head_dim), not the expanded per-head keys and values, and decodes as
transformers 5.24 does.

transformers' DeepseekV3Attention.forward (models/deepseek_v3/modeling_deepseek_v3.py:427-481) caches the same two
tensors ("Cache read / write is performed while latent KV is still compressed", :457-460: kv_nope after
kv_a_layernorm and the rotated k_rot, each viewed as one head (B, 1, T, width)) and expands them every step through
kv_b_proj (expand_kv, :406-424). Golden values: its cache's two tensors after a prompt and three single-token steps,
its greedy generate (one prompt, and a left-padded batch) and its beam search. The variant: a query latent
(q_lora_rank), YaRN with mscale_all_dim 0.7, 8 experts in 4 groups with a correction bias (tests/model/
test_deepseek_v3.py's q-latent-groups plus YaRN). Before the change our cache held (B, heads, T, head_dim) keys and
values: the latent and byte-count tests failed, the decoding ones passed either way.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.model.config import PRESETS, kv_cache_bytes, kv_cache_values
from pipeline.model.generate import generate
from pipeline.model.weights import load_model
from tests.helpers.hf_generate import (beam_search_tokens, caches_after_steps, greedy_tokens,
                                        left_padded_greedy)
from tests.model.test_deepseek_v3 import CONFIG, VARIANTS
from tests.model.test_families import ids
from tests.model.test_glm4_moe import deepseek_routed_model
from tests.model.test_window_cache import caches  # noqa: F401 - the fixture: the caches generate makes

transformers = pytest.importorskip("transformers")
RANK, ROPE = CONFIG["kv_lora_rank"], CONFIG["qk_rope_head_dim"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers model, ours) of the q-latent, YaRN, grouped-router variant."""
    config = transformers.DeepseekV3Config(**{**CONFIG, "rope_scaling": VARIANTS["q-proj-yarn"]["rope_scaling"]})
    ref = deepseek_routed_model(transformers.DeepseekV3ForCausalLM, config).eval()
    path = tmp_path_factory.mktemp("deepseek_v3_cache")
    ref.save_pretrained(path)
    return ref, load_model(path).eval()


def test_the_cache_keeps_transformers_latents(checkpoint):
    """After a 9-token prompt and 3 one-token steps each layer keeps (1, 1, 12, kv_lora_rank) latents and (1, 1, 12,
    qk_rope_head_dim) rotated keys: transformers' cache layers' two tensors. Its rotated part is laid out with the
    pairs' first dims, then their second ones (apply_rotary_pos_emb_interleave, :310-346: cat([k1 * cos - k2 * sin,
    k2 * cos + k1 * sin]) of k[..., 0::2], k[..., 1::2]), ours in adjacent pairs (the same values: queries and keys
    share the order, so the scores are equal): compared through that permutation."""
    ref, ours = checkpoint
    layers, past = caches_after_steps(ref, ours, ids(4, (1, 12)), 9)
    for layer, theirs in enumerate(layers):
        latent, k_rot = past[layer]
        assert (latent.shape, k_rot.shape) == (theirs.keys.shape, theirs.values.shape) == \
            ((1, 1, 12, RANK), (1, 1, 12, ROPE))
        halves = torch.cat([k_rot[..., 0::2], k_rot[..., 1::2]], dim=-1)
        assert torch.allclose(latent, theirs.keys, atol=1e-5) and torch.allclose(halves, theirs.values, atol=1e-5)


def test_greedy_with_the_cache_equals_transformers(checkpoint, caches):  # noqa: F811 - the imported fixture
    """One prompt (8 new tokens) and a left-padded batch: transformers' tokens with the cache (without it:
    tests/model/test_deepseek_v3.py); the cache generate allocated is what plan's estimate (config.kv_cache_bytes)
    counts: the latents."""
    ref, ours = checkpoint
    prompt, new = ids(1, (1, 9))[0].tolist(), 8
    assert generate(ours, prompt, max_new_tokens=new, eos_id=None) == greedy_tokens(ref, prompt, new)
    (cache,) = caches
    allocated = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values])
    assert kv_cache_bytes(ours.cfg, 1, len(prompt), new, 4) == allocated == \
        CONFIG["num_hidden_layers"] * (len(prompt) + new) * (RANK + ROPE) * 4
    prompts = [ids(2, (1, 4))[0].tolist(), ids(3, (1, 10))[0].tolist()]
    assert generate(ours, prompts, max_new_tokens=5, eos_id=None) == left_padded_greedy(ref, prompts, 5)


def test_beam_search_reorders_the_latents_as_transformers(checkpoint):
    """2 beams, the cache's latents reordered each step (KVCache.reorder): transformers' beam search."""
    ref, ours = checkpoint
    prompt = ids(5, (1, 7))[0].tolist()
    assert generate(ours, prompt, max_new_tokens=6, eos_id=None, num_beams=2) == beam_search_tokens(ref, prompt, 6, 2)


def test_plan_counts_576_values_per_token_and_layer(tmp_path):
    """DeepSeek-V3 and Moonlight: 512 + 64 cached numbers per token and layer, against DeepSeek-V3's 2 x 128 x 192
    expanded (the values padded to the keys' width), 85 times fewer. plan's stage ppo rollout estimate
    (pipeline.recipe.plan) holds that cache: on moonlight-16b-a3b 27 layers x rows x (cutoff_len + max_new_tokens) x
    576 x 2 bytes (bf16), plus the rollout's kept rows (44 bytes a position, 8 a row: plan.ROLLOUT_POSITION_BYTES /
    ROW_BYTES)."""
    from pipeline.recipe.plan import estimate_memory
    from pipeline.recipe.resolve import resolve

    v3 = PRESETS["deepseek-v3"]
    assert kv_cache_values(v3) == kv_cache_values(PRESETS["moonlight-16b-a3b"]) == 576
    assert 2 * v3.n_heads * v3.head_dim // 576 == 85
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: moonlight-16b-a3b\nstage: ppo\nreward_model: http://127.0.0.1:9/score\n"
                      "reward_model_type: api\ndataset: demo_alpaca\nfinetuning_type: lora\n"
                      "cutoff_len: 1024\nmax_new_tokens: 512\nper_device_train_batch_size: 2\nbf16: true\n")
    r = resolve(recipe, command="plan")
    positions, rows = 1024 + 512, 2 * r["gradient_accumulation_steps"] * r["ppo_buffer_size"]
    assert estimate_memory(r).gpu["rollout"] == 27 * 2 * positions * 576 * 2 + rows * (positions * 44 + 8)
