"""GLM-4 checkpoints written by transformers (Glm4ForCausalLM: THUDM/GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1-9B-0414;
GlmForCausalLM: THUDM/glm-4-9b-chat-hf): logits, padded batches, greedy decoding with and without the cache, export,
PEFT adapters on the fused gate_up_proj, merging, packed rows, presets and bad input.

Golden values come from transformers 5.24 (models/glm4/modeling_glm4.py, models/glm/modeling_glm.py) and PEFT 0.21.
What GLM differs in, checked there:
- the interleaved rotation: modeling_glm4.py:151-155 rotate_half pairs adjacent dims
  (`torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)`), :180-181 repeat_interleave the first half of
  cos / sin, :184-194 rotate the first rotary_dim dims and pass the rest; partial_rotary_factor 0.5 by default
  (configuration_glm4.py:76, read into rope_parameters by modeling_rope_utils.convert_rope_params_to_dict);
- q / k / v biases by attention_bias (true by default, configuration_glm4.py:73), none on o_proj (:220);
- one gate_up_proj, the gate's rows first (modeling_glm4.py:54-62: `gate, up_states = up_states.chunk(2, dim=-1)`);
- Glm4DecoderLayer's four norms (modeling_glm4.py:74-77, :103 and :109: post_self_attn_layernorm and
  post_mlp_layernorm on each branch's output before its residual add); GlmDecoderLayer has the two of Llama
  (modeling_glm.py's GlmDecoderLayer: input_layernorm, post_attention_layernorm only).
Tiny fp32 shapes (2 layers, width 64); the shared family tests of test_families run on these variants through this
module's `checkpoint` fixture.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.config import PRESETS, count_params, from_hf_config, read_config, trainable_params
from pipeline.model.gpt import GPTModel
from pipeline.model.weights import load_model
from tests.acceptance.harness import random_model
from tests.model import test_families as families
from tests.model.test_families import (COMMON, VOCAB, assert_adapter_agrees, ids, randomise_lora,  # noqa: F401
                                       test_export_loads_in_auto_model,
                                       test_greedy_generation_equals_transformers_with_and_without_cache,
                                       test_kv_cache_holds_the_key_value_heads_only, test_logits_equal_transformers,
                                       test_padded_batch_logits_equal_transformers)
from tests.model.test_packed_attention import packed_equals_unpacked

transformers = pytest.importorskip("transformers")

GLM_VARIANTS = {
    # GLM-4-9B-0414's features: GQA (32 q heads / 2 kv heads there), q / k / v biases, half of each head rotated
    # (8 of 16 dims here), four norms per block, untied
    "glm4-gqa-bias-untied": ("Glm4Config", "Glm4ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    # MQA, an explicit head_dim wider than hidden / heads (32 x 4 = 128 != 64), 3/4 of each head rotated (24 of 32),
    # no biases, tied
    "glm4-mqa-headdim-tied": ("Glm4Config", "Glm4ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, partial_rotary_factor=0.75, attention_bias=False,
        tie_word_embeddings=True, rope_theta=500.0)),
    # glm-4-9b-chat-hf: GlmForCausalLM, the same block without the two extra norms
    "glm-chat-gqa-untied": ("GlmConfig", "GlmForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
}


def glm_model(name: str, seed: int = 0):
    """A random Glm4ForCausalLM / GlmForCausalLM of the variant with N(0, 0.1) noise on every tensor (norms and
    biases leave their init values); special ids inside the tiny vocabulary (the configs' defaults are GLM-4's
    151,329 ...)."""
    config_cls, model_cls, extra = GLM_VARIANTS[name]
    config = getattr(transformers, config_cls)(**COMMON, **extra, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return random_model(getattr(transformers, model_cls), config, seed=seed)


checkpoint = families.variant_checkpoints(glm_model, GLM_VARIANTS)  # the family tests imported above run on it


def test_config_is_read_into_fields(checkpoint):
    name, path, _ = checkpoint
    cfg = read_config(path)
    assert (cfg.qkv_fused, cfg.mlp_fused, cfg.rope_interleaved, cfg.o_bias, cfg.mlp_bias, cfg.norm_eps) == \
        (False, True, True, False, False, 1.5625e-07)
    expect = {"glm4-gqa-bias-untied": dict(family="glm4", sandwich_norms=True, kv_heads=2, qkv_bias=True, rope_dim=8,
                                           tie_weights=False),
              "glm4-mqa-headdim-tied": dict(family="glm4", sandwich_norms=True, kv_heads=1, head_dim=32, qkv_bias=False,
                                            rope_dim=24, tie_weights=True, rope_theta=500.0),
              "glm-chat-gqa-untied": dict(family="glm", sandwich_norms=False, kv_heads=2, qkv_bias=True, rope_dim=8,
                                          tie_weights=False)}[name]
    assert {k: getattr(cfg, k) for k in expect} == expect


def test_batched_left_padded_generation_equals_one_by_one(checkpoint):
    """test_families' check on one variant: left padding shifts no rotation (the others share its code path)."""
    if checkpoint[0] != "glm4-gqa-bias-untied":
        pytest.skip("one GLM variant covers left-padded batches; greedy decoding runs on every variant")
    families.test_batched_left_padded_generation_equals_one_by_one(checkpoint)


def test_interleaved_rotation_is_glm_apply_rotary_pos_emb():
    """Our apply_rope with rope_interleaved on a half-rotated head is transformers' Glm4 apply_rotary_pos_emb
    (modeling_glm4.py:158-195) on the cos / sin its rotary embedding makes (:303-309, the halves layout), bitwise;
    the halves rotation (Llama's) is another function of the same inputs."""
    from transformers.models.glm4 import modeling_glm4

    from pipeline.model.gpt import apply_rope, rope_cos_sin

    inv = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))  # 8 rotary dims of a 16-wide head
    positions = torch.arange(7)[None]
    freqs = positions[..., None].float() * inv
    emb = torch.cat((freqs, freqs), dim=-1)
    q, k = torch.randn(2, 1, 3, 7, 16, generator=torch.Generator().manual_seed(0))
    want_q, want_k = modeling_glm4.apply_rotary_pos_emb(q, k, emb.cos(), emb.sin())
    rope = rope_cos_sin(inv, positions, torch.float32, interleaved=True)
    assert torch.equal(apply_rope(q, rope, True), want_q) and torch.equal(apply_rope(k, rope, True), want_k)
    halves = rope_cos_sin(inv, positions, torch.float32)
    assert (apply_rope(q, halves) - want_q).abs().max() > 1e-2


def test_lora_all_takes_the_fused_mlp_and_peft_loads_the_adapter(checkpoint, tmp_path):
    """lora_target: all on GLM-4 is LLaMA-Factory's find_all_linear_modules (model_utils/misc.py:28-52: every module
    whose class name has "Linear", lm_head excepted, by its last name part) on transformers' model: q_proj, k_proj,
    v_proj, o_proj, gate_up_proj, down_proj; one LoRA on the fused gate_up_proj as PEFT puts it. PEFT loads our
    adapter with our logits; merged and exported, transformers computes them again."""
    peft = pytest.importorskip("peft")
    if checkpoint[0] == "glm4-mqa-headdim-tied":
        pytest.skip("the untied variants of both classes cover the adapter; tied heads: test_families")
    cfg = families.assert_lora_all_is_llama_factorys(peft, checkpoint, tmp_path, {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                                 "gate_up_proj", "down_proj"})
    # one LoRA on the whole fused Linear: A (64 x 4) and B (4 x 2 x 96 rows), as PEFT's lora.Linear on gate_up_proj;
    # Llama's names are not GLM's
    assert trainable_params(cfg, "lora", 4, ["gate_up_proj"]) == cfg.n_layers * (64 * 4 + 4 * 2 * 96)
    with pytest.raises(UserError) as err:
        trainable_params(cfg, "lora", 4, ["gate_proj"])
    assert "'gate_proj' matches no module" in str(err.value) and "mlp.gate_up_proj" in str(err.value)


@pytest.mark.parametrize("name", ["glm4-gqa-bias-untied", "glm-chat-gqa-untied"])
def test_packed_rows_compute_each_example_as_transformers_alone(name, tmp_path):
    """neat_packing's promise on GLM: each example of a packed row (segment_ids, positions restarting at 0) has the
    logits transformers' Glm4ForCausalLM / GlmForCausalLM computes for it alone, so the interleaved rotation holds
    on the restarted positions."""
    ref = glm_model(name)
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    lengths = (5, 9, 3)
    x = ids(11, (1, sum(lengths)))
    segments = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])[None]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        packed = ours(x, segment_ids=segments, position_ids=positions)
        at = 0
        for n in lengths:
            want = ref(x[:, at:at + n]).logits
            assert torch.allclose(packed[:, at:at + n], want, atol=1e-4, rtol=0), (n, (packed[:, at:at + n] - want))
            at += n


def test_packed_examples_equal_unpacked_loss_and_gradients():
    """test_packed_attention's check (packed_equals_unpacked: logits, summed loss and every gradient of each packed
    example equal the example run alone, in training mode) on GLM-4-9B-0414's block in tiny widths: four norms,
    q / k / v biases, the fused gate_up_proj, half of each head rotated in adjacent pairs. 4,096 ids: with 512 the
    embedding's gradients differ from the unpacked run's by fp32 rounding beyond that check's tolerance (1.3e-6 on
    entries of 0, measured; Llama's block alike)."""
    cfg = PRESETS["glm-4-9b-0414"].replace(vocab_size=4096, context_length=64, emb_dim=64, n_layers=2, n_heads=4,
                                           n_kv_heads=2, ffn_dim=96, head_size=16)
    packed_equals_unpacked(GPTModel(cfg, seed=4).train(), cfg.vocab_size)


# ------------------------------------------------------------------------------------------------
# Presets: THUDM/GLM-4-9B-0414 and GLM-4-32B-0414's shapes
# ------------------------------------------------------------------------------------------------

GLM4_CONFIGS = {  # the hub's config.json shape keys (Glm4Config's defaults are GLM-4-9B's other shapes)
    "glm-4-9b-0414": dict(hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=2,
                          head_dim=128, intermediate_size=13696, vocab_size=151552, max_position_embeddings=32768,
                          rms_norm_eps=1e-05, partial_rotary_factor=0.5, attention_bias=True, rope_theta=10000.0,
                          tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338]),
    "glm-4-32b-0414": dict(hidden_size=6144, num_hidden_layers=61, num_attention_heads=48, num_key_value_heads=2,
                           head_dim=128, intermediate_size=23040, vocab_size=151552, max_position_embeddings=32768,
                           rms_norm_eps=1e-05, partial_rotary_factor=0.5, attention_bias=True, rope_theta=10000.0,
                           tie_word_embeddings=False, pad_token_id=151329, eos_token_id=[151329, 151336, 151338]),
}


@pytest.mark.parametrize("name, card", [("glm-4-9b-0414", 94), ("glm-4-32b-0414", 326)])
def test_glm4_preset_counts_equal_transformers_and_the_cards(name, card):
    """Counted by transformers on the meta device; the cards' 9.4B (9,400,279,040 by hand: two 151,552 x 4,096
    matrices and 40 blocks of 203,395,584) and 32B (32,566,487,552); the hub's config.json reads into the preset."""
    config = transformers.Glm4Config(**GLM4_CONFIGS[name])
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(config)
    assert count_params(PRESETS[name]) == sum(p.numel() for p in ref.parameters())
    assert round(count_params(PRESETS[name]) / 10**8) == card
    assert from_hf_config({**config.to_dict(), "architectures": ["Glm4ForCausalLM"]}) == PRESETS[name]


def test_absent_keys_take_glm_config_defaults(tmp_path):
    """A config.json that leaves out head_dim, partial_rotary_factor, attention_bias, rms_norm_eps and
    num_key_value_heads is read as GlmConfig / Glm4Config fills them (configuration_glm4.py:55-79): head_dim 128,
    half of it rotated, q / k / v biases, eps 1.5625e-7, 2 kv heads; transformers' model of it computes ours."""
    minimal = dict(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=96,
                   vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0)
    ref = random_model(transformers.Glm4ForCausalLM, transformers.Glm4Config(**minimal))
    ref.save_pretrained(tmp_path)
    raw = {**minimal, "architectures": ["Glm4ForCausalLM"], "model_type": "glm4"}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = read_config(tmp_path)
    assert (cfg.head_dim, cfg.rope_dim, cfg.qkv_bias, cfg.norm_eps, cfg.kv_heads) == (128, 64, True, 1.5625e-07, 2)
    x = ids(3, (1, 10))
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path).eval()(x), ref(x).logits, atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------------
# Bad input: one message naming the file and the key; what other classes cannot write
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, words", [
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor is 1.5; expected a number in (0, 1]"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported; expected 'silu' (SwiGLU)"),
    ({"model_type": "glm"}, "model_type 'glm' does not match architectures ['Glm4ForCausalLM']"),
])
def test_bad_glm_configs_name_file_and_key(tmp_path, changes, words):
    config = {**glm_model("glm4-gqa-bias-untied").config.to_dict(), "architectures": ["Glm4ForCausalLM"]}
    config.pop("rope_parameters")
    families.assert_config_refused(tmp_path, {**config, **changes}, words)


def test_other_classes_cannot_express_glm_blocks():
    """The exports say what each class lacks: Llama rotates halves and has two norms per block; GlmForCausalLM has
    no post norms; Glm4ForCausalLM's o_proj takes no bias."""
    from pipeline.model.families import check_exportable

    glm4 = PRESETS["glm-4-9b-0414"].replace(n_layers=2)
    assert check_exportable(glm4) == []
    llama = PRESETS["llama-3.2-1b"].replace(n_layers=2)
    assert check_exportable(llama.replace(rope_interleaved=True, sandwich_norms=True)) == [
        "LlamaForCausalLM cannot express rope_interleaved=True (it has False)",
        "LlamaForCausalLM cannot express sandwich_norms=True (it has False)"]
    assert check_exportable(glm4.replace(family="glm")) == ["GlmForCausalLM cannot express sandwich_norms=True (it has"
                                                            " False)"]
    assert check_exportable(glm4.replace(o_bias=True)) == ["Glm4ForCausalLM cannot express o_bias=True (it has"
                                                           " False)"]
