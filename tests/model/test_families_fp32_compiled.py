"""Family.held_fp32 searches patterns compiled once per family (in __post_init__), not a regex built per tensor:
every load and cast asks it for each tensor. Failed before: held_fp32 called re.search on a pattern joined per call.
What it answers is tests/model/test_families_bf16.py's (against transformers' classes); here the dtype table by hand
from transformers 5.24 PreTrainedModel._get_dtype_plan (modeling_utils.py:3844-3858): _keep_in_fp32_modules_strict
fp32 in bf16 and fp16, _keep_in_fp32_modules in fp16 only, nothing in fp32."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.model import families
from pipeline.model.families import FAMILIES


def test_held_fp32_builds_no_regex_per_call(monkeypatch):
    glm, oss = FAMILIES["glm4_moe"], FAMILIES["gpt_oss"]

    def refused(*args, **kwargs):
        raise AssertionError("held_fp32 built a regex on a call")

    monkeypatch.setattr(families.re, "search", refused)
    monkeypatch.setattr(families.re, "compile", refused)
    name = "model.layers.1.mlp.gate.weight"
    assert glm.held_fp32(name, torch.bfloat16) and glm.held_fp32(name, "float16")
    assert not glm.held_fp32(name, torch.float32) and not glm.held_fp32("model.layers.1.mlp.up_proj.weight", "bfloat16")
    norm = "model.layers.0.input_layernorm.weight"
    assert oss.held_fp32(norm, torch.float16) and not oss.held_fp32(norm, torch.bfloat16)


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3"])
def test_a_wrapper_copy_compiles_its_own(family):
    """Wrapper.family_of's dataclasses.replace copy answers as the family it copies."""
    copy = dataclasses.replace(FAMILIES[family], prefix="model.language_model.")
    assert copy.held_fp32("model.language_model.layers.3.mlp.gate.e_score_correction_bias", "bfloat16")
    assert not copy.held_fp32("model.language_model.layers.3.mlp.experts.0.up_proj.weight", "float16")
