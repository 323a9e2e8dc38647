"""Mistral Small 3.1 / 3.2 (Mistral3ForConditionalGeneration) configs read as transformers 5.24 reads them, and the
preset mistral-small-3.1-24b is its decoder.

transformers' Mistral3Config (configuration_mistral3.py:52-98) builds its text_config through SubConfigSpec
(configuration_utils.py:227-268, create_subconfig): a text_config given, however sparse, goes to MistralConfig as it is
(MistralConfig's own defaults, configuration_mistral.py:62-79, for the rest); only an absent one takes the spec's
init_kwargs, the 24B's decoder (5,120 wide, 40 layers, head_dim 128, 131,072 ids and positions, theta 1e9, no window).
tie_word_embeddings is the top level's, default true (:98). The logits / adapter / merge checks of the row are
tests/model/test_gemma3_multimodal.py's; the CLI path tests/acceptance/test_vl_text_cli.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.model.config import PRESETS, count_params, read_config

transformers = pytest.importorskip("transformers")


def read_as_transformers(tmp_path, raw):
    """(our ModelConfig, transformers' Mistral3Config) of one config.json."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Mistral3ForConditionalGeneration"],
                                                      "model_type": "mistral3", **raw}))
    return read_config(tmp_path), transformers.Mistral3Config(**raw)


def fields(cfg):
    return (cfg.vocab_size, cfg.emb_dim, cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ffn_dim,
            cfg.context_length, cfg.rope_theta, cfg.norm_eps, cfg.tie_weights,
            cfg.layer_windows[0] if cfg.layer_windows else None)  # () where no layer has a window


def theirs(config):
    text = config.text_config
    return (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.head_dim, text.intermediate_size, text.max_position_embeddings,
            text.rope_parameters["rope_theta"], text.rms_norm_eps, config.tie_word_embeddings, text.sliding_window)


def test_a_sparse_text_config_takes_mistral_configs_defaults(tmp_path):
    """Two keys given: the rest are MistralConfig's (32,000 ids, 32 heads over 8 kv heads, a 4,096 window, theta 1e4,
    eps 1e-6), not the 24B's; tied by Mistral3Config's top-level default."""
    cfg, config = read_as_transformers(tmp_path, {"text_config": {"hidden_size": 256, "num_hidden_layers": 2}})
    assert fields(cfg) == theirs(config) == (32000, 256, 2, 32, 8, 8, 14336, 131072, 10000.0, 1e-6, True, 4096)


def test_an_absent_text_config_is_the_24bs_and_the_preset_counts_its_decoder(tmp_path):
    """No text_config: Mistral3Config's init_kwargs, the preset's shape (untied here as the released checkpoint, which
    stores its own head). Hand count: embeddings and head 2 x 131,072 x 5,120 = 1,342,177,280; per layer q 5,120 x
    4,096 and o 4,096 x 5,120 (20,971,520 each), k / v 5,120 x 1,024 each, MLP 3 x 5,120 x 32,768 = 503,316,480, two
    norms: 555,755,520, x 40 = 22,230,220,800; final norm 5,120: 23,572,403,200 = transformers' count on meta. The card's
    24B is the whole model, with the Pixtral tower and the projector."""
    cfg, config = read_as_transformers(tmp_path, {"tie_word_embeddings": False})
    assert fields(cfg) == theirs(config)
    assert cfg.replace(wrapper=None) == PRESETS["mistral-small-3.1-24b"]
    with torch.device("meta"):
        model = transformers.Mistral3ForConditionalGeneration(config)
    decoder = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    assert count_params(PRESETS["mistral-small-3.1-24b"]) == decoder == 23_572_403_200
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e9) == 24, total
