"""A LLaMA-Factory recipe with use_dora: true, through the CLI as a user types it: build, train, merge.

Golden values are PEFT's: its PeftModel.from_pretrained on our adapter/ (the magnitudes under its own names) and
its merge_and_unload; transformers loads our merged/.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.acceptance.harness import (
    assert_close,
    pipeline,
    trained_model,
    write_data,
    write_hf_checkpoint,
    write_recipe,
)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_a_dora_recipe_trains_loads_in_peft_and_merges(tmp_path):
    write_data(tmp_path / "data")
    write_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    recipe = write_recipe(tmp_path / "dora.yaml", model_name_or_path=str(tmp_path / "gpt2"), dataset_dir="data",
                          output_dir="saves/dora", use_dora=True, lora_dropout=0.1,
                          learning_rate=0.05, export_dtype="fp32")
    pipeline("build", recipe, cwd=tmp_path)
    pipeline("train", recipe, cwd=tmp_path)
    pipeline("merge", recipe, cwd=tmp_path)

    out = tmp_path / "saves/dora"
    assert json.loads((out / "adapter/adapter_config.json").read_text())["use_dora"] is True
    x = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    base = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    with torch.no_grad():
        before = base(x).logits
        tuned = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        golden = tuned(x).logits
        assert (golden - before).abs().max() > 1e-2  # trained: the magnitudes and B moved
        assert_close(golden, trained_model(recipe, tmp_path)(x), rel=1e-5)
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert_close(golden, merged(x).logits, rel=1e-5)
    folded = tuned.merge_and_unload().state_dict()
    for key, value in merged.state_dict().items():
        torch.testing.assert_close(value, folded[key], rtol=1e-5, atol=1e-6, msg=key)
