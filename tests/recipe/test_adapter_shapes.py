"""model.adapter_shape_problems against PEFT's own adapters: one of the model's size fits (Linear layers, and
GPT-2's Conv1D stored in x out), one of another hidden size is named with its first tensor and both sizes."""
from __future__ import annotations

import pytest

from pipeline.recipe.rules.model import adapter_shape_problems
from tests.acceptance.harness import hf_model

peft = pytest.importorskip("peft")

TARGETS = {"qwen3": ["q_proj", "down_proj"], "gpt2": ["c_attn", "c_fc"]}
WIDTH = {"qwen3": "hidden_size", "gpt2": "n_embd"}


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_peft_adapters_fit_their_model_and_no_other(family, tmp_path):
    small = {"vocab_size": 128}
    hf_model(family, **small).save_pretrained(tmp_path / "base")
    for name, width in (("same", 32), ("other", 48)):
        model = hf_model(family, **small, **{WIDTH[family]: width})
        config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS[family],
                                 fan_in_fan_out=family == "gpt2")
        peft.get_peft_model(model, config).save_pretrained(tmp_path / name)
    assert adapter_shape_problems("adapter_name_or_path", str(tmp_path / "same"), "model_name_or_path",
                                  str(tmp_path / "base")) == []
    [(key, message)] = adapter_shape_problems("adapter_name_or_path", str(tmp_path / "other"),
                                                    "model_name_or_path", str(tmp_path / "base"))
    assert key == "adapter_name_or_path"
    assert "trained on a model with hidden size 48; this model has 32" in message, message
