"""The expert-settings refusal (rules.method: lora_dropout, use_dora, pissa_init, finetuning_type oft beside MoE
expert or router names in lora_target) names what lora_target names: the experts, the router, or both, and what PEFT
0.21's ParamWrapper wraps for each (transformers 5's fused expert tensors; the router's 2-D weight, target_parameters
gate.weight, peft/utils/transformers_weight_conversion.py _MOE_TARGET_MODULE_MAPPING). Before: "names the MoE experts
(gate)" for the router alone."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.recipe import resolve

transformers = pytest.importorskip("transformers")

QWEN3_MOE = "model_name_or_path: moe\ndataset: alpaca_demo\ncutoff_len: 64\nlora_dropout: 0.1\n"


@pytest.fixture(autouse=True)
def moe(tmp_path):
    """A tiny Qwen3-MoE's config.json: what the rules read of the model."""
    from tests.acceptance.test_qwen3_moe_cli import TINY

    transformers.Qwen3MoeConfig(**TINY, vocab_size=256).save_pretrained(tmp_path / "moe")


@pytest.mark.parametrize("target, said, fix", [
    ("q_proj,gate", "the MoE router (gate), which PEFT 0.21 adapts as its ParamWrapper on the router's weight",
     "take gate out of lora_target"),
    ("q_proj,gate_proj,up_proj", "the MoE experts (gate_proj, up_proj), which PEFT 0.21 adapts as its ParamWrapper on"
     " transformers 5's fused expert tensors", "take gate_proj, up_proj out of lora_target"),
    ("down_proj,gate", "the MoE experts (down_proj) and the MoE router (gate), which PEFT 0.21 adapts as its"
     " ParamWrapper on transformers 5's fused expert tensors and the router's weight",
     "take down_proj, gate out of lora_target"),
], ids=["router", "experts", "both"])
def test_the_message_names_the_experts_or_the_router_as_lora_target_does(write, target, said, fix):
    write("r.yaml", QWEN3_MOE + f"lora_target: {target}\n")
    with pytest.raises(UserError) as err:
        resolve("r.yaml", [])
    assert err.value.messages == [f"r.yaml:4:15: lora_dropout: given 0.1; lora_target names {said}, which refuses"
                                  " dropout (it cannot apply it to the input of one expert's weights): set lora_dropout:"
                                  " 0"]
    with pytest.raises(UserError) as err:
        resolve("r.yaml", ["lora_dropout=0", "use_dora=true"])
    assert err.value.messages[0].endswith(f"which refuses DoRA: remove use_dora, or {fix}"), err.value.messages
