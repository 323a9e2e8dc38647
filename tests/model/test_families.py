"""Llama 3, Qwen2, Qwen3 and Mistral checkpoints written by transformers: logits, greedy decoding (cached, uncached,
batched with left padding), export back to the HF layout, PEFT adapters and merging, and bad input.

Every golden value comes from transformers / PEFT. Tiny shapes (2 layers, width 64) with the features that
distinguish the families: GQA and MQA, Llama 3.1's rope scaling, Qwen2's q/k/v biases, Qwen3's explicit
head_dim and q/k norms, sliding windows shorter than the sequences here (Mistral v0.1's in every layer, Qwen2's
from max_window_layers on, Qwen3's where layer_types says), tied and untied heads,
Qwen3-MoE's sparse blocks (4 experts, top-2, renormalised; a window in every layer under use_sliding_window).
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.config import PRESETS, active_params, count_params, read_config, trainable_params
from pipeline.model.generate import generate
from pipeline.model.gpt import GPTModel
from pipeline.model.lora import apply_lora, load_adapter, lora_modules, merge_lora, save_adapter
from pipeline.model.weights import load_model, save_hf

transformers = pytest.importorskip("transformers")

VOCAB = 512
COMMON = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=VOCAB, max_position_embeddings=256)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}

VARIANTS = {
    # GQA (8 query heads share 2 key/value heads), Llama 3.1 rope scaling, untied head
    "llama-gqa-llama3-untied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=8, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_SCALING,
        tie_word_embeddings=False)),
    # MQA, tied head
    "llama-mqa-tied": ("LlamaConfig", "LlamaForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True)),
    # q/k/v biases, GQA, tied (Qwen2.5 0.5B / 1.5B); use_sliding_window: layer 1 (from max_window_layers on) attends
    # to the last 5 positions, layer 0 to all
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0, tie_word_embeddings=True,
        use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    # head_dim 32 x 4 heads = 128 != width 64, per-head q/k RMSNorm, untied; a 4-position window in layer 0 only
    # (layer_types: a pattern max_window_layers cannot say)
    "qwen3-headdim-qknorm": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=4, layer_types=["sliding_attention", "full_attention"])),
    # no biases anywhere, GQA, a sliding window in every layer (Mistral-7B-v0.1: 4096 of 32,768 positions) shorter
    # than the sequences here, untied
    "mistral-window": ("MistralConfig", "MistralForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, sliding_window=6, tie_word_embeddings=False)),
    # Qwen3-30B-A3B's block: Qwen3's attention (head_dim, q/k norms) and a sparse MoE MLP in every layer: a router
    # over 4 experts of width 32, top-2, weights renormalised (norm_topk_prob); untied;
    # use_sliding_window: a 5-position window in every layer (Qwen3MoeConfig has no max_window_layers)
    "moe-qwen3-top2": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, norm_topk_prob=True, tie_word_embeddings=False,
        use_sliding_window=True, sliding_window=5)),
}


def hf_model(name: str, seed: int = 0):
    """A random transformers model of the variant; every tensor gets N(0, 0.1) noise so that biases and norms
    leave their init values (a loader that skipped them could not pass) and greedy decoding stays varied."""
    config_cls, model_cls, extra = VARIANTS[name]
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def saved_variant(name: str, model, tmp_path_factory):
    """(name, directory, model): `model` saved with save_pretrained in a fresh folder named after the variant; the
    `checkpoint` fixtures' value, on which the family tests run (here and in the modules importing them)."""
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return name, path, model


def variant_checkpoints(make, names):
    """A module-scoped `checkpoint` fixture over the variant `names`: (variant, directory, transformers model) with
    make(variant) saved by save_pretrained. The family tests here run on any module's fixture of that name."""
    @pytest.fixture(scope="module", params=list(names))
    def checkpoint(request, tmp_path_factory):
        return saved_variant(request.param, make(request.param), tmp_path_factory)

    return checkpoint


checkpoint = variant_checkpoints(hf_model, VARIANTS)


def ids(seed=0, shape=(2, 12)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def test_config_is_read_into_fields(checkpoint):
    name, path, _ = checkpoint
    cfg = read_config(path)
    assert cfg.norm == "rmsnorm" and cfg.positions == "rope" and cfg.mlp == "swiglu" and not cfg.qkv_fused
    expect = {"llama-gqa-llama3-untied": dict(family="llama", kv_heads=2, tie_weights=False, qkv_bias=False),
              "llama-mqa-tied": dict(family="llama", kv_heads=1, tie_weights=True),
              "qwen2-bias-tied": dict(family="qwen2", qkv_bias=True, o_bias=False, tie_weights=True,
                                      layer_windows=(None, 5)),
              "qwen3-headdim-qknorm": dict(family="qwen3", head_dim=32, qk_norm=True, qkv_bias=False,
                                           layer_windows=(4, None)),
              "mistral-window": dict(family="mistral", kv_heads=2, qkv_bias=False, o_bias=False, mlp_bias=False,
                                     layer_windows=(6, 6), tie_weights=False),
              "moe-qwen3-top2": dict(family="qwen3_moe", head_dim=32, qk_norm=True, n_experts=4, experts_per_token=2,
                                     moe_ffn_dim=32, norm_topk_prob=True, mlp_only_layers=(), tie_weights=False,
                                     layer_windows=(5, 5))}[name]
    assert {k: getattr(cfg, k) for k in expect} == expect
    if name.startswith("llama-gqa"):
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["type"] == "llama3"


def test_logits_equal_transformers(checkpoint):
    name, path, ref = checkpoint
    ours = load_model(path).eval()
    x = ids()
    with torch.no_grad():
        want = ref(x).logits
        got = ours(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    # the parameter count of the model and of the torch-free layout agree with transformers'
    assert count_params(ours.cfg) == sum(p.numel() for p in ref.parameters())
    assert (ours.lm_head.weight is ours.embed_tokens.weight) == ours.cfg.tie_weights


def test_padded_batch_logits_equal_transformers(checkpoint):
    """A batch with an attention mask, rows longer than the sliding windows: left padding (generate's) and right
    padding (training's); the real positions' logits equal transformers' on the same ids and mask."""
    name, path, ref = checkpoint
    ours = load_model(path).eval()
    x = ids(16, (2, 14))
    left = torch.tensor([[0] * 3 + [1] * 11, [1] * 14])
    for mask in (left, left.flip(1)):
        with torch.no_grad():
            want = ref(x, attention_mask=mask).logits
            got = ours(x, attention_mask=mask)
        real = mask.bool()
        assert torch.allclose(got[real], want[real], atol=1e-4, rtol=0), (got[real] - want[real]).abs().max()


def test_greedy_generation_equals_transformers_with_and_without_cache(checkpoint):
    _, path, ref = checkpoint
    assert_greedy_equals_transformers(ref, load_model(path).eval(), ids(1, (1, 9))[0].tolist(), 16)


def assert_greedy_equals_transformers(ref, ours, prompt: list[int], new: int) -> None:
    """transformers' greedy generate of `new` tokens (no EOS), a varied continuation, is ours cached and uncached."""
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    assert len(set(expected)) > 3  # a varied continuation
    assert generate(ours, prompt, max_new_tokens=new, eos_id=None) == expected
    assert generate(ours, prompt, max_new_tokens=new, eos_id=None, use_cache=False) == expected


def test_batched_left_padded_generation_equals_one_by_one(checkpoint):
    name, path, _ = checkpoint
    if name in ("llama-mqa-tied", "moe-qwen3-top2"):
        pytest.skip("the other variants cover GQA and MHA-free heads; MoE routing is per token, whatever the batch")
    ours = load_model(path).eval()
    prompts = [ids(2, (1, 4))[0].tolist(), ids(3, (1, 11))[0].tolist(), ids(4, (1, 7))[0].tolist()]
    alone = [generate(ours, p, max_new_tokens=8, eos_id=None) for p in prompts]
    assert generate(ours, prompts, max_new_tokens=8, eos_id=None) == alone
    assert generate(ours, prompts, max_new_tokens=8, eos_id=None, use_cache=False) == alone


def test_kv_cache_holds_the_key_value_heads_only(checkpoint):
    _, path, _ = checkpoint
    ours = load_model(path).eval()
    _, past = ours(ids(5, (1, 6)), use_cache=True)
    window = ours.layers[0].window  # a sliding-window layer keeps its last window - 1 positions only
    kept = 6 if window is None else min(6, window - 1)
    assert past[0][0].shape == (1, ours.cfg.kv_heads, kept, ours.cfg.head_dim)


def test_export_loads_in_auto_model(checkpoint, tmp_path):
    name, path, ref = checkpoint
    ours = load_model(path).eval()
    save_hf(ours, tmp_path / "out", special={"bos_token_id": 1, "eos_token_id": [2, 3], "pad_token_id": 0})
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [type(ref).__name__] and config["eos_token_id"] == 2
    assert json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"] == [2, 3]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back) is type(ref)
    x = ids(6)
    with torch.no_grad():
        assert torch.allclose(back(x).logits, ref(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset, windows, words", [
    ("llama-3.2-1b", (8, None), "LlamaForCausalLM cannot express layer_windows [8, None] (its sliding windows: none)"),
    ("mistral-7b", (8, None), "MistralForCausalLM cannot express layer_windows [8, None] (its sliding windows: one"
                              " sliding_window in every layer)"),
    ("qwen3-0.6b", (8, 4), "Qwen3ForCausalLM cannot express layer_windows [8, 4] (its sliding windows: one"
                           " sliding_window, in the layers layer_types names)"),
])
def test_windows_the_architecture_cannot_express_are_named(preset, windows, words):
    from pipeline.model.families import check_exportable

    assert check_exportable(PRESETS[preset].replace(n_layers=2, layer_windows=windows)) == [words]
    assert check_exportable(PRESETS[preset].replace(n_layers=2, layer_windows=(8, 8) if preset != "llama-3.2-1b"
                                                    else ())) == []


def randomise_lora(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wrapper in lora_modules(model).values():
            if hasattr(wrapper, "lora"):  # an expert's up_proj reads its gate_proj's pair (LinearWithFusedLoRA)
                wrapper.lora.B.copy_(torch.randn(wrapper.lora.B.shape, generator=gen) * 0.1)


def assert_adapter_agrees(peft, ours, path, directory, x):
    """PEFT (base + our adapter/) computes what we compute, and the adapter changes the output; our own loader
    reads it back to the same model; merged and exported, transformers computes the same again."""
    base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    tuned = peft.PeftModel.from_pretrained(base, directory).eval()
    with torch.no_grad():
        want = tuned(x).logits
        got = ours(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert (got - load_model(path).eval()(x)).abs().max() > 1e-2
    again = load_model(path).eval()
    load_adapter(again, directory)
    assert torch.equal(again(x), got)
    merge_lora(again)
    save_hf(again, directory.parent / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(directory.parent / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(x).logits, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("targets,extra", [("all", None), (["q_proj", "v_proj", "down_proj"], ["norm"])])
def test_peft_loads_our_adapter_and_merge_matches(checkpoint, tmp_path, targets, extra):
    peft = pytest.importorskip("peft")
    name, path, _ = checkpoint
    if extra and name != "qwen3-headdim-qknorm":
        pytest.skip("the additional_target case runs on one family")
    ours = load_model(path).eval()
    apply_lora(ours, targets, rank=4, alpha=8, additional_targets=extra)
    randomise_lora(ours, seed=1)
    if extra:
        with torch.no_grad():
            ours.norm.weight.mul_(1.5)
    save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(path)})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is False
    if targets == "all" and ours.cfg.n_experts:  # LLaMA-Factory's find_all_linear_modules on transformers 5: the
        # experts (fused 3-D tensors) and the router (Qwen3MoeTopKRouter) are no Linear modules there
        assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj"])
    elif targets == "all":
        assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"])
    else:
        assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
        # PEFT's modules_to_save rule (a plain name ending): 'norm' is model.norm and each block's four norms
        blocks = [f"model.layers.{i}.{m}" for i in range(ours.cfg.n_layers) for m in
                  ("input_layernorm", "self_attn.q_norm", "self_attn.k_norm", "post_attention_layernorm")]
        assert config["modules_to_save"] == blocks + ["model.norm"]
    assert_adapter_agrees(peft, ours, path, tmp_path / "adapter", ids(7))


def assert_lora_all_is_llama_factorys(peft, checkpoint, tmp_path, names: set[str]) -> Any:
    """lora_target: all is LLaMA-Factory's find_all_linear_modules (model_utils/misc.py:28-52: every module whose
    class name has "Linear", lm_head excepted, by its last name part) on transformers' model, here `names`, one LoRA
    per (fused) Linear as PEFT puts it; PEFT loads our adapter with our logits, merged and exported transformers
    computes them again (assert_adapter_agrees), and plan's count is the model's. Returns our ModelConfig."""
    name, path, ref = checkpoint
    found = {n.split(".")[-1] for n, m in ref.named_modules()
             if "lm_head" not in n and "Linear" in type(m).__name__ and "Embedding" not in type(m).__name__}
    assert found == names
    ours = load_model(path).eval()
    apply_lora(ours, "all", rank=4, alpha=8)
    randomise_lora(ours, seed=1)
    save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(path)})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == sorted(found)
    assert_adapter_agrees(peft, ours, path, tmp_path / "adapter", ids(7))
    cfg = read_config(path)
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == trainable_params(cfg, "lora", 4, "all")
    return cfg


def assert_config_refused(tmp_path, config: dict, words: str) -> None:
    """`config` written as tmp_path/config.json is refused by read_config with a message naming that file and
    holding `words`."""
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        read_config(tmp_path)
    assert any(m.startswith(f"{tmp_path / 'config.json'}: ") and words in m for m in err.value.messages), \
        err.value.messages


def perturb_trainable(model, seed=2):
    """Random LoRA B and noise on every weight trained in full (a tied matrix once: parameters() de-duplicates)."""
    randomise_lora(model, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ".lora." not in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("extra", ["embed_tokens,lm_head", ["lm_head"], ["embed_tokens"]])
def test_embedding_and_head_trained_in_full_load_in_peft_and_merge(checkpoint, tmp_path, extra):
    """additional_target naming the embedding, the head or both (LLaMA-Factory's comma string for new tokens).
    A tied head is the embedding's matrix, so training either trains both: the adapter must tell PEFT so
    (ensure_weight_tying), else PEFT keeps the head on the base embedding and computes another model."""
    peft = pytest.importorskip("peft")
    name, path, _ = checkpoint
    tied = read_config(path).tie_weights
    if not tied and extra != "embed_tokens,lm_head":
        pytest.skip("an untied head is an ordinary module: one case covers it")
    if name == "moe-qwen3-top2":
        pytest.skip("the untied Qwen3 and Mistral variants cover an untied pair; the MoE adapter tests cover PEFT's MoE"
                    " conversion")
    ours = load_model(path).eval()
    apply_lora(ours, ["q_proj"], rank=4, alpha=8, additional_targets=extra)
    assert ours.lm_head.weight.requires_grad and ours.embed_tokens.weight.requires_grad == (tied or "embed" in extra)
    perturb_trainable(ours)
    save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(path)})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.embed_tokens", "lm_head"]
    assert config.get("ensure_weight_tying", False) is tied
    assert_adapter_agrees(peft, ours, path, tmp_path / "adapter", ids(8))


@pytest.mark.parametrize("modules", [["lm_head"], ["embed_tokens"]])
def test_a_peft_adapter_training_the_head_or_embedding_loads(checkpoint, tmp_path, modules):
    """Written by PEFT itself. On a tied model PEFT ties the pair only with ensure_weight_tying; without it the
    adapter unties them, which a tied model cannot compute: refused, unless tie_word_embeddings: false (whose
    head starts as a copy of the embedding) loads it as PEFT does."""
    peft = pytest.importorskip("peft")
    name, path, _ = checkpoint
    cfg = read_config(path)
    x = ids(9)
    for ensure in ([True, False] if cfg.tie_weights else [False]):
        base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=list(modules),
                                 ensure_weight_tying=ensure)
        tuned = peft.get_peft_model(base, config)
        torch.manual_seed(3)
        with torch.no_grad():
            for p in tuned.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.1)
        directory = tmp_path / f"adapter_{ensure}"
        tuned.save_pretrained(directory)
        with torch.no_grad():
            want = tuned.eval()(x).logits
        ours = load_model(path).eval()
        if cfg.tie_weights and not ensure:
            with pytest.raises(UserError) as err:
                load_adapter(ours, directory)
            assert len(err.value.messages) == 1 and "tie_word_embeddings: false" in err.value.messages[0]
            assert "ensure_weight_tying" in err.value.messages[0]
            ours = load_model(path, cfg=dataclasses.replace(cfg, tie_weights=False)).eval()
        load_adapter(ours, directory)
        assert torch.allclose(ours(x), want, atol=1e-4, rtol=0)


def test_lora_targets_use_the_family_names(checkpoint):
    _, path, _ = checkpoint
    cfg = read_config(path)
    with pytest.raises(UserError) as err:
        trainable_params(cfg, "lora", 4, ["c_attn"])
    assert "'c_attn' matches no module" in str(err.value) and "self_attn.q_proj" in str(err.value)
    model = GPTModel(cfg, seed=0)
    one = "layers.1.self_attn.o_proj" if cfg.n_experts else "layers.1.mlp.gate_proj"
    wrapped = apply_lora(model, ["q_proj", one], rank=2)
    assert wrapped == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj", one]
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == \
        trainable_params(cfg, "lora", 2, ["q_proj", one])


# ------------------------------------------------------------------------------------------------
# Presets: the published shapes, lazily sized positions
# ------------------------------------------------------------------------------------------------

SEVEN_B = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, tie_word_embeddings=False)
PRESET_CONFIGS = {
    "llama-3.2-1b": ("LlamaConfig", dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                                         tie_word_embeddings=True)),
    "llama-3.1-8b": ("LlamaConfig", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                                         num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                                         tie_word_embeddings=False)),
    # Llama-2-7b-hf's and Mistral-7B-v0.3's config.json (LlamaConfig's and MistralConfig's own defaults are
    # Llama-2-7B's and Mistral-7B-v0.1's shapes; v0.1 has 32,000 ids)
    "llama-2-7b": ("LlamaConfig", dict(SEVEN_B, num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)),
    "mistral-7b": ("MistralConfig", dict(SEVEN_B, num_key_value_heads=8, intermediate_size=14336, vocab_size=32768)),
    "qwen2.5-0.5b": ("Qwen2Config", dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936,
                                         tie_word_embeddings=True)),
    "qwen2.5-7b": ("Qwen2Config", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                       tie_word_embeddings=False)),
    "qwen3-0.6b": ("Qwen3Config", dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                                       num_key_value_heads=8, head_dim=128, intermediate_size=3072,
                                       vocab_size=151936, tie_word_embeddings=True)),
    "qwen3-8b": ("Qwen3Config", dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                                     num_key_value_heads=8, head_dim=128, intermediate_size=12288,
                                     vocab_size=151936, tie_word_embeddings=False)),
    # Qwen/Qwen3-30B-A3B's config.json
    "qwen3-30b-a3b": ("Qwen3MoeConfig", dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
                                             num_key_value_heads=4, head_dim=128, intermediate_size=6144,
                                             moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                                             norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960,
                                             tie_word_embeddings=False)),
}


@pytest.mark.parametrize("name", list(PRESET_CONFIGS))
def test_preset_parameter_counts_equal_transformers(name):
    """The published totals (Llama 3.2 1B: 1,235,814,400; Qwen3-0.6B: 596,049,920; Llama-2-7B: 6,738,415,616; Mistral
    7B v0.3: 7,248,023,552 ...) counted by transformers on the meta device (no memory)."""
    config_cls, kw = PRESET_CONFIGS[name]
    config = getattr(transformers, config_cls)(**kw)
    with torch.device("meta"):
        ref = transformers.AutoModelForCausalLM.from_config(config)
    assert count_params(PRESETS[name]) == sum(p.numel() for p in ref.parameters())


def test_qwen3_30b_a3b_has_the_published_total_and_active_parameters():
    """Qwen3-30B-A3B's model card: 30.5B parameters in total, 3.3B activated (8 of 128 experts per block; the
    embedding and head count, as the card's figures do: 30,532,122,624 and 3,353,032,704 by hand, 3.3B as the card
    truncates it)."""
    cfg = PRESETS["qwen3-30b-a3b"]
    from pipeline.model.config import from_hf_config

    config = transformers.Qwen3MoeConfig(**PRESET_CONFIGS["qwen3-30b-a3b"][1], rope_theta=1e6)
    assert from_hf_config({**config.to_dict(), "architectures": ["Qwen3MoeForCausalLM"]}) == cfg
    assert count_params(cfg) == 30_532_122_624 and active_params(cfg) == 3_353_032_704
    assert (count_params(cfg) // 10**8, active_params(cfg) // 10**8) == (305, 33)


def test_rope_positions_allocate_nothing_at_load():
    cfg = PRESETS["llama-3.2-1b"].replace(n_layers=1, vocab_size=256, emb_dim=64, n_heads=4, n_kv_heads=2,
                                          ffn_dim=128)
    assert cfg.context_length == 131072
    model = GPTModel(cfg, seed=0)
    sizes = [t.numel() for t in list(model.parameters()) + list(model.buffers())]
    assert max(sizes) < 131072 and sum(sizes) < 100_000
    out = model(torch.tensor([[1, 2, 3]]), position_ids=torch.tensor([[131069, 131070, 131071]]))
    assert torch.isfinite(out).all()


# ------------------------------------------------------------------------------------------------
# Bad input: one message naming the file and the key
# ------------------------------------------------------------------------------------------------

def write_config(tmp_path, **changes):
    config = hf_model("qwen2-bias-tied").config.to_dict()
    config.update(changes)
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path / "config.json"


@pytest.mark.parametrize("changes,words", [
    ({"architectures": ["FalconForCausalLM"]},
     "architectures ['FalconForCausalLM'] is not supported; supported architectures: GPT2LMHeadModel, "
     "LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, MistralForCausalLM"),
    ({"num_key_value_heads": 3}, "num_attention_heads 4 is not divisible by num_key_value_heads 3"),
    ({"rope_parameters": {"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e6}},
     "rope_parameters.rope_type 'longrope' is not implemented; supported: default, linear, dynamic, llama3, yarn"),
    # an edit of rope_scaling in a config.json that also has rope_parameters (as our merged/ does): transformers
    # runs it, so it is refused, not read past
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
      "rope_scaling": {"type": "longrope", "factor": 2.0}},
     "rope_scaling.rope_type 'longrope' is not implemented"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"use_sliding_window": True, "sliding_window": 0, "max_window_layers": 1, "layer_types": None},
     "sliding_window is 0; expected a positive integer or null"),
])
def test_bad_configs_name_file_and_key(tmp_path, changes, words):
    assert_config_refused(tmp_path, json.loads(write_config(tmp_path, **changes).read_text()), words)


@pytest.mark.parametrize("max_window_layers, windows", [(1, (None, 4)), (2, ())])
def test_qwen2_config_without_layer_types_slides_from_max_window_layers(tmp_path, max_window_layers, windows):
    """A Qwen2.5 config.json as the hub has it (written before transformers had layer_types): Qwen2Config gives
    sliding-window attention to the layers from max_window_layers on (__post_init__); max_window_layers >=
    num_hidden_layers is the plain full-attention model. Golden: transformers on the same folder, 24 positions
    past the window."""
    config = transformers.Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                                      sliding_window=4, max_window_layers=max_window_layers)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # as hf_model: a window that did cut would show in the logits
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    del written["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(written))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert ref.config.layer_types == ["sliding_attention" if w else "full_attention" for w in windows or (None, None)]
    ours = load_model(tmp_path).eval()
    assert ours.cfg.layer_windows == windows
    x = ids(12, (1, 24))
    with torch.no_grad():
        want = ref(x).logits
        got = ours(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


def test_llama_ignores_the_sliding_window_keys_as_transformers_does(tmp_path):
    """LlamaForCausalLM has no sliding-window layers: the keys (left by a conversion) change nothing there."""
    config = {**transformers.LlamaConfig(**COMMON, num_attention_heads=4).to_dict(),
              "architectures": ["LlamaForCausalLM"], "use_sliding_window": True, "sliding_window": 16,
              "max_window_layers": 0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_config(tmp_path).n_layers == 2


def test_an_edited_rope_scaling_wins_over_rope_parameters_as_in_transformers(tmp_path):
    """Our merged config.json writes both rope spellings; transformers 5 takes a non-null rope_scaling first (theta
    from the top-level rope_theta) and 4 reads nothing else, so a user's edit of rope_scaling / rope_theta there
    (a llama3 factor, another theta) is what transformers runs, and must be what we run."""
    hf_model("llama-gqa-llama3-untied").save_pretrained(tmp_path / "base")
    save_hf(load_model(tmp_path / "base"), tmp_path / "merged")
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["rope_scaling"] and config["rope_parameters"]["factor"] == 8.0
    config["rope_scaling"]["factor"] = 2.0
    config["rope_theta"] = 100000.0
    (tmp_path / "merged" / "config.json").write_text(json.dumps(config))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (ref.config.rope_parameters["factor"], ref.config.rope_parameters["rope_theta"]) == (2.0, 100000.0)
    x = ids(11, (1, 96))  # past original_max_position_embeddings (32)
    with torch.no_grad():
        want = ref(x).logits
        got = load_model(tmp_path / "merged").eval()(x)
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("config_cls", ["LlamaConfig", "Qwen2Config", "Qwen3Config", "MistralConfig"])
def test_keys_a_config_leaves_out_take_the_transformers_defaults(tmp_path, config_cls):
    """A config.json without head_dim or max_position_embeddings means what transformers' config class makes of
    it (Qwen3Config: head_dim 128, not hidden_size / heads; Qwen2/3: 32,768 positions; Llama: 2,048; Mistral:
    131,072 and, without the key, a 4,096 sliding window)."""
    arch = config_cls.replace("Config", "ForCausalLM")
    config = {"architectures": [arch], "model_type": config_cls[:-6].lower(), "hidden_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96,
              "vocab_size": VOCAB}
    (tmp_path / "config.json").write_text(json.dumps(config))
    theirs = getattr(transformers, config_cls).from_pretrained(tmp_path)
    ours = read_config(tmp_path)
    assert (ours.head_dim, ours.context_length) == (theirs.head_dim if hasattr(theirs, "head_dim") else 16,
                                                    theirs.max_position_embeddings)
    if config_cls == "MistralConfig":
        assert ours.layer_windows == (theirs.sliding_window,) * 2 == (4096, 4096)


def test_a_tied_checkpoint_whose_config_lacks_tie_word_embeddings_names_the_key(tmp_path):
    """LlamaConfig's default is untied, so a tied model's config.json without the key asks for an lm_head.weight
    the files do not have; the message says which key is the likely cause."""
    hf_model("llama-mqa-tied").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["tie_word_embeddings"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as err:
        load_model(tmp_path)
    assert err.value.messages == [
        f"{tmp_path}: missing tensor 'lm_head.weight' (expected shape [{VOCAB}, 64]); the files hold the embedding"
        " 'embed_tokens.weight' of that shape, so the model is likely tied: set \"tie_word_embeddings\": true in"
        f" {tmp_path / 'config.json'} (its default is false)"]


def test_weights_that_do_not_fit_the_config_are_listed(tmp_path, checkpoint):
    name, path, ref = checkpoint
    if name != "qwen2-bias-tied":
        pytest.skip("one family is enough")
    from safetensors.torch import load_file, save_file

    state = load_file(path / "model.safetensors")
    state.pop("model.layers.1.self_attn.k_proj.bias")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)
    state["model.layers.0.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(UserError) as err:
        load_model(tmp_path)
    text = "\n".join(err.value.messages)
    assert "missing tensor 'layers.1.self_attn.k_proj.bias' (expected shape [32])" in text
    assert "model.safetensors: tensor 'layers.0.self_attn.q_proj.weight' has shape [3, 64], the model expects" \
           " [64, 64]" in text
    assert "unexpected tensor 'layers.0.extra.weight'" in text


# ------------------------------------------------------------------------------------------------
# Packing and activation checkpointing in the shared forward
# ------------------------------------------------------------------------------------------------

def test_segment_ids_attend_within_each_packed_sequence(checkpoint):
    name, path, _ = checkpoint
    if name == "moe-qwen3-top2":
        pytest.skip("packing is attention's; MoE routing is per token")
    model = load_model(path).eval()
    a, b = ids(8, (1, 5)), ids(9, (1, 7))
    packed = torch.cat([a, b], 1)
    segments = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        out = model(packed, segment_ids=segments, position_ids=positions)
        assert torch.allclose(out[:, :5], model(a), atol=1e-5)
        assert torch.allclose(out[:, 5:], model(b), atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients(checkpoint):
    name, path, _ = checkpoint
    if name != "qwen3-headdim-qknorm":
        pytest.skip("the mechanism is family-independent; one family is enough")
    model = load_model(path).train()
    x = ids(10)
    labels = x.roll(-1, 1)
    model(x, labels=labels).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_gradient_checkpointing(True)
    model(x, labels=labels).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, plain[n], atol=1e-6, rtol=1e-5), n


def test_fp16_logits_are_as_close_to_fp32_as_transformers_fp16_and_gradients_finite(checkpoint):
    """fp16 training is DeepSpeed's on a GPU only (tests/train/test_fp16.py covers its configuration and loss
    scaling); the model's own part runs here: the module cast to half, as DeepSpeed's fp16 engine casts it,
    errs from the fp32 logits no more than transformers' model in half precision does, and a backward pass
    gives finite gradients."""
    import copy

    _, path, ref = checkpoint
    x = ids()
    with torch.no_grad():
        truth = ref(x).logits
        theirs = copy.deepcopy(ref).half()(x).logits.float()
    ours = load_model(path).half()
    got = ours(x)
    assert got.dtype == torch.float16
    ours_err, their_err = (got.float() - truth).abs().max(), (theirs - truth).abs().max()
    assert ours_err <= 2 * their_err + 1e-3, (ours_err, their_err)
    torch.nn.functional.cross_entropy(got[:, :-1].flatten(0, 1).float(), x[:, 1:].flatten()).backward()
    grads = [p.grad for p in ours.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_rmsnorm_reduces_in_fp32_so_large_fp16_activations_do_not_overflow():
    """mean(x^2) of activations around 300 is 90,000: past fp16's 65,504. Llama's and Qwen's norms (and Qwen3's
    per-head q/k norms, the same module) square in fp32 as transformers' LlamaRMSNorm does."""
    from pipeline.model.gpt import RMSNorm

    x = torch.full((1, 4, 64), 300.0, dtype=torch.float16)
    assert not torch.isfinite(x.pow(2).mean(-1)).all()  # the naive fp16 reduction overflows
    out = RMSNorm(64, 1e-6).half()(x)
    assert out.dtype == torch.float16 and torch.allclose(out.float(), torch.ones(1, 4, 64), atol=1e-3)


def test_mistral_null_window_is_full_attention_and_stays_null(tmp_path):
    """v0.2's null sliding_window is full attention and stays null in the export (MistralConfig would read a
    missing key as 4096)."""
    config = transformers.MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=None)
    transformers.MistralForCausalLM(config).save_pretrained(tmp_path / "v02")
    full = load_model(tmp_path / "v02").eval()
    assert full.cfg.layer_windows == () and full(ids(15, (1, 40))).shape == (1, 40, VOCAB)
    save_hf(full, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["sliding_window"] is None
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").sliding_window is None
