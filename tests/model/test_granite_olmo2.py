"""IBM Granite 3.x (GraniteForCausalLM) and AI2 OLMo 2 (Olmo2ForCausalLM) checkpoints written by transformers: logits,
padded batches, greedy decoding with and without the cache, the training loss, export, PEFT adapters, merging, the
presets' counts and bad input.

Golden values come from transformers 5.24 and PEFT 0.21. What the two differ in, read there:
- Granite (models/granite/modeling_granite.py): the embeddings times embedding_multiplier (GraniteModel.forward:
  `inputs_embeds = inputs_embeds * self.embedding_multiplier`, :388), the score scale attention_multiplier
  (GraniteAttention: `self.scaling = config.attention_multiplier`, :124) in place of 1 / sqrt(head_dim), each branch
  times residual_multiplier before its add (GraniteDecoderLayer.forward: `residual + hidden_states *
  self.residual_multiplier`, :275 and :280), the logits divided by logits_scaling (GraniteForCausalLM.forward, :489),
  q/k/v/o biased by attention_bias (:128-139), the MLP by mlp_bias (:210-212); GraniteConfig's defaults 1.0 for all
  four (configuration_granite.py:73-76).
- OLMo 2 (models/olmo2/modeling_olmo2.py): no input norm, the norms after each branch (Olmo2DecoderLayer.forward:
  `hidden_states = self.post_attention_layernorm(hidden_states); hidden_states = residual + hidden_states`, then the
  MLP's through post_feedforward_layernorm, :299-316), q_norm / k_norm RMSNorms over the whole q / k projection before
  the split into heads (Olmo2Attention: RMSNorm(num_attention_heads * head_dim) and RMSNorm(num_key_value_heads *
  head_dim), :213-214, applied at :228-229), a plain MLP without bias (:268-270); Olmo2Config's rms_norm_eps 1e-5
  (configuration_olmo2.py:87).
Tiny fp32 shapes (2 layers, width 64, test_families' COMMON); the multipliers far from 1 so that a model missing one
cannot pass. test_families' shared tests run here on these variants through this module's `checkpoint` fixture.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.config import PRESETS, count_params, model_tensors, read_config
from pipeline.model.gpt import GPTModel
from pipeline.model.weights import load_model, save_hf
from tests.acceptance.harness import random_model
from tests.model.test_families import (COMMON, assert_config_refused, ids, saved_variant,  # noqa: F401
                                       test_batched_left_padded_generation_equals_one_by_one,
                                       test_export_loads_in_auto_model,
                                       test_greedy_generation_equals_transformers_with_and_without_cache,
                                       test_kv_cache_holds_the_key_value_heads_only, test_logits_equal_transformers,
                                       test_padded_batch_logits_equal_transformers,
                                       test_peft_loads_our_adapter_and_merge_matches)

transformers = pytest.importorskip("transformers")

# Granite-3.3-8B's multipliers are 12 / 2^-7 / 0.22 / 16; here others as far from 1 (a score scale of 0.05 is not
# 1 / sqrt(16) = 0.25)
GRANITE_MULTIPLIERS = dict(embedding_multiplier=6.0, attention_multiplier=0.05, residual_multiplier=0.3,
                           logits_scaling=4.0)
VARIANTS = {
    # Granite 3.x's shape of features: GQA, the four multipliers; biases on q/k/v/o and the MLP (attention_bias /
    # mlp_bias: off in the released checkpoints, read all the same). Untied: a tied random model whose embeddings
    # are scaled by 6 decodes one token over and over (measured), which would test nothing; the released checkpoints'
    # tying is the preset's and the CLI test's
    "granite-multipliers-bias": ("GraniteConfig", "GraniteForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
        **GRANITE_MULTIPLIERS)),
    # OLMo 2's: post-branch norms, whole-projection q/k norms of different widths (GQA: 64 and 32), untied
    "olmo2-gqa-untied": ("Olmo2Config", "Olmo2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500000.0)),
}


def hf_model(name: str, seed: int = 0):
    """A random transformers model of the variant, N(0, 0.1) noise on every tensor; special ids in the tiny
    vocabulary (Olmo2Config's defaults are OLMo's 50279 / 1)."""
    config_cls, model_cls, extra = VARIANTS[name]
    config = getattr(transformers, config_cls)(**COMMON, **extra, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return random_model(getattr(transformers, model_cls), config, seed=seed)


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """(variant, directory, transformers model) saved with save_pretrained."""
    return saved_variant(request.param, hf_model(request.param), tmp_path_factory)


def test_config_is_read_into_fields(checkpoint):
    name, path, _ = checkpoint
    cfg = read_config(path)
    expect = {"granite-multipliers-bias": dict(
        family="granite", kv_heads=2, tie_weights=False, qkv_bias=True, o_bias=True, mlp_bias=True, qk_norm=False,
        post_norm=False, attention_scale=0.05, **GRANITE_MULTIPLIERS),
        "olmo2-gqa-untied": dict(
            family="olmo2", kv_heads=2, tie_weights=False, qkv_bias=False, o_bias=False, mlp_bias=False, qk_norm=True,
            qk_norm_projection=True, post_norm=True, norm_eps=1e-5, attention_scale=16 ** -0.5,
            embedding_multiplier=1.0, attention_multiplier=None, residual_multiplier=1.0, logits_scaling=1.0)}[name]
    assert {k: getattr(cfg, k) for k in expect} == expect
    # layout(cfg) is the module tree: names and shapes, OLMo 2's norms where transformers has them
    model = GPTModel(cfg, seed=0)
    assert [(t.name, t.shape) for t in model_tensors(cfg)] == [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    names = {n for n, _ in model.named_parameters()}
    assert ("layers.0.input_layernorm.weight" in names) == (name.startswith("granite"))
    assert ("layers.0.post_feedforward_layernorm.weight" in names) == (name.startswith("olmo2"))


def test_the_loss_equals_transformers_loss_on_a_labelled_batch(checkpoint):
    """The training loss (mean) and the evaluation's (sum, count, with the argmax tokens) over Granite's scaled logits:
    transformers' `loss` (ForCausalLMLoss shifts the labels itself; ours come shifted) on a batch with ignored
    positions, and its argmax over logits / logits_scaling."""
    _, path, ref = checkpoint
    ours = load_model(path).eval()
    x = ids(11, (2, 12))
    labels = x.clone()
    labels[0, :4] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        out = ref(x, labels=labels)
        mean = ours(x, labels=shifted)
        total, count, predicted = ours(x, labels=shifted, reduction="sum", predict=True)
    assert torch.allclose(mean, out.loss, atol=1e-5, rtol=0), (mean, out.loss)
    assert count == int((shifted != -100).sum()) and torch.allclose(total / count, out.loss, atol=1e-5, rtol=0)
    assert predicted.tolist() == out.logits[shifted != -100].argmax(-1).tolist()


def test_lora_all_is_llama_factorys_find_all_linear_modules(checkpoint):
    """lora_target: all is LLaMA-Factory's find_all_linear_modules (model_utils/misc.py:28-52) on transformers'
    model: the seven Linears of Llama's block in both families (OLMo 2's norms are no Linears)."""
    from pipeline.model.config import lora_target_modules

    _, path, ref = checkpoint
    found = {n.split(".")[-1] for n, m in ref.named_modules() if "lm_head" not in n and "Linear" in type(m).__name__}
    assert found == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    cfg = read_config(path)
    assert {m.name.rsplit(".", 1)[-1] for m in lora_target_modules(cfg, "all")} == found


# ------------------------------------------------------------------------------------------------
# Presets: granite-3.3-8b and olmo-2-7b
# ------------------------------------------------------------------------------------------------

PRESET_CONFIGS = {  # the hub's config.json shape keys
    # ibm-granite/granite-3.3-8b-instruct
    "granite-3.3-8b": ("GraniteConfig", dict(
        hidden_size=4096, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, intermediate_size=12800,
        vocab_size=49159, max_position_embeddings=131072, rope_theta=10000000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, embedding_multiplier=12.0, attention_multiplier=0.0078125, residual_multiplier=0.22,
        logits_scaling=16.0)),
    # allenai/OLMo-2-1124-7B
    "olmo-2-7b": ("Olmo2Config", dict(
        hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=100352, max_position_embeddings=4096, rope_theta=500000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name, architecture, card", [("granite-3.3-8b", "GraniteForCausalLM", 817),
                                                      ("olmo-2-7b", "Olmo2ForCausalLM", 73)])
def test_preset_counts_equal_transformers_and_the_cards(name, architecture, card):
    """Counted by transformers on the meta device; the cards' 8.17B (granite-3.3-8b-instruct: 8,170,864,640 by hand,
    the tied head once) and 7.3B (OLMo-2-1124-7B: 7,298,617,344); the hub's config.json read is the preset."""
    from pipeline.model.config import from_hf_config

    config_cls, kw = PRESET_CONFIGS[name]
    config = getattr(transformers, config_cls)(**kw)
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(config)
    assert count_params(PRESETS[name]) == sum(p.numel() for p in ref.parameters())
    assert count_params(PRESETS[name]) == {"granite-3.3-8b": 8_170_864_640, "olmo-2-7b": 7_298_617_344}[name]
    assert round(count_params(PRESETS[name]) / 10 ** (7 if card > 100 else 8)) == card
    assert from_hf_config({**config.to_dict(), "architectures": [architecture]}) == PRESETS[name]


# ------------------------------------------------------------------------------------------------
# Bad input and what the other classes cannot express
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes, words", [
    ({"logits_scaling": 0}, "logits_scaling is 0; expected a positive number"),
    ({"embedding_multiplier": "12"}, "embedding_multiplier is '12'; expected a positive number"),
])
def test_bad_granite_configs_name_file_and_key(tmp_path, changes, words):
    assert_config_refused(tmp_path, {**hf_model("granite-multipliers-bias").config.to_dict(),
                                     "architectures": ["GraniteForCausalLM"], **changes}, words)


def test_a_granite_config_without_multipliers_takes_graniteconfigs_defaults(tmp_path):
    """GraniteConfig's default attention_multiplier is 1.0, not 1 / sqrt(head_dim): a config.json without the four
    keys runs as transformers runs it."""
    ref = random_model(transformers.GraniteForCausalLM, transformers.GraniteConfig(
        **COMMON, num_attention_heads=4, bos_token_id=1, eos_token_id=2, pad_token_id=0))
    ref.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for key in GRANITE_MULTIPLIERS:
        config.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = read_config(tmp_path)
    assert (cfg.attention_scale, cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling) == (1, 1, 1, 1)
    x = ids(3)
    with torch.no_grad():
        assert torch.allclose(load_model(tmp_path).eval()(x), ref(x).logits, atol=1e-4, rtol=0)


def test_other_classes_cannot_express_the_multipliers_or_olmo2s_norms():
    from pipeline.model.families import check_exportable

    llama = PRESETS["llama-3.2-1b"].replace(n_layers=2)
    assert check_exportable(llama.replace(logits_scaling=2.0, attention_multiplier=0.1)) == [
        "LlamaForCausalLM cannot express attention_multiplier=0.1 (it has None)",
        "LlamaForCausalLM cannot express logits_scaling=2.0 (it has 1.0)"]
    assert check_exportable(llama.replace(post_norm=True)) == ["LlamaForCausalLM cannot express post_norm=True (it has"
                                                               " False)"]
    assert check_exportable(PRESETS["qwen3-0.6b"].replace(n_layers=2, qk_norm_projection=True)) == [
        "Qwen3ForCausalLM cannot express qk_norm_projection=True (it has False)"]
    assert check_exportable(PRESETS["granite-3.3-8b"].replace(n_layers=2)) == []
    assert check_exportable(PRESETS["olmo-2-7b"].replace(n_layers=2)) == []


def test_a_granite_reward_model_is_refused_at_export(tmp_path):
    """transformers 5.24 has no GraniteForSequenceClassification (modeling_granite.py's __all__ lists the causal LM
    only), so a stage rm Granite cannot be written as transformers would read it: one message naming why."""
    cfg = PRESETS["granite-3.3-8b"].replace(n_layers=1, emb_dim=64, n_heads=4, n_kv_heads=2, ffn_dim=96,
                                            vocab_size=128, num_labels=1)
    with pytest.raises(UserError) as err:
        save_hf(GPTModel(cfg, seed=0), tmp_path / "out")
    assert "no sequence-classification class for this GraniteForCausalLM (model_type granite)" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_an_olmo2_reward_model_exports_as_olmo2forsequenceclassification(tmp_path):
    """Stage rm's model on OLMo 2: our score head over the post-norm decoder, exported, is transformers'
    Olmo2ForSequenceClassification (modeling_olmo2.py:488, GenericForSequenceClassification: score at the rightmost
    token that is not pad_token_id), the same score for each row."""
    from pipeline.model.reward import sequence_scores

    path = tmp_path / "base"
    hf_model("olmo2-gqa-untied").save_pretrained(path)
    ours = load_model(path, cfg=read_config(path).replace(num_labels=1), seed=5).eval()
    with torch.no_grad():
        ours.score.weight.mul_(20)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(
        save_hf(ours, tmp_path / "merged", special={"pad_token_id": 0, "eos_token_id": 2})).eval()
    assert type(theirs).__name__ == "Olmo2ForSequenceClassification"
    x = torch.tensor([[5, 9, 11, 3, 0, 0], [5, 9, 7, 12, 13, 14]])
    with torch.no_grad():
        assert torch.allclose(sequence_scores(ours(x), x, 0), theirs(x).logits[:, 0], atol=1e-5, rtol=0)

