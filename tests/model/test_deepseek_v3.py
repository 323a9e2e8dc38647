"""DeepSeek-V3 / Moonlight checkpoints (DeepseekV3ForCausalLM) as transformers 5.24 writes them: multi-head latent
attention on GLM-4.5's routing (tests/model/test_glm4_moe.py), checked against transformers' source
(models/deepseek_v3/modeling_deepseek_v3.py):

- DeepseekV3Attention (:349-483): queries from q_a_proj -> q_a_layernorm -> q_b_proj (q_lora_rank) or one q_proj (null);
  kv_a_proj_with_mqa gives the kv_lora_rank latent and the one rotated key part all heads share; kv_a_layernorm ->
  kv_b_proj gives each head's unrotated key and its value (v_head_dim, narrower than the key); RoPE on the last
  qk_rope_head_dim dims in adjacent pairs (rope_interleave, :310-346); scores scaled by qk_head_dim ** -0.5 x
  mscale(factor, mscale_all_dim) ** 2 under YaRN (yarn_apply_mscale, :268-274); the latent norms use
  DeepseekV3RMSNorm's default eps 1e-6 (:380, :392), not rms_norm_eps;
- DeepseekV3Config (configuration_deepseek_v3.py): config.json's head_dim is qk_rope_head_dim (__post_init__);
- DeepseekV3TopkRouter / DeepseekV3MoE: Glm4MoeTopkRouter / Glm4MoeMoE's code (sigmoid, correction bias, groups,
  scaling, shared experts).
Two tiny fp32 variants: (a) q_lora_rank, rms_norm_eps 1e-5, 8 experts in 4 groups with 2 kept and a correction bias
that changes the choice; (b) one q_proj and YaRN with mscale_all_dim 0.7 (its attention factor and the score scale
both away from 1). Both: values 6 wide against keys of 16, a dense first block.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.model.lora import apply_lora, save_adapter
from pipeline.model.weights import load_model, save_hf
from tests.model.test_families import ids, variant_checkpoints
from tests.model.test_glm4_moe import deepseek_routed_model
from tests.model.test_moe_families import assert_reads_as_transformers, lf_all_linear_modules

transformers = pytest.importorskip("transformers")

CONFIG = dict(hidden_size=32, num_hidden_layers=3, vocab_size=512, max_position_embeddings=64, num_attention_heads=4,
              num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
              num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5,
              first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8,
              v_head_dim=6, rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
VARIANTS = {
    "q-latent-groups": {},
    "q-proj-yarn": dict(q_lora_rank=None, n_group=1, topk_group=1, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.7,
        "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1}),
}


def hf_model(name: str):
    """A random DeepseekV3ForCausalLM of the variant, its routers as test_glm4_moe's (deepseek_routed_model)."""
    return deepseek_routed_model(transformers.DeepseekV3ForCausalLM,
                                 transformers.DeepseekV3Config(**{**CONFIG, **VARIANTS[name]}))


checkpoint = variant_checkpoints(hf_model, VARIANTS)


def test_config_fields_logits_and_generation_equal_transformers(checkpoint):
    name, path, ref = checkpoint
    assert_reads_as_transformers(path, ref, dict(
        family="deepseek_v3", head_dim=16, rope_dim=8, kv_lora_rank=12, v_head_dim=6, n_kv_heads=None,
        q_lora_rank=16 if name == "q-latent-groups" else None, rope_interleaved=True, qkv_bias=False,
        router_scoring="sigmoid", shared_expert_dim=16, mlp_only_layers=(0,)),
        greedy=name == "q-latent-groups")  # the cache's path is the variants' one: decoded once


def test_export_writes_the_hub_names_and_loads_in_transformers(checkpoint, tmp_path):
    from safetensors import safe_open

    name, path, ref = checkpoint
    save_hf(load_model(path), tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f, \
            safe_open(path / "model.safetensors", "pt") as g:
        assert set(f.keys()) == set(g.keys())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["head_dim"], config["qk_nope_head_dim"], config["kv_lora_rank"]) == (8, 8, 12)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = ids(6)
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref(x).logits)


def test_lora_all_adapts_what_peft_adapts_on_this_model(checkpoint, tmp_path):
    """As on GLM-4.5 (PEFT 0.21 maps deepseek_v3 to transformers' qwen2_moe conversion too): LLaMA-Factory's
    find_all_linear_modules adds the MLP names (the dense block's, the shared experts'), which PEFT moves onto the
    fused routed experts; the Linears PEFT adapts are the latent attention's, ours, and the routed experts take LoRA as
    PEFT's target_parameters; PEFT loads our adapter with our logits and merge agrees."""
    peft = pytest.importorskip("peft")
    from pipeline.model.expert_lora import expert_of
    from pipeline.model.families import FAMILIES
    from pipeline.model.lora import lora_modules
    from tests.model.test_families import assert_adapter_agrees, randomise_lora

    name, path, ref = checkpoint
    if name != "q-latent-groups":
        pytest.skip("the q_lora_rank variant holds every latent projection")
    ours = load_model(path).eval()
    apply_lora(ours, "all", rank=4, alpha=8)
    randomise_lora(ours, seed=1)
    save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(path)})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"]
    assert config["target_parameters"] == ["down_proj", "gate_up_proj"]
    theirs = peft.get_peft_model(hf_model(name), peft.LoraConfig(r=4, target_modules=lf_all_linear_modules(ref)))
    linears = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
               if hasattr(m, "lora_A") and isinstance(m.get_base_layer(), torch.nn.Linear)}
    assert {FAMILIES["deepseek_v3"].to_hf(n) for n in lora_modules(ours) if not expert_of(n)} == linears
    assert theirs.peft_config["default"].target_parameters == {"gate_up_proj", "down_proj"}
    assert_adapter_agrees(peft, ours, path, tmp_path / "adapter", ids(7))


@pytest.mark.parametrize("changes,words", [
    (dict(attention_bias=True), "attention_bias is True; only False is supported"),
    (dict(rope_interleave=False), "rope_interleave is False; only True is supported"),
    (dict(num_key_value_heads=2), "num_key_value_heads is 2; only 4 is supported"),
    (dict(kv_lora_rank=0), "kv_lora_rank is 0"),
])
def test_bad_configs_name_file_and_key(tmp_path, changes, words):
    from tests.model.test_families import assert_config_refused

    raw = {**CONFIG, "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", **changes}
    assert_config_refused(tmp_path, raw, words)



def test_packed_rows_equal_each_example_alone(checkpoint):
    """Packing (segment_ids: the varlen / bucket kernels) with latent attention, whose values are padded to the keys'
    width and cut back: each example's logits in the packed row are its logits alone (positions restarting)."""
    name, path, _ = checkpoint
    if name != "q-latent-groups":
        pytest.skip("one variant: the padding is the same in both")
    ours = load_model(path).eval()
    first, second = ids(4, (1, 5)), ids(5, (1, 7))
    segments = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        packed = ours(torch.cat([first, second], 1), segment_ids=segments, position_ids=positions)
        for got, alone in ((packed[:, :5], ours(first)), (packed[:, 5:], ours(second))):
            assert torch.allclose(got, alone, atol=1e-5, rtol=0), (got - alone).abs().max()
