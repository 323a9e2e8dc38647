"""LoRA on the experts of GLM-4.5 (Glm4MoeForCausalLM) and DeepSeek-V3 / Moonlight (DeepseekV3ForCausalLM), as
LLaMA-Factory 0.9.5 + PEFT 0.21 train it on transformers 5.24 (pipeline.model.expert_lora, MoeKeys.expert_lora).

Golden facts from PEFT's and transformers' source: transformers' _MODEL_TO_CONVERSION_PATTERN maps glm4_moe and
deepseek_v3 to the qwen2_moe conversion (conversion_mapping.py; the experts fused as mlp.experts.gate_up_proj /
down_proj, as Qwen3-MoE's), and PEFT's _convert_peft_config_moe (utils/transformers_weight_conversion.py:402-482)
reads that pattern: gate_proj + up_proj become target_parameters gate_up_proj (rank_pattern 2r, alpha_pattern
2 alpha), down_proj becomes down_proj, and every target_modules entry equal to one of those names or ending in
'.' + one of them leaves target_modules (:447-458). So the shared experts (mlp.shared_experts, real Linears) and a
dense block's MLP (first_k_dense_replace) take no LoRA in PEFT whatever path names them: a target
shared_experts.gate_proj is moved onto the routed experts' gate_up_proj. The tensor names, shapes, count and config
below are PEFT's own get_peft_model's; the logits are PeftModel.from_pretrained's on our adapter and transformers'
on our merge (tests/model/test_moe_expert_lora.py's checks, on GLM-4.5's tiny checkpoint: a dense first block, 8
experts in 4 groups, shared experts, rows choosing every expert; DeepSeek-V3's through its CLI path)."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.model.config import read_config, trainable_params
from pipeline.model.lora import apply_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EXPERTS = ["gate_proj", "up_proj", "down_proj"]
CONFIGS = {"glm4_moe": "Glm4MoeConfig", "deepseek_v3": "DeepseekV3Config"}


def tiny_config(family: str):
    """test_glm4_moe's / test_deepseek_v3's tiny config: a dense block 0, 8 experts in 4 groups, shared experts."""
    if family == "glm4_moe":
        from tests.model.test_glm4_moe import CONFIG
    else:
        from tests.model.test_deepseek_v3 import CONFIG
    return getattr(transformers, CONFIGS[family])(**CONFIG)


@pytest.mark.parametrize("case", ["glm4_moe experts and router", "mixtral router and experts"])
def test_peft_trains_loads_and_merges_what_we_train(tmp_path, case):
    """LLaMA-Factory's target_modules, PEFT's own get_peft_model and PeftModel.from_pretrained as the golden: PEFT trains
    our adapter file's tensors (names, shapes) and plan's count, writes our config (target_parameters with gate.weight
    for the router `gate`), and loads our adapter with our logits; transformers loads our merge with them.
    GLM-4.5: the experts and the router (DeepSeek-V3's fp32 sigmoid router: PEFT's ParamWrapper puts W + delta in its
    weight, ours adds the update to the fp32 weight; the merge keeps the router's e_score_correction_bias; down_proj
    alone, one fused tensor whose wrapper is not nested, is test_moe_expert_lora's on Qwen3-MoE, the same layout).
    Mixtral: the router's PEFT key is transformers 5's mlp.gate, not the hub's block_sparse_moe.gate. DeepSeek-V3's
    experts and router are GLM-4.5's module tree under the same conversion: its CLI path
    (tests/acceptance/test_deepseek_v3_cli.py) trains them and loads adapter/ in PEFT and merged/ in transformers with
    our logits."""
    from tests.model.test_moe_expert_lora import assert_peft_trains_what_we_train

    base = tmp_path / "base"
    if case.startswith("glm4_moe"):
        from tests.model.test_glm4_moe import hf_model

        hf_model(base)  # routers spread, the correction bias set
        targets = ["q_proj", "gate", *EXPERTS]
    else:
        from tests.acceptance.harness import random_model
        from tests.model.test_moe_expert_lora import COMMON, MODELS

        config_cls, model_cls, extra, names = MODELS["mixtral"]
        random_model(getattr(transformers, model_cls),
                     getattr(transformers, config_cls)(**{**COMMON, **extra})).save_pretrained(base)
        targets = ["q_proj", "gate", *names]
    assert_peft_trains_what_we_train(base, targets, tmp_path)


@pytest.mark.parametrize("target", ["shared_experts.gate_proj", "layers.0.mlp.gate_proj"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_the_shared_experts_and_the_dense_block_stay_refused_as_peft_moves_them(tmp_path, family, target):
    """PEFT 0.21 moves a target ending in .gate_proj onto the routed experts' fused gate_up_proj (with up_proj) and
    leaves the shared experts' and the dense block's Linears without LoRA (measured below with get_peft_model): a
    recipe naming them would train something else than it says, so it is refused with the sets that work."""
    pair = [target, target.replace("gate_proj", "up_proj")]
    config = tiny_config(family)
    config.save_pretrained(tmp_path)  # config.json: what read_config reads
    model = transformers.AutoModelForCausalLM.from_config(config)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=pair))
    adapted = {n.split(".lora_")[0] for n, p in theirs.named_parameters() if p.requires_grad}
    assert adapted == {f"base_model.model.model.layers.{i}.mlp.experts" for i in (1, 2)}
    with pytest.raises(UserError) as err:
        trainable_params(read_config(tmp_path), "lora", 2, pair)
    message = err.value.messages[0]
    assert message.startswith(f"lora_target: '{target}' picks MLP modules of this "), message
    assert "gate_proj, up_proj and down_proj together, down_proj alone, or gate_proj and up_proj together" in message


def test_an_experts_a_is_drawn_as_peft_draws_it(tmp_path):
    """PEFT's ParamWrapper holds an expert tensor's lora_A as an nn.Linear(in, r E) (peft/tuners/lora/layer.py:2455)
    and draws it by kaiming_uniform_(a = sqrt(5)) (:338): uniform within 1 / sqrt(in), the fused tensor's input
    width (hidden for gate_up_proj and the router's gate.weight, the expert's width for down_proj), not the book's
    1 / sqrt(rank) of the dense LoRA. Ours against PEFT's own draw on the same GLM-4.5 config (rank 8: 4096 values on
    gate_up_proj, 1024 on down_proj, 256 on the router per block; both drawn from seed 0): the same largest magnitude
    and standard deviation (within 5%: sampling), B zero. Failed
    before: the pair's A within 1 / sqrt(2r) = 0.25 where PEFT's is within 1 / sqrt(32), 1.41 times wider; down_proj's
    1 / sqrt(8) against 1 / sqrt(16)."""
    import torch

    from pipeline.model.gpt import GPTModel
    from pipeline.model.lora import lora_modules

    config = tiny_config("glm4_moe")
    config.save_pretrained(tmp_path)
    ours = GPTModel(read_config(tmp_path))
    apply_lora(ours, ["gate", *EXPERTS], rank=8, alpha=16, seed=0)
    torch.manual_seed(0)  # PEFT draws from torch's generator
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_config(config),
                                 peft.LoraConfig(r=8, lora_alpha=16, target_modules=["gate", *EXPERTS]))
    for part, ending, peft_module in (("gate_up_proj", ".gate_proj", "mlp.experts.base_layer"),
                                      ("down_proj", ".down_proj", "mlp.experts"), ("router", ".mlp.gate", "mlp.gate")):
        pairs = [w.lora for n, w in lora_modules(ours).items() if n.endswith(ending)]
        assert pairs and not any(p.B.any() for p in pairs)
        mine = torch.cat([p.A.detach().flatten() for p in pairs])
        peft_a = torch.cat([m.lora_A["default"].weight.detach().flatten() for n, m in theirs.named_modules()
                            if n.endswith(peft_module) and hasattr(m, "lora_A")])
        assert mine.numel() == peft_a.numel(), part
        assert mine.abs().max() / peft_a.abs().max() == pytest.approx(1, abs=0.05), part
        assert mine.std() / peft_a.std() == pytest.approx(1, abs=0.05), part
