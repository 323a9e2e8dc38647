"""The recipe key rope_scaling: LLaMA-Factory's configure_rope (model_utils/rope.py, 0.9.5) computed by hand,
and the refusals. The user's path (train, merge, transformers) is tests/acceptance/test_rope_scaling_cli.py."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.model.config import PRESETS
from pipeline.model.rope_recipe import recipe_rope
from pipeline.recipe import resolve
from pipeline.recipe.notices import notices


@pytest.mark.parametrize("preset,kind,cutoff,scaling,context", [
    # Qwen2.5's 32,768 positions, 100,000 tokens: factor ceil(100000 / 32768) = 4, the card's yarn dict
    ("qwen2.5-0.5b", "yarn", 100000, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
     131072),
    ("qwen2.5-0.5b", "linear", 40000, {"type": "linear", "factor": 2.0}, 65536),
    # Llama 3.2 has llama3 scaling over 8,192 original positions: that window counts, and the scaling is replaced
    ("llama-3.2-1b", "llama3", 20000, {"type": "llama3", "factor": 3.0, "original_max_position_embeddings": 8192,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0}, 24576),
    ("llama-3.2-1b", "yarn", 8193, {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}, 16384),
    # dynamic too keeps the window as original_max_position_embeddings (configure_rope: DYNAMIC and YARN)
    ("qwen2.5-0.5b", "dynamic", 100000, {"type": "dynamic", "factor": 4.0,
                                         "original_max_position_embeddings": 32768}, 131072),
])
def test_factor_window_and_context_as_llamafactory_sets_them(preset, kind, cutoff, scaling, context):
    plan = recipe_rope(PRESETS[preset], kind, cutoff)
    assert plan.applied and plan.config.rope_scaling == scaling and plan.config.context_length == context


@pytest.mark.parametrize("preset,cutoff", [("qwen2.5-0.5b", 32768), ("llama-3.2-1b", 8192)])
def test_within_the_window_nothing_changes(preset, cutoff):
    plan = recipe_rope(PRESETS[preset], "yarn", cutoff)
    assert not plan.applied and plan.config == PRESETS[preset]


def test_a_model_without_rotary_positions_is_refused():
    with pytest.raises(UserError, match="a gpt2 model has learned positions"):
        recipe_rope(PRESETS["tiny"], "yarn", 4096)


def _recipe(tmp_path, text):
    (tmp_path / "r.yaml").write_text("model_name_or_path: qwen2.5-0.5b\ndataset: x\nmax_steps: 1\n" + text, "utf-8")
    return tmp_path / "r.yaml"


def test_resolve_derives_context_length_and_a_notice_says_what_was_set(tmp_path):
    r = resolve(_recipe(tmp_path, "cutoff_len: 40000\nrope_scaling: yarn\n"), command="plan")
    assert r["context_length"] == 65536 and r.source("context_length") == "derived"
    assert any("r.yaml:5:15: rope_scaling: yarn with factor 2 = ceil(cutoff_len 40000 / 32768)" in line
               for line in notices(r)), notices(r)
    dynamic = resolve(_recipe(tmp_path, "cutoff_len: 40000\nrope_scaling: dynamic\n"), command="plan")
    assert dynamic["context_length"] == 65536
    assert any("rope_scaling: dynamic with factor 2" in line and "dynamic NTK rescales only sequences longer than "
               "that context" in line for line in notices(dynamic)), notices(dynamic)
    quiet = resolve(_recipe(tmp_path, "cutoff_len: 1024\nrope_scaling: yarn\n"), command="plan")
    assert quiet["context_length"] is None
    assert any("rope_scaling: yarn not applied: cutoff_len 1024 fits the model's 32768 positions" in line
               for line in notices(quiet)), notices(quiet)


@pytest.mark.parametrize("text,words", [
    ("cutoff_len: 40000\nrope_scaling: yarn\ncontext_length: 65536\n",
     "r.yaml:6:17): rope_scaling derives the context length from cutoff_len"),
    ("rope_scaling: ntk\n", "rope_scaling"),
])
def test_a_recipe_that_cannot_scale_is_refused_at_the_key(tmp_path, text, words):
    with pytest.raises(UserError) as err:
        resolve(_recipe(tmp_path, text), command="plan")
    assert any(words in m for m in err.value.messages), err.value.messages


def _checkpoint_recipe(tmp_path, scaling, cutoff_len):
    """A Llama checkpoint of 64 positions (config.json as save_pretrained writes it; the rules read nothing else)
    whose config already has `scaling`, as merged/ of a `rope_scaling: dynamic` run or LLaMA-Factory's export has."""
    import json

    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 384,
        "max_position_embeddings": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "rope_scaling": scaling}))
    (tmp_path / "r.yaml").write_text(f"model_name_or_path: {folder}\ndataset: x\nmax_steps: 1\n"
                                     f"cutoff_len: {cutoff_len}\n", "utf-8")
    return tmp_path / "r.yaml"


def test_a_dynamic_checkpoint_takes_a_cutoff_past_its_context_with_a_notice(tmp_path):
    """transformers' dynamic NTK sets no limit at max_position_embeddings (it rescales past it): cutoff_len 100 over
    64 positions was refused ("expected at most 64"). Other scalings keep the refusal."""
    r = resolve(_checkpoint_recipe(tmp_path, {"rope_type": "dynamic", "factor": 4.0}, 100), command="plan")
    assert r["cutoff_len"] == 100
    assert any("r.yaml:4:13: cutoff_len 100 runs past the model's 64 positions" in line and
               "rope_scaling is dynamic NTK" in line for line in notices(r)), notices(r)
    within = resolve(_checkpoint_recipe(tmp_path, {"rope_type": "dynamic", "factor": 4.0}, 64), command="plan")
    assert not any("runs past" in line for line in notices(within))
    for scaling in ({"rope_type": "linear", "factor": 4.0}, None):
        with pytest.raises(UserError) as err:
            resolve(_checkpoint_recipe(tmp_path, scaling, 100), command="plan")
        assert any("cutoff_len: given 100, expected at most 64 (the model's context length)" in m
                   for m in err.value.messages), err.value.messages
