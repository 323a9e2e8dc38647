"""YaRN rotary scaling (Qwen2.5's documented long-context edit of config.json) against transformers.

Golden values: transformers' ROPE_INIT_FUNCTIONS["yarn"] for the frequencies and attention factor, and
Qwen2ForCausalLM / LlamaForCausalLM (written by save_pretrained) for logits past the original window.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.model.config import read_config
from pipeline.model.generate import generate
from pipeline.model.rope import rope_attention_factor, rope_inv_freq
from pipeline.model.weights import load_model, save_hf

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

VOCAB = 256
SHAPE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=VOCAB, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
QWEN_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}  # Qwen2.5's card, tiny


@pytest.mark.parametrize("scaling", [
    QWEN_YARN,
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "beta_fast": 16, "beta_slow": 2},
    {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 24, "truncate": False},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.25},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16, "mscale": 1.0,
     "mscale_all_dim": 0.707},  # DeepSeek's spelling
    {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 4},  # beta_slow clipped to d-1
])
def test_frequencies_and_attention_factor_equal_transformers(tmp_path, scaling):
    config = transformers.Qwen2Config(**SHAPE, rope_theta=10000.0, rope_scaling=dict(scaling))
    config.save_pretrained(tmp_path)
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config, torch.device("cpu"))
    cfg = read_config(tmp_path)
    assert cfg.rope_scaling["type"] == "yarn"
    assert torch.allclose(rope_inv_freq(cfg), want_inv, rtol=1e-6, atol=0)
    assert rope_attention_factor(cfg) == pytest.approx(want_factor, rel=1e-12)


def test_a_factor_only_edit_takes_max_position_embeddings_as_the_window(tmp_path):
    """transformers 5 standardises a yarn dict without original_max_position_embeddings to max_position_embeddings."""
    config = transformers.Qwen2Config(**SHAPE, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    config.save_pretrained(tmp_path)
    cfg = read_config(tmp_path)
    assert cfg.rope_scaling["original_max_position_embeddings"] == 64
    assert torch.allclose(rope_inv_freq(cfg), ROPE_INIT_FUNCTIONS["yarn"](config, None)[0], rtol=1e-6, atol=0)


def _checkpoint(tmp_path, config_cls: str, model_cls: str):
    """A random transformers model with Qwen2.5's yarn edit in config.json, as a user makes it, then reloaded."""
    config = getattr(transformers, config_cls)(**SHAPE, rope_theta=10000.0)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / "base")
    raw = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**raw, "rope_scaling": QWEN_YARN}))
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert ref.model.rotary_emb.attention_scaling > 1  # transformers runs YaRN from this file
    return tmp_path / "base", ref


@pytest.mark.parametrize("classes", [("Qwen2Config", "Qwen2ForCausalLM"), ("LlamaConfig", "LlamaForCausalLM")])
def test_logits_past_the_original_window_equal_transformers_and_survive_export(tmp_path, classes):
    path, ref = _checkpoint(tmp_path, *classes)
    ours = load_model(path).eval()
    x = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(1))  # 3x the window of 16
    with torch.no_grad():
        want = ref(x).logits
        assert torch.allclose(ours(x), want, rtol=1e-5, atol=1e-5), (ours(x) - want).abs().max()
    save_hf(ours, tmp_path / "merged")
    written = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert written["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(back(x).logits, want, rtol=1e-5, atol=1e-5)


def test_greedy_generation_past_the_window_equals_transformers_with_and_without_cache(tmp_path):
    """The KV-cache path rotates each new position with the same scaled cos / sin as the full forward."""
    path, ref = _checkpoint(tmp_path, "Qwen2Config", "Qwen2ForCausalLM")
    ours = load_model(path).eval()
    prompt = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))[0].tolist()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 12:].tolist()
    assert len(set(expected)) > 3
    assert generate(ours, prompt, max_new_tokens=20, eos_id=None) == expected
    assert generate(ours, prompt, max_new_tokens=20, eos_id=None, use_cache=False) == expected


@pytest.mark.parametrize("scaling,words", [
    ({"type": "yarn"}, "rope_scaling.factor is missing or not a number (rope_type yarn needs it)"),
    ({"type": "yarn", "factor": 4.0, "beta_fast": "32"}, "rope_scaling.beta_fast is '32'; expected a number"),
    ({"type": "yarn", "factor": 4.0, "truncate": "no"}, "rope_scaling.truncate is 'no'; expected true or false"),
])
def test_a_bad_yarn_dict_names_file_and_key(tmp_path, scaling, words):
    config = transformers.Qwen2Config(**SHAPE).to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": scaling}))
    with pytest.raises(Exception) as err:
        read_config(tmp_path)
    assert any(words in m for m in err.value.messages), err.value.messages
