"""Phi-3 / Phi-4 checkpoints (Phi3ForCausalLM: microsoft/phi-4, Phi-4-mini-instruct, Phi-3.5-mini, Phi-3-mini) written
by transformers: logits, padded batches, greedy decoding with and without the cache, export, PEFT adapters on the
fused modules, merging, LongRoPE on both sides of its switch, and bad input.

Golden values come from transformers 5.24's Phi3ForCausalLM (models/phi3/modeling_phi3.py) and PEFT 0.21. What Phi-3
differs in, checked there: one qkv_proj whose rows are q | k | v with GQA sizes (Phi3Attention.forward:
query_pos = num_attention_heads * head_dim, then num_key_value_heads * head_dim for k), one gate_up_proj with the
gate's rows first (Phi3MLP.forward: `gate, up_states = up_states.chunk(2, dim=-1)`, up * silu(gate)), no bias
(every nn.Linear there has bias=False), partial_rotary_factor (apply_rotary_pos_emb: the first cos.shape[-1] dims
rotate, the rest pass), sliding_window in every layer when non-null (Phi3Model.forward:
create_sliding_window_causal_mask; masking_utils.sliding_window_overlay: kv_idx > q_idx - sliding_window), tied
embeddings where tie_word_embeddings. Tiny fp32 shapes (2 layers, width 64); the shared family tests of
test_families run here on these variants through this module's `checkpoint` fixture.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.config import PRESETS, count_params, read_config, trainable_params
from pipeline.model.generate import generate
from pipeline.model.weights import load_model, save_hf
from tests.acceptance.harness import random_model
from tests.helpers.hf_generate import left_padded_greedy
from tests.model import test_families as families
from tests.model.test_families import (COMMON, VOCAB, assert_adapter_agrees, ids, randomise_lora,  # noqa: F401
                                       test_export_loads_in_auto_model,
                                       test_greedy_generation_equals_transformers_with_and_without_cache,
                                       test_kv_cache_holds_the_key_value_heads_only, test_logits_equal_transformers,
                                       test_padded_batch_logits_equal_transformers)

transformers = pytest.importorskip("transformers")

# LongRoPE on a tiny window: original_max_position_embeddings 8 of 256 positions, so the sequences here run on both
# factor sets; 4 numbers each (rotary dims 8 = head_dim 16 x partial_rotary_factor 0.5, one number per pair)
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0, 1.25], "long_factor": [3.0, 5.0, 8.0, 4.0]}

PHI3_VARIANTS = {
    # Phi-3-mini's shape of features: a sliding window in every layer (2,047 of 4,096 there; 6 here, shorter than the
    # sequences), GQA in the fused qkv_proj (Phi-4: 40 q heads / 10 kv heads), untied
    "phi3-window-gqa-untied": dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=6,
                                   tie_word_embeddings=False),
    # Phi-4-mini's: partial rotary (0.75 there: 96 of 128 dims; 0.5 here), GQA, tied embeddings
    "phi4mini-partial-tied": dict(num_attention_heads=4, num_key_value_heads=2, partial_rotary_factor=0.5,
                                  tie_word_embeddings=True),
    # Phi-3.5-mini / Phi-4-mini / -128k's LongRoPE (the hub's spelling: rope_scaling with "type"), a top-level
    # original_max_position_embeddings, MQA, partial rotary
    "phi35-longrope-mqa": dict(num_attention_heads=4, num_key_value_heads=1, partial_rotary_factor=0.5,
                               original_max_position_embeddings=8, rope_scaling={**LONGROPE},
                               tie_word_embeddings=False),
}


def phi3_model(name: str, seed: int = 0):
    """A random Phi3ForCausalLM of the variant with N(0, 0.1) noise on every tensor (norms leave 1, greedy decoding
    stays varied); special ids inside the tiny vocabulary (Phi3Config's defaults are Phi-3-mini's 32,000)."""
    config = transformers.Phi3Config(**COMMON, **PHI3_VARIANTS[name], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return random_model(transformers.Phi3ForCausalLM, config, seed=seed)


checkpoint = families.variant_checkpoints(phi3_model, PHI3_VARIANTS)  # the family tests imported above run on it


def test_config_is_read_into_fields(checkpoint):
    name, path, _ = checkpoint
    cfg = read_config(path)
    assert (cfg.family, cfg.qkv_fused, cfg.mlp_fused, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias, cfg.norm_eps) == \
        ("phi3", True, True, False, False, False, 1e-5)
    expect = {"phi3-window-gqa-untied": dict(kv_heads=2, layer_windows=(6, 6), tie_weights=False,
                                             partial_rotary_factor=1.0, rope_scaling=None),
              "phi4mini-partial-tied": dict(kv_heads=2, layer_windows=(), tie_weights=True, partial_rotary_factor=0.5,
                                            rope_dim=8),
              "phi35-longrope-mqa": dict(kv_heads=1, rope_scaling={"type": "longrope", **{
                  k: LONGROPE[k] for k in ("short_factor", "long_factor")}, "original_max_position_embeddings": 8})
              }[name]
    assert {k: getattr(cfg, k) for k in expect} == expect


def test_lora_all_takes_the_fused_linears_and_peft_loads_the_adapter(checkpoint, tmp_path):
    """lora_target: all on Phi-3 is LLaMA-Factory's find_all_linear_modules (model_utils/misc.py:28-52: every module
    whose class name has "Linear", lm_head excepted, by its last name part) on transformers' model: qkv_proj, o_proj,
    gate_up_proj, down_proj, one LoRA per fused Linear as PEFT puts it. PEFT loads our adapter with our logits;
    merged and exported, transformers computes them again."""
    peft = pytest.importorskip("peft")
    cfg = families.assert_lora_all_is_llama_factorys(peft, checkpoint, tmp_path,
                                                     {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"})
    # one LoRA on the whole fused Linear: A (64 x 4) and B (4 x q + 2 kv rows), as PEFT's lora.Linear on qkv_proj;
    # Llama's names are not Phi-3's
    rows = (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim
    assert trainable_params(cfg, "lora", 4, ["qkv_proj"]) == cfg.n_layers * (64 * 4 + 4 * rows)
    with pytest.raises(UserError) as err:
        trainable_params(cfg, "lora", 4, ["q_proj"])
    assert "'q_proj' matches no module" in str(err.value) and "self_attn.qkv_proj" in str(err.value)


def test_longrope_logits_equal_transformers_on_both_sides_of_the_switch(tmp_path):
    """transformers' longrope_frequency_update (modeling_rope_utils.py:47-81): per forward, the long factors when
    max(position_ids) + 1 > original_max_position_embeddings (8 here), else the short ones; the attention factor
    sqrt(1 + ln(256 / 8) / ln 8) on both (_compute_longrope_parameters, :487-578). One model, lengths 8 (the last
    short one), 9 (the first long one), 8 again, 3 and 14: each forward picks its set whatever ran before."""
    ref = phi3_model("phi35-longrope-mqa")
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    x = ids(30, (2, 14))
    for length in (8, 9, 8, 3, 14):
        with torch.no_grad():
            want = ref(x[:, :length]).logits
            got = ours(x[:, :length])
        assert torch.allclose(got, want, atol=1e-4, rtol=0), (length, (got - want).abs().max())
    with torch.no_grad():  # the switch is real: the first 8 positions of a 9-token row run on the other factors
        assert (ours(x[:, :9])[:, :8] - ours(x[:, :8])).abs().max() > 1e-3


def test_longrope_greedy_decoding_across_the_switch_equals_transformers(tmp_path):
    """A 5-token prompt decoded 10 tokens past original_max_position_embeddings 8: transformers drops its cache at
    the first step past it and runs the whole sequence again on the long factors
    (Phi3ForCausalLM.prepare_inputs_for_generation); ours does the same (generate: rope.longrope_restart), cached
    and uncached."""
    ref = phi3_model("phi35-longrope-mqa")
    ref.save_pretrained(tmp_path)
    families.assert_greedy_equals_transformers(ref, load_model(tmp_path).eval(), ids(21, (1, 5))[0].tolist(), 10)


def test_longrope_beam_search_across_the_switch_equals_transformers(tmp_path):
    """num_beams 3 from a 5-token prompt, 8 tokens on past original_max_position_embeddings 8: transformers' beam
    search restarts its cache there too (the same prepare_inputs_for_generation); ours (beam_search) cached and
    uncached."""
    ref = phi3_model("phi35-longrope-mqa")
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    prompt = ids(22, (1, 5))[0].tolist()
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=8, num_beams=3, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, 5:].tolist()
    for cache in (True, False):
        assert generate(ours, prompt, max_new_tokens=8, num_beams=3, eos_id=None, use_cache=cache) == want, cache


def test_batched_left_padded_generation(checkpoint):
    """Rows alone and batched decode alike (test_families' check), except under LongRoPE, whose factor set is one per
    forward for the whole batch (longrope_frequency_update: max over every row's positions), so a short row batched
    with a long one runs on the long factors in transformers too: there the batch equals transformers' batched
    generate, left-padded, crossing the switch (widths 6 -> 14 past 8)."""
    name, path, ref = checkpoint
    if "longrope" not in name:
        return families.test_batched_left_padded_generation_equals_one_by_one(checkpoint)
    ours = load_model(path).eval()
    prompts = [ids(2, (1, 3))[0].tolist(), ids(3, (1, 6))[0].tolist(), ids(4, (1, 5))[0].tolist()]
    want = left_padded_greedy(ref, prompts, 8)
    assert generate(ours, prompts, max_new_tokens=8, eos_id=None) == want
    assert generate(ours, prompts, max_new_tokens=8, eos_id=None, use_cache=False) == want


def test_longrope_export_is_read_back_by_transformers(tmp_path):
    """merged/config.json keeps LongRoPE as Phi3Config reads it: the factors, the top-level
    original_max_position_embeddings (read before the rope dict's) and partial_rotary_factor."""
    ref = phi3_model("phi35-longrope-mqa")
    ref.save_pretrained(tmp_path / "base")
    save_hf(load_model(tmp_path / "base"), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["original_max_position_embeddings"], config["partial_rotary_factor"]) == (8, 0.5)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert back.config.rope_parameters["rope_type"] == "longrope"
    for length in (6, 12):
        x = ids(length, (1, length))
        with torch.no_grad():
            assert torch.allclose(back(x).logits, ref(x).logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------
# Presets: microsoft/phi-4 and Phi-4-mini-instruct's shapes
# ------------------------------------------------------------------------------------------------

PHI_CONFIGS = {  # the hub's config.json shape keys
    "phi-4": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=10,
                  intermediate_size=17920, vocab_size=100352, max_position_embeddings=16384, rope_theta=250000.0,
                  tie_word_embeddings=False, pad_token_id=100349),
    # with its LongRoPE keys (48 factors each: 96 rotary dims of 128; the values here are stand-ins) and its
    # sliding_window 262144, longer than the context
    "phi-4-mini": dict(hidden_size=3072, num_hidden_layers=32, num_attention_heads=24, num_key_value_heads=8,
                       intermediate_size=8192, vocab_size=200064, max_position_embeddings=131072,
                       partial_rotary_factor=0.75, tie_word_embeddings=True, pad_token_id=199999,
                       original_max_position_embeddings=4096, sliding_window=262144,
                       rope_scaling={"type": "longrope", "short_factor": [1.0] * 48, "long_factor": [2.0] * 48}),
}


@pytest.mark.parametrize("name, card", [("phi-4", 147), ("phi-4-mini", 38)])
def test_phi_preset_counts_equal_transformers_and_the_cards(name, card):
    """Counted by transformers on the meta device; the cards' 14.7B (phi-4: 14,659,507,200 by hand) and 3.8B
    (Phi-4-mini: 3,836,021,760, the tied head counted once)."""
    config = transformers.Phi3Config(**PHI_CONFIGS[name])
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(config)
    assert count_params(PRESETS[name]) == sum(p.numel() for p in ref.parameters())
    assert round(count_params(PRESETS[name]) / 10**8) == card
    fields = read_config_dict({**config.to_dict(), "architectures": ["Phi3ForCausalLM"]})
    assert fields.replace(rope_scaling=None, layer_windows=()) == PRESETS[name]
    if name == "phi-4-mini":  # the window every layer has, the rope dims' factors
        assert fields.layer_windows == (262144,) * 32 and fields.rope_dim == 96
        assert fields.rope_scaling["original_max_position_embeddings"] == 4096


def read_config_dict(raw):
    from pipeline.model.config import from_hf_config

    return from_hf_config(raw)


# ------------------------------------------------------------------------------------------------
# Bad input: one message naming the file and the key
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, words", [
    ({"resid_pdrop": 0.1}, "resid_pdrop is 0.1; only 0 is supported for Phi3ForCausalLM"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     "rope_scaling.rope_type 'linear' is not implemented for Phi3ForCausalLM; supported: default, longrope"),
    ({"rope_scaling": {**LONGROPE, "short_factor": [1.0, 2.0]}},
     "rope_scaling.short_factor has 2 numbers; expected 4, one per rotary pair"),
    ({"rope_scaling": {"type": "su", "long_factor": [1.0] * 4}},
     "rope_scaling.short_factor is None; expected a list of numbers"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor is 1.5; expected a number in (0, 1]"),
])
def test_bad_phi3_configs_name_file_and_key(tmp_path, changes, words):
    config = {**phi3_model("phi4mini-partial-tied").config.to_dict(), "architectures": ["Phi3ForCausalLM"]}
    config.pop("rope_parameters")
    families.assert_config_refused(tmp_path, {**config, **changes}, words)


def test_other_families_cannot_express_the_fused_modules():
    from pipeline.model.families import check_exportable

    llama = PRESETS["llama-3.2-1b"].replace(n_layers=2)
    assert check_exportable(llama.replace(mlp_fused=True)) == \
        ["LlamaForCausalLM cannot express mlp_fused=True (it has False)"]
    assert check_exportable(llama.replace(partial_rotary_factor=0.5)) == \
        ["LlamaForCausalLM cannot express partial_rotary_factor=0.5 (it has 1.0)"]
    assert check_exportable(PRESETS["phi-4"].replace(n_layers=2)) == []


def test_a_recipe_rope_scaling_on_phi3_is_refused_with_the_reason():
    """LLaMA-Factory's configure_rope would write rope_type linear / dynamic / yarn / llama3 into a Phi3Config, whose
    validate_rope raises on all but default / longrope (and reads yarn as longrope, without its factors)."""
    from pipeline.model.rope_recipe import recipe_rope

    with pytest.raises(UserError) as err:
        recipe_rope(PRESETS["phi-4"], "yarn", 40000)
    assert err.value.messages == ["rope_scaling: given 'yarn', but Phi3ForCausalLM runs only rope types default,"
                                  " longrope (transformers refuses the others; LongRoPE's factors come with the"
                                  " checkpoint, as Phi-3.5-mini / Phi-4-mini's); remove the key"]
