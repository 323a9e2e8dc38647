"""Presets deepseek-v3 and moonlight-16b-a3b: the hub's config.json values (deepseek-ai/DeepSeek-V3,
moonshotai/Moonlight-16B-A3B, re-typed here) read as the presets, and counted as transformers 5.24's
DeepseekV3ForCausalLM counts them on the meta device (the MTP layer, num_nextn_predict_layers, left out as transformers
leaves it: modeling_deepseek_v3.py builds num_hidden_layers blocks). The cards: DeepSeek-V3 671B total, 37B active
(685B with the MTP module's 14B); Moonlight 16B total, 3B active."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.config import PRESETS, active_params, count_params, from_hf_config

transformers = pytest.importorskip("transformers")

DEEPSEEK_V3 = dict(  # deepseek-ai/DeepSeek-V3's config.json (auto_map and quantization_config left out)
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
    intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1,
    num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc",
    n_group=8, topk_group=4, num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3, norm_topk_prob=True,
    scoring_func="sigmoid", hidden_act="silu", max_position_embeddings=163840, initializer_range=0.02, rms_norm_eps=1e-6,
    rope_theta=10000, rope_scaling={"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                    "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    tie_word_embeddings=False, attention_bias=False, attention_dropout=0.0, bos_token_id=0, eos_token_id=1)
MOONLIGHT = dict(  # moonshotai/Moonlight-16B-A3B's config.json (auto_map left out)
    architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=163840, hidden_size=2048,
    intermediate_size=11264, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
    num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, routed_scaling_factor=2.446, kv_lora_rank=512,
    q_lora_rank=None, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=1,
    topk_group=1, num_experts_per_tok=6, moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=True,
    scoring_func="sigmoid", hidden_act="silu", max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=50000.0,
    rope_scaling=None, tie_word_embeddings=False, attention_bias=False, bos_token_id=163584, eos_token_id=163585)


@pytest.mark.parametrize("name,raw,total,active", [
    ("deepseek-v3", DEEPSEEK_V3, 671_026_404_352, 37),
    ("moonlight-16b-a3b", MOONLIGHT, 15_960_108_544, 3),
])
def test_the_preset_is_the_hubs_config_and_counts_as_transformers_and_the_card(name, raw, total, active):
    """The preset is what reading the hub's config.json gives; transformers' model of that config on the meta device
    has count_params' parameters (the card's 671B / 16B); active_params without the input embedding (a row lookup,
    no compute) rounds to the card's 37B / 3B (36.6B / 2.6B; with it 37.6B / 2.9B)."""
    cfg = PRESETS[name]
    assert from_hf_config(raw) == cfg
    config = transformers.DeepseekV3Config(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = transformers.DeepseekV3ForCausalLM(config)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters()) == total
    assert round((active_params(cfg) - cfg.vocab_size * cfg.emb_dim) / 1e9) == active
