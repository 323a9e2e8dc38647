"""Training from a checkpoint in the layout users download (transformers' save_pretrained), via the CLI.

Regression for issue 19: Conv1D weights transposed on load were strided views that became parameters,
and DeepSpeed's broadcast (p.data.view(torch.uint8)) refused them; every such run exited 1.
"""
from __future__ import annotations

import json

from tests.acceptance.harness import pipeline, write_recipe


def test_one_lora_step_from_a_save_pretrained_gpt2(workdir, hf_checkpoint):
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                          output_dir="saves/r", max_steps=1)
    pipeline("build", recipe, cwd=workdir)
    done = pipeline("train", recipe, cwd=workdir)
    assert "must be 1 to view" not in done.stderr
    results = json.loads((workdir / "saves/r/all_results.json").read_text(encoding="utf-8"))
    assert results["global_step"] == 1
    assert (workdir / "saves/r/adapter/adapter_model.safetensors").is_file()
