"""A LLaMA-Factory PiSSA recipe (pissa_init, exact SVD, pissa_convert, ZeRO-3) through the CLI as a user types it:
build, train, merge, and a resume after a crash.

Golden values are PEFT's and transformers': PeftModel.from_pretrained puts our adapter/ onto the ORIGINAL checkpoint
(the converted adapter is a plain LoRA for it) and must give the logits of our merged/, which transformers loads; the
run resumed from its step-1 checkpoint ends bitwise equal to the uninterrupted one (the residual base rebuilt from the
starting pairs the checkpoint's adapter keeps).
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.acceptance.harness import (assert_close, assert_same_run, cli_env, crash_copy, pipeline, write_data,
                                      write_hf_checkpoint, write_recipe)

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_a_pissa_recipe_trains_converts_merges_and_resumes(tmp_path):
    write_data(tmp_path / "data")
    write_hf_checkpoint(tmp_path / "qwen2", "qwen2", small_vocab=True)
    recipe = write_recipe(tmp_path / "pissa.yaml", model_name_or_path=str(tmp_path / "qwen2"), dataset_dir="data",
                          template="qwen", cutoff_len=256, output_dir="saves/pissa", pissa_init=True, pissa_iter=-1,
                          pissa_convert=True, save_steps=1, learning_rate=0.02, export_dtype="fp32",
                          zero_stage=3)  # the partitioned case: the SVD, the export and the resume all meet it
    pipeline("build", recipe, cwd=tmp_path)
    done = pipeline("train", recipe, cwd=tmp_path)
    assert "pissa_convert: accepted without effect" in done.stderr
    # torch's FutureWarnings on the collectives DeepSpeed's ZeRO calls (deepspeed_compat.quiet_deprecated_collectives)
    # were printed many times a step; what reaches the user's stderr is ours
    assert not [line for line in done.stderr.splitlines() if "FutureWarning" in line or "deprecated" in line]
    pipeline("merge", recipe, cwd=tmp_path)

    out = tmp_path / "saves/pissa"
    assert json.loads((out / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)  # rank 4 x 2
    vocab = json.loads((tmp_path / "qwen2/config.json").read_text())["vocab_size"]
    x = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(0))
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen2").eval()
    with torch.no_grad():
        before = base(x).logits
        golden = peft.PeftModel.from_pretrained(base, out / "adapter").eval()(x).logits
        assert (golden - before).abs().max() > 1e-2  # trained
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert_close(golden, merged(x).logits, rel=1e-5)

    crashed = crash_copy(out, tmp_path / "saves/crashed", 1)
    resumed = pipeline("train", recipe, f"output_dir={crashed.relative_to(tmp_path)}", "resume_from_checkpoint=latest",
                       cwd=tmp_path, env=cli_env(PYTHONWARNINGS="default"))
    assert "(the resumed checkpoint's starting pairs) on the residual base" in resumed.stderr  # no second SVD
    assert "FutureWarning: `torch.distributed.reduce_scatter_tensor` is deprecated" in resumed.stderr  # the way back
    assert_same_run(out, crashed, "adapter/adapter_model.safetensors")
