"""model.adapter_shape_problems against PEFT's own adapters, LoRA and OFT: one of the model's size fits (Linear
layers, and GPT-2's Conv1D stored in x out), one of another hidden size is named with its first tensor and both
sizes."""
from __future__ import annotations

import pytest

from pipeline.recipe.rules.model import adapter_shape_problems
from tests.acceptance.harness import hf_model

peft = pytest.importorskip("peft")

TARGETS = {"qwen3": ["q_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
WIDTH = {"qwen3": "hidden_size", "gpt2": "n_embd"}


def peft_config(kind: str, family: str):
    """A LoRA or OFT config PEFT saves for `family` (GPT-2's Conv1D stored in x out: LoRA only, as PEFT's OFT)."""
    if kind == "oft":
        return peft.OFTConfig(r=0, oft_block_size=8, target_modules=TARGETS[family])
    return peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2")


@pytest.mark.parametrize("family, kind", [("qwen3", "lora"), ("gpt2", "lora"), ("qwen3", "oft")])
def test_peft_adapters_fit_their_model_and_no_other(family, kind, tmp_path):
    """OFT: q_proj's oft_R.weight is (in / 8 blocks, 28 = 8 x 7 / 2) by PEFT's OFTLayer: (4, 28) for hidden size
    32, (6, 28) for 48."""
    small = {"vocab_size": 128}
    hf_model(family, **small).save_pretrained(tmp_path / "base")
    for name, width in (("same", 32), ("other", 48)):
        model = hf_model(family, **small, **{WIDTH[family]: width})
        peft.get_peft_model(model, peft_config(kind, family)).save_pretrained(tmp_path / name)
    assert adapter_shape_problems("adapter_name_or_path", str(tmp_path / "same"), "model_name_or_path",
                                  str(tmp_path / "base")) == []
    [(key, message)] = adapter_shape_problems("adapter_name_or_path", str(tmp_path / "other"),
                                                    "model_name_or_path", str(tmp_path / "base"))
    assert key == "adapter_name_or_path"
    assert "trained on a model with hidden size 48; this model has 32" in message, message
    if kind == "oft":
        assert "self_attn.q_proj.oft_R.weight' has shape [6, 28] but" in message and "expects [4, 28] there" in \
            message, message
