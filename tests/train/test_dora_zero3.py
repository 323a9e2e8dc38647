"""DoRA under ZeRO-3, and resumed: what a magnitude vector adds to the trainer.

DoRA's forward reads its Linear's weight outside that Linear's own forward (the norm of W + s B A); under ZeRO-3
the weight is a partition there, which DeepSpeed gathers as an external parameter of the running module. The
magnitudes are trainable parameters, so the checkpoint and the export gather them like A and B. Golden values:
PEFT's loss with the trained adapter; for the resume, the uninterrupted run, bitwise.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.data.loaders import make_loader
from pipeline.recipe.args import data_args
from pipeline.train import checkpoint
from pipeline.train.run import train
from tests.acceptance.harness import assert_same_run, crash_copy, write_hf_checkpoint
from tests.train.helpers import BASE_SFT, GOLDEN_GPT2
from tests.train.test_golden_hf import hf_loss

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def test_dora_under_zero3_equals_peft_and_resumes_bitwise(make_recipe, workdir, monkeypatch):
    write_hf_checkpoint(workdir / "gpt2")
    keys = dict(GOLDEN_GPT2, max_steps=2, save_steps=1, zero_stage=3, use_dora=True, lora_dropout=0.1)
    r = make_recipe(BASE_SFT, name="straight", **keys)
    straight = train(r)
    assert straight.exit_code == 0
    batch = next(iter(make_loader(data_args(r), "train", rank=0, world_size=1, epoch=0, shuffle=True)))
    base = transformers.GPT2LMHeadModel.from_pretrained(workdir / "gpt2").eval()
    before = hf_loss(base, batch)
    tuned = peft.PeftModel.from_pretrained(base, straight.output_dir / "adapter").eval()
    with torch.no_grad():
        ours = float(straight.engine.module.eval()(batch["input_ids"], attention_mask=batch["attention_mask"],
                                                   labels=batch["labels"]))
    golden = hf_loss(tuned, batch)
    assert ours == pytest.approx(golden, rel=1e-5)
    assert abs(golden - before) > 1e-2  # the adapter changed the model

    crash_copy(straight.output_dir, workdir / "saves" / "resumed", 1)
    loaded, load = [], checkpoint.load
    monkeypatch.setattr(checkpoint, "load", lambda engine, path, *rest: loaded.append(path.name) or load(engine, path, *rest))
    resumed = train(make_recipe(BASE_SFT, name="resumed", resume_from_checkpoint="latest", **keys))
    assert resumed.exit_code == 0 and loaded == ["checkpoint-1"]  # resumed, not trained again from the start
    assert_same_run(straight.output_dir, resumed.output_dir, "adapter/adapter_model.safetensors")
