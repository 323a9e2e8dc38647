"""LLaMA-Factory's extras/oft/llama3_oft_sft.yaml (finetuning_type: oft), unchanged but for its model line, through
the CLI as a user types it: build, train, merge, on a tiny transformers-written Llama and LLaMA-Factory's demo data.

Golden values are PEFT's and transformers': PeftModel.from_pretrained loads our adapter/ (an OFT adapter) onto the
checkpoint and gives the logits our loader gives; transformers loads merged/, which equals PEFT's merge_and_unload of
that adapter. The unit checks against PEFT (forward, gradients, merge, files) are tests/model/test_oft.py's.
"""
from __future__ import annotations

import json

import pytest

from tests.acceptance.harness import assert_close, pipeline, trained_model
from tests.compat.test_lf_examples import ROWS, tiny_model
from tests.compat.test_lf_recipes import lf_checkout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EXAMPLE = "extras/oft/llama3_oft_sft.yaml"


# ZeRO-3 partitions the rotations' parameters like any other (~30 s more: slow)
@pytest.mark.parametrize("zero_stage", [0, pytest.param(3, marks=pytest.mark.slow)])
def test_the_oft_example_trains_loads_in_peft_and_merges(tmp_path, zero_stage):
    assert ROWS[EXAMPLE] == "trains"
    base = tiny_model(tmp_path / "llama", "llama")
    work = lf_checkout(tmp_path / "lf", str(base))
    recipe = f"examples/{EXAMPLE}"
    # max_steps=2, gradient_accumulation_steps=1: test time (warmup_ratio 0.1 makes step 1's learning rate 0, as in
    # LLaMA-Factory; step 2 turns);
    # export_dtype=fp32 compares merged/ with PEFT's fp32 merge
    used = ["max_steps=2", "gradient_accumulation_steps=1", f"zero_stage={zero_stage}", "export_dtype=fp32"]
    pipeline("build", recipe, cwd=work)
    pipeline("train", recipe, *used, cwd=work, timeout=600)
    pipeline("merge", recipe, *used, cwd=work, timeout=600)
    run = work / "saves/llama3-8b/oft/sft"
    config = json.loads((run / "adapter/adapter_config.json").read_text("utf-8"))
    assert (config["peft_type"], config["r"], config["oft_block_size"]) == ("OFT", 0, 32)
    from safetensors.torch import load_file

    tensors = load_file(run / "adapter/adapter_model.safetensors")
    assert tensors and all(k.endswith("oft_R.weight") for k in tensors)
    assert all(v.abs().max() > 0 for v in tensors.values())  # every rotation turned
    ids = torch.tensor([[3, 17, 42, 99, 120, 7]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                run / "adapter").eval()
        golden = theirs(ids).logits
        assert_close(golden, trained_model(recipe, work, used)(ids), rel=1e-5)
        merged = transformers.AutoModelForCausalLM.from_pretrained(run / "merged").eval()
        assert_close(golden, merged(ids).logits, rel=1e-5)
    folded = theirs.merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, folded[key], rtol=1e-5, atol=1e-6, msg=key)
