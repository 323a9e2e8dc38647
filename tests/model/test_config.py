"""Presets, parameter counts and config reading; torch-free by contract (plan imports it)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.errors import UserError
from pipeline.model.config import (PRESETS, GPTConfig, count_params, length_limit, read_config, to_own_config,
                                   trainable_params)


def by_hand(V, T, C, L, tied=True):
    """GPT-2 parameter count written out: embeddings, L blocks, final norm, (untied) head."""
    ln = 2 * C                                  # weight + bias
    attn = (C * 3 * C + 3 * C) + (C * C + C)    # fused qkv with bias, output projection
    mlp = (C * 4 * C + 4 * C) + (4 * C * C + C)
    return V * C + T * C + L * (ln + attn + ln + mlp) + ln + (0 if tied else V * C)


@pytest.mark.parametrize("name,golden", [
    ("gpt2-small", 124_439_808),    # the published GPT-2 sizes (tied head counted once)
    ("gpt2-medium", 354_823_168),
    ("gpt2-large", 774_030_080),
    ("gpt2-xl", 1_557_611_200),
])
def test_gpt2_preset_counts(name, golden):
    cfg = PRESETS[name]
    assert count_params(cfg) == golden
    assert cfg.context_length == 1024 and cfg.qkv_bias and cfg.tie_weights and cfg.vocab_size == 50257


def swiglu_by_hand(V, C, L, H, KV, F):
    """A Llama-style decoder's count written out: embedding and an untied head, L blocks of (q, k, v, o without
    biases, gate / up / down, two RMSNorm weights), the final norm."""
    d = C // H
    attn = C * H * d + 2 * C * KV * d + H * d * C
    return 2 * V * C + L * (attn + 3 * C * F + 2 * C) + C


@pytest.mark.parametrize("name,shape,golden,positions", [
    # Llama-2-7b-hf: vocab 32,000, 4,096 wide, 32 layers, 32 heads (no GQA), MLP 11,008 (Llama 2 paper: "7B")
    ("llama-2-7b", (32000, 4096, 32, 32, 32, 11008), 6_738_415_616, (4096, 10000.0)),
    # Mistral-7B-v0.3: vocab 32,768, 32 layers, 32 query and 8 key/value heads, MLP 14,336 (7.25B)
    ("mistral-7b", (32768, 4096, 32, 32, 8, 14336), 7_248_023_552, (32768, 1e6)),
])
def test_llama2_and_mistral_preset_counts(name, shape, golden, positions):
    cfg = PRESETS[name]
    assert count_params(cfg) == swiglu_by_hand(*shape) == golden
    assert (cfg.vocab_size, cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.hidden_dim) == shape
    assert (cfg.context_length, cfg.rope_theta) == positions  # max_position_embeddings, rope_theta
    assert not cfg.tie_weights and cfg.layer_windows == () and cfg.rope_scaling is None


@pytest.mark.parametrize("context, windows, scaling, limit", [
    (32768, (4096, 4096), None, 32768),  # Mistral v0.1: the window bounds what a layer sees, not the sequence
    (64, (), None, 64),                  # full attention
    (64, (), "dynamic", None),           # dynamic NTK runs past its context: no limit
    (64, (16, None), "dynamic", None),   # ... with a window too
    (64, (), "linear", 64),              # other scalings keep the context
])
def test_length_limit_by_hand(context, windows, scaling, limit):
    cfg = PRESETS["tiny"].replace(context_length=context, layer_windows=windows, positions="rope",
                                  rope_scaling={"type": scaling, "factor": 2.0} if scaling else None)
    assert length_limit(cfg) == limit


def test_layer_windows_are_data_and_round_trip_in_our_config(tmp_path):
    """One entry per layer (None: full attention), a JSON list in our config.json read back as the same tuple; all
    None is (); the sliding_window key of our configs written before layer_windows is Mistral's window in every
    layer (null: none); a wrong count or value is one message."""
    cfg = PRESETS["tiny"].replace(layer_windows=[None, 8])
    assert cfg.layer_windows == (None, 8) and (cfg.window(0), cfg.window(1)) == (None, 8)
    assert PRESETS["tiny"].replace(layer_windows=(None, None)).layer_windows == ()
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").write_text(json.dumps(to_own_config(cfg)))
    assert read_config(own) == cfg
    for window, windows in ((4096, (4096, 4096)), (None, ())):
        written = {**to_own_config(PRESETS["tiny"]), "sliding_window": window}
        del written["layer_windows"]
        (own / "config.json").write_text(json.dumps(written))
        assert read_config(own) == PRESETS["tiny"].replace(layer_windows=windows)
    for windows, words in (((8,), "layer_windows has 1 entries, one per layer of n_layers 2"),
                           ((0, 8), "layer_windows must hold positive integers or nulls, got 0")):
        with pytest.raises(UserError, match=words):
            PRESETS["tiny"].replace(layer_windows=windows)


def test_small_presets_shapes_and_counts():
    tiny, mini = PRESETS["tiny"], PRESETS["mini"]
    assert (tiny.n_layers, tiny.n_heads, tiny.emb_dim, tiny.context_length) == (2, 2, 64, 128)
    assert (mini.n_layers, mini.n_heads, mini.emb_dim, mini.context_length) == (4, 4, 128, 256)
    assert count_params(tiny) == by_hand(50257, 128, 64, 2) == 3_324_736
    assert count_params(mini) == by_hand(50257, 256, 128, 4)
    assert count_params(tiny.replace(tie_weights=False)) == by_hand(50257, 128, 64, 2, tied=False)
    assert count_params(tiny.replace(qkv_bias=False)) == by_hand(50257, 128, 64, 2) - 2 * 3 * 64
    for cfg in (c for c in PRESETS.values() if c.family == "gpt2"):
        assert count_params(cfg) == by_hand(cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_layers)


def test_trainable_params_by_hand():
    tiny = PRESETS["tiny"]  # C = 64, L = 2
    r = 4
    per_block = r * (64 + 192) + r * (64 + 64) + r * (64 + 256) + r * (256 + 64)
    assert trainable_params(tiny, "lora", r, "all") == 2 * per_block == 8192
    assert trainable_params(tiny, "lora", r, ["c_attn"]) == 2 * r * (64 + 192)
    assert trainable_params(tiny, "lora", r, "c_attn,mlp.c_proj") == 2 * r * (64 + 192 + 256 + 64)
    assert trainable_params(tiny, "lora", r, ["c_proj"]) == 2 * r * (64 + 64 + 256 + 64)  # both projections
    assert trainable_params(tiny, "lora", r, ["h.1.attn.c_attn"]) == r * (64 + 192)
    assert trainable_params(tiny, "lora", r, ["c_attn"], additional_target=["ln_f"]) == 2 * r * 256 + 128
    block = by_hand(50257, 128, 64, 1) - 50257 * 64 - 128 * 64 - 128   # one block alone
    assert trainable_params(tiny, "freeze", freeze_trainable_layers=1) == block + 128
    assert trainable_params(tiny, "freeze", freeze_trainable_layers=-1) == block + 128  # the first block (+ ln_f)
    assert trainable_params(tiny, "full") == count_params(tiny)


def test_bad_targets_are_user_errors():
    tiny = PRESETS["tiny"]
    with pytest.raises(UserError) as err:
        trainable_params(tiny, "lora", 4, ["c_atn", "q_proj"])
    text = str(err.value)
    assert "'c_atn' matches no module (did you mean 'c_attn'?)" in text and "'q_proj'" in text
    assert "attn.c_proj" in text and "mlp.c_fc" in text  # lists what is available
    with pytest.raises(UserError, match="output head"):
        trainable_params(tiny, "lora", 4, ["lm_head"])
    for layers in (3, -3, 0):
        with pytest.raises(UserError, match=f"freeze_trainable_layers: given {layers}, expected 1..2 .* or -1..-2"):
            trainable_params(tiny, "freeze", freeze_trainable_layers=layers)


def test_additional_target_takes_the_head_and_a_comma_string():
    """LLaMA-Factory's form for added tokens; the tiny preset's head is tied: one vocabulary matrix, counted once."""
    tiny = PRESETS["tiny"]
    lora = trainable_params(tiny, "lora", 4, ["c_attn"])
    matrix = tiny.vocab_size * tiny.emb_dim
    for extra in ("wte,lm_head", ["lm_head"], "wte", [" wte ", "lm_head"]):
        assert trainable_params(tiny, "lora", 4, ["c_attn"], additional_target=extra) == lora + matrix
    untied = tiny.replace(tie_weights=False)
    assert trainable_params(untied, "lora", 4, ["c_attn"], additional_target="wte,lm_head") == lora + 2 * matrix


def test_read_config_preset_hf_and_own(tmp_path):
    assert read_config("gpt2-small") is PRESETS["gpt2-small"]
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "n_embd": 48, "n_layer": 3, "n_head": 6, "n_positions": 96, "vocab_size": 1000,
        "layer_norm_epsilon": 1e-6, "tie_word_embeddings": False, "n_inner": 100, "resid_pdrop": 0.1}))
    assert read_config(hf) == GPTConfig(vocab_size=1000, context_length=96, emb_dim=48, n_heads=6, n_layers=3,
                                        drop_rate=0.1, tie_weights=False, ffn_dim=100, norm_eps=1e-6)
    own = tmp_path / "own"
    own.mkdir()
    (own / "config.json").write_text(json.dumps({"format": "pipeline-gpt", "format_version": 1,
                                                 **PRESETS["tiny"].replace(qkv_bias=False).to_dict()}))
    assert read_config(str(own)) == PRESETS["tiny"].replace(qkv_bias=False)


def test_read_config_errors(tmp_path):
    with pytest.raises(UserError) as err:
        read_config("gpt2-smal")
    assert "did you mean 'gpt2-small'" in str(err.value) and "tiny" in str(err.value)
    with pytest.raises(UserError, match="hf download openai-community/gpt2"):
        read_config("gpt2")  # not a preset: where OpenAI's weights come from
    with pytest.raises(UserError, match=r"'openai-community/gpt2' is neither a local directory nor a cached hub "
                                        r"snapshot .* run `hf download openai-community/gpt2"):
        read_config("openai-community/gpt2")  # a hub id, offline (tests/conftest.py) and not cached
    with pytest.raises(UserError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: not readable as JSON"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "falcon", "n_embd": 8}))
    with pytest.raises(UserError, match="model_type 'falcon' is not supported.*GPT2LMHeadModel, LlamaForCausalLM"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 8, "n_layer": 1, "n_head": 3}))
    with pytest.raises(UserError, match="n_embd 8 is not divisible by n_head 3"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"n_embd": 8, "n_layer": 1, "n_head": 2,
                                                      "activation_function": "relu"}))
    with pytest.raises(UserError, match="activation_function 'relu'"):
        read_config(tmp_path)


def test_config_module_does_not_import_torch():
    code = ("import sys, pipeline.model.config as c; c.trainable_params(c.PRESETS['gpt2-xl'], 'lora', 8, 'all');"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
