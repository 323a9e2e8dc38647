"""GLM-4.5 / GLM-4.6 checkpoints (Glm4MoeForCausalLM) as transformers 5.24 writes them: DeepSeek-V3's routing on the
SparseMoeBlock, checked against transformers' source (models/glm4_moe/modeling_glm4_moe.py):

- Glm4MoeTopkRouter.forward (:282-307): fp32 router logits, sigmoid scores; the choice reads scores +
  e_score_correction_bias (a buffer, :280, zeros at init :467) limited to the topk_group groups whose two best
  biased scores sum highest (:287-300); the weights are the unbiased scores of the chosen experts (:302), renormalised
  with + 1e-20 (:303-305), times routed_scaling_factor (:306);
- Glm4MoeMoE (:376-392): the shared experts, one Glm4MoeMLP of moe_intermediate_size x n_shared_experts, added
  ungated; Glm4MoeDecoderLayer (:402-405): blocks below first_k_dense_replace keep a dense Glm4MoeMLP of
  intermediate_size;
- Glm4MoeAttention (:188-201): q / k / v biased by attention_bias, o_proj never, per-head q / k norms by use_qk_norm;
  the rotation in halves (rotate_half :131-135) on the first partial_rotary_factor (0.5 by default,
  configuration_glm4_moe.py:124) of each head;
- _keys_to_ignore_on_load_unexpected (:461): the hub's MTP layer (model.layers.46.* in GLM-4.5-Air) is not loaded;
  _keep_in_fp32_modules_strict (:460): the router weight and the bias stay fp32 in transformers;
- Glm4MoeForCausalLM.forward (:598-624) adds no router loss; LLaMA-Factory 0.9.5's configure_moe
  (model/model_utils/moe.py) sets output_router_logits / router_aux_loss_coef on no glm4_moe model type, only its
  add_z3_leaf_module makes Glm4MoeMoE a ZeRO-3 leaf;
- transformers' conversion_mapping (glm4_moe -> the qwen2_moe entry) writes the experts per expert on save:
  mlp.experts.{e}.gate_proj / up_proj / down_proj, our names; the shared experts are mlp.shared_experts.
Tiny fp32 shape: 3 blocks (block 0 dense), 8 experts in 4 groups, 2 groups kept, top-2, 2 shared experts, scaling 2.5,
q / k norms, head_dim 16 (4 x 16 != hidden 32), a correction bias of N(0, 0.1) that changes the chosen experts.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.config import PRESETS, active_params, count_params, read_config, to_hf_config, \
    trainable_params
from pipeline.model.lora import apply_lora, save_adapter
from pipeline.model.weights import load_model, save_hf
from tests.model.test_families import ids
from tests.model.test_moe_families import (assert_export_reads_back, assert_reads_as_transformers,
                                           lf_all_linear_modules)

transformers = pytest.importorskip("transformers")

CONFIG = dict(hidden_size=32, num_hidden_layers=3, vocab_size=512, max_position_embeddings=64, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
              num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=2, routed_scaling_factor=2.5,
              first_k_dense_replace=1, norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def hf_model(folder=None, **changes):
    """A random Glm4MoeForCausalLM of CONFIG with `changes` (deepseek_routed_model), saved in `folder`."""
    model = deepseek_routed_model(transformers.Glm4MoeForCausalLM, transformers.Glm4MoeConfig(**{**CONFIG, **changes}))
    if folder is not None:
        model.save_pretrained(folder)
    return model


def deepseek_routed_model(model_class, config):
    """A random model_class(config) (N(0, 0.1) on every parameter), each router's weight x 10 (scores spread over
    (0, 1)) and its correction bias N(0, 0.1): far from 0, it changes the choice of half the rows without deciding
    every one (test_the_routing_is_transformers_and_the_bias_and_groups_change_it)."""
    from tests.acceptance.harness import random_model

    model = random_model(model_class, config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers[model.config.first_k_dense_replace:]:
            layer.mlp.gate.weight.mul_(10)
            layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(model.config.n_routed_experts, generator=gen) * 0.1)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(directory, transformers model): save_pretrained's files plus an MTP layer's tensors (model.layers.3.*, as the
    hub's files hold model.layers.46.*), which transformers ignores on load."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("glm4_moe")
    ref = hf_model(path)
    tensors = load_file(path / "model.safetensors")
    tensors.update({"model.layers.3.eh_proj.weight": torch.zeros(32, 64),
                    "model.layers.3.mlp.experts.0.up_proj.weight": torch.zeros(16, 32)})
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path, ref


def test_config_fields_logits_and_generation_equal_transformers(checkpoint):
    path, ref = checkpoint
    assert_reads_as_transformers(path, ref, dict(
        family="glm4_moe", n_experts=8, experts_per_token=2, moe_ffn_dim=16, hidden_dim=48, norm_topk_prob=True,
        qkv_bias=True, o_bias=False, qk_norm=True, shared_expert_dim=32, shared_expert_gated=False,
        mlp_only_layers=(0,), router_scoring="sigmoid", router_correction_bias=True, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, partial_rotary_factor=0.5, rope_interleaved=False, head_dim=16))
    ours = load_model(path).eval()
    # the bias is a buffer, as transformers holds it: read from the files, never a trainable parameter
    bias = ours.layers[1].mlp.gate.e_score_correction_bias
    assert torch.equal(bias, ref.model.layers[1].mlp.gate.e_score_correction_bias)
    assert "layers.1.mlp.gate.e_score_correction_bias" not in dict(ours.named_parameters())


def test_the_routing_is_transformers_and_the_bias_and_groups_change_it(checkpoint):
    """The sparse block's chosen experts and weights are Glm4MoeTopkRouter's on the same rows; the correction bias and
    the group limit each change the choice (so the logits test reaches both), and the block's output is
    Glm4MoeMoE's."""
    path, ref = checkpoint
    ours = load_model(path).eval()
    block, theirs = ours.layers[1].mlp, ref.model.layers[1].mlp
    x = torch.randn(40, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, want_w, want_i = theirs.gate(x)
        _, got_w, got_i = block.route(x)
        order_w, order_g = want_i.sort(-1), got_i.sort(-1)
        assert torch.equal(order_w.values, order_g.values)
        assert torch.allclose(got_w.gather(1, order_g.indices), want_w.gather(1, order_w.indices), atol=1e-6, rtol=0)
        assert torch.allclose(block(x), theirs(x), atol=1e-6, rtol=0)
        saved = block.gate.e_score_correction_bias.clone()
        block.gate.e_score_correction_bias.zero_()
        unbiased = block.route(x)[2].sort(-1).values
        block.gate.e_score_correction_bias.copy_(saved)
        block.n_group = 1
        ungrouped = block.route(x)[2].sort(-1).values
        block.n_group = 4
    assert len({tuple(r) for r in order_g.values.tolist()}) > 8  # the rows choose many pairs
    assert not torch.equal(unbiased, order_g.values) and not torch.equal(ungrouped, order_g.values)


def test_export_writes_the_hub_names_and_loads_in_transformers(checkpoint, tmp_path):
    """save_pretrained's names (the MTP layer's tensors left out, as transformers does not load them), the config
    read back by Glm4MoeConfig, logits bitwise."""
    from safetensors import safe_open

    path, ref = checkpoint
    save_hf(load_model(path), tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    with safe_open(path / "model.safetensors", "pt") as f:
        assert keys == {k for k in f.keys() if not k.startswith("model.layers.3.")}
    assert {"model.layers.1.mlp.gate.e_score_correction_bias", "model.layers.2.mlp.experts.7.down_proj.weight",
            "model.layers.1.mlp.shared_experts.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"} <= keys
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: config[k] for k in ("n_routed_experts", "n_group", "topk_group", "n_shared_experts",
                                   "routed_scaling_factor", "first_k_dense_replace", "use_qk_norm")} == \
        {"n_routed_experts": 8, "n_group": 4, "topk_group": 2, "n_shared_experts": 2, "routed_scaling_factor": 2.5,
         "first_k_dense_replace": 1, "use_qk_norm": True}
    assert_export_reads_back(tmp_path / "out", ref)


def test_lora_all_adapts_what_peft_adapts_on_this_model(checkpoint, tmp_path):
    """LLaMA-Factory's lora_target: all (find_all_linear_modules) on Glm4MoeForCausalLM names the attention
    projections and, from the dense block and the shared experts, gate_proj / up_proj / down_proj; PEFT 0.21 maps
    model type glm4_moe to transformers' qwen2_moe conversion (utils/transformers_weight_conversion.py:332-353,
    402-482) and moves those three names onto the fused experts' tensors (target_parameters), dropping them from the
    Linears. So PEFT's LoRA Linears are the attention projections and every routed expert takes LoRA: ours are the
    same, PEFT loads our adapter (experts included) with our logits, and merge agrees (every family's table:
    test_lora_all_moe)."""
    peft = pytest.importorskip("peft")
    from pipeline.model.families import FAMILIES
    from pipeline.model.expert_lora import expert_of
    from pipeline.model.lora import lora_modules
    from tests.model.test_families import assert_adapter_agrees, randomise_lora

    path, ref = checkpoint
    ours = load_model(path).eval()
    apply_lora(ours, "all", rank=4, alpha=8)
    randomise_lora(ours, seed=1)
    save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(path)})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    lf_all = lf_all_linear_modules(ref)
    assert lf_all == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    theirs = peft.get_peft_model(hf_model(), peft.LoraConfig(r=4, target_modules=lf_all))
    assert theirs.peft_config["default"].target_parameters == {"gate_up_proj", "down_proj"}
    assert config["target_parameters"] == ["down_proj", "gate_up_proj"]
    linears = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
               if hasattr(m, "lora_A") and isinstance(m.get_base_layer(), torch.nn.Linear)}
    assert {FAMILIES["glm4_moe"].to_hf(n) for n in lora_modules(ours) if not expert_of(n)} == linears
    assert {n.split(".")[-1] for n in lora_modules(ours) if expert_of(n)} == {"gate_proj", "up_proj", "down_proj"}
    assert_adapter_agrees(peft, ours, path, tmp_path / "adapter", ids(7))


@pytest.mark.parametrize("target,hf_name", [("mlp.gate", "mlp.gate"), ("experts.0.up_proj", "mlp.experts.0.up_proj"),
                                            ("shared_experts.gate_proj", "mlp.shared_experts.gate_proj")])
def test_lora_on_the_mlp_is_refused(checkpoint, target, hf_name):
    path, _ = checkpoint
    with pytest.raises(UserError) as err:
        trainable_params(read_config(path), "lora", 2, ["q_proj", target])
    message = err.value.messages[0]
    assert message.startswith(f"lora_target: '{target}' picks MLP modules of this Glm4MoeForCausalLM ({hf_name}")
    assert "finetuning_type: full or freeze" in message


def test_full_training_steps_the_experts_not_the_bias(checkpoint):
    """finetuning_type full trains the experts, the router weight and the shared experts, as Qwen3-MoE's; the
    correction bias is a buffer (transformers' nn.Buffer; LLaMA-Factory's optimizer takes parameters only) and stays."""
    path, _ = checkpoint
    ours = load_model(path).train()
    bias = ours.layers[2].mlp.gate.e_score_correction_bias.clone()
    opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    x = ids(2, (2, 10))
    ours(x, labels=torch.cat([x[:, 1:], torch.full((2, 1), -100)], 1)).backward()
    moved = {n for n, p in ours.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    opt.step()
    assert {"layers.2.mlp.gate.weight", "layers.2.mlp.shared_expert.down_proj.weight"} <= moved
    assert any(n.startswith("layers.2.mlp.experts.") for n in moved)
    assert torch.equal(ours.layers[2].mlp.gate.e_score_correction_bias, bias)


def test_glm_4_5_air_preset_counts_as_transformers_and_the_card():
    """The card: 106B total, 12B active (without the embedding and the head: 12.2B; 13.4B with them); the preset leaves
    the MTP layer out, as Glm4MoeForCausalLM does."""
    cfg = PRESETS["glm-4.5-air"]
    raw = to_hf_config(cfg)
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items()
                                                                          if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = transformers.Glm4MoeForCausalLM(config)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters()) == 106_852_245_504
    embedding_and_head = 2 * cfg.vocab_size * cfg.emb_dim
    assert round((active_params(cfg) - embedding_and_head) / 1e9) == 12


@pytest.mark.parametrize("changes,words", [
    (dict(n_group=3), "n_group 3 / topk_group 2 do not fit 8 experts"),
    (dict(topk_group=5), "topk_group 5"),
    (dict(routed_scaling_factor=0), "routed_scaling_factor is 0"),
    (dict(n_shared_experts=0), "n_shared_experts is 0"),
    (dict(first_k_dense_replace=-1), "first_k_dense_replace is -1"),
])
def test_bad_configs_name_file_and_key(tmp_path, changes, words):
    from tests.model.test_families import assert_config_refused

    raw = {**CONFIG, "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", **changes}
    assert_config_refused(tmp_path, raw, words)

