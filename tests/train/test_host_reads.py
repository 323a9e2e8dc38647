"""How often the training loop reads device values on the host (float(t), t.item(), int(t), t.tolist(), ...).

Each such read stops the host until the device has run everything queued, so the next micro-batch's kernels cannot
be queued meanwhile: at small batches the GPU idles (1-7% model-FLOPs utilisation at batch 8 on an H100). The loop
reads once per optimizer step (nan_policy stop's check before the update) and once more at each log point.

There is no GPU here, so "on the device" is told apart by where a tensor came from: the loader's batches are made
HostTensor (an ordinary tensor subclass; ops on it alone stay HostTensor), the batch the model sees is a plain tensor
(the device batch), and a read counts when the tensor read is not a HostTensor and the reading line is in pipeline/
(DeepSpeed's own reads are listed in the report of this change, not counted: we cannot remove them).
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from pipeline.runtime.log import read_log
from pipeline.train import loop
from pipeline.train.run import train
from tests.train.helpers import BASE_SFT
from tests.train.test_dpo import dpo_recipe  # noqa: F401 - the ranking data fixture
from tests.train.test_kto import kto_recipe  # noqa: F401 - the KTO data fixture

PIPELINE = str(Path(loop.__file__).resolve().parents[1])
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


class HostTensor(torch.Tensor):
    """A tensor of a loader batch, in host memory: reading it (or what is computed from it alone) is no sync."""


def count_device_reads(monkeypatch: pytest.MonkeyPatch) -> dict[int, list[str]]:
    """{optimizer step: ['method file:line', ...]} of the device reads made from pipeline/ inside Trainer.train."""
    reads: dict[int, list[str]] = {}
    now = {"step": None}

    def counting(name: str, original):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1)
            if (now["step"] is not None and not isinstance(self, HostTensor)
                    and caller.f_code.co_filename.startswith(PIPELINE)):
                where = f"{name} {Path(caller.f_code.co_filename).name}:{caller.f_lineno}"
                reads.setdefault(now["step"], []).append(where)
            return original(self, *args, **kwargs)
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))

    draw, to_device = loop.BatchStream.next, loop._to_device
    monkeypatch.setattr(loop.BatchStream, "next",
                        lambda self: {k: v.as_subclass(HostTensor) for k, v in draw(self).items()})
    monkeypatch.setattr(loop, "_to_device",
                        lambda batch, device: {k: v.as_subclass(torch.Tensor) for k, v in to_device(batch, device).items()})

    step, run = loop.Trainer.optimizer_step, loop.Trainer.train

    def optimizer_step(self, window):
        now["step"] = self.state.global_step + 1  # its reads, and those of the log line after it
        reads.setdefault(now["step"], [])
        return step(self, window)

    def counted_train(self):
        try:
            return run(self)
        finally:
            now["step"] = None

    monkeypatch.setattr(loop.Trainer, "optimizer_step", optimizer_step)
    monkeypatch.setattr(loop.Trainer, "train", counted_train)
    return reads


def record_step_losses(monkeypatch: pytest.MonkeyPatch) -> list[list[float]]:
    """Each step's micro-batch losses as the loop weighs them (loss x step_scale), read here, in the test."""
    steps: list[list[float]] = []
    objective, scale = loop.Trainer.language_model_loss, loop.Trainer.step_scale
    current = {"scale": None}

    def step_scale(self, batches):
        current["scale"] = scale(self, batches)
        steps.append([])
        return current["scale"]

    def language_model_loss(self, batch):
        loss, metrics = objective(self, batch)
        steps[-1].append(float((loss * current["scale"]).detach()))
        return loss, metrics

    monkeypatch.setattr(loop.Trainer, "step_scale", step_scale)
    monkeypatch.setattr(loop.Trainer, "language_model_loss", language_model_loss)
    return steps


def test_sft_lora_reads_the_device_once_a_step_and_once_more_a_log_line(make_recipe, monkeypatch):
    """sft, LoRA, 4 micro-batches a step, a log line every 5 steps (and at the last): 1 read a step (the losses'
    finiteness before the update), 2 at a logged step (+ the log line's loss and grad norm, one transfer). Before,
    every micro-batch read 5 times (the model's right-padding check, the loss twice, two token counts on the device
    batch) and every step once more (the grad norm): 21 a step. The logged losses are still exactly the double arithmetic of the values read per
    micro-batch, as the loop computed them then (mean over micro-batches, summed over the window's steps)."""
    reads = count_device_reads(monkeypatch)
    losses = record_step_losses(monkeypatch)
    r = make_recipe(BASE_SFT, name="reads", per_device_train_batch_size=2, gradient_accumulation_steps=4, logging_steps=5, max_steps=6,
                    warmup_steps=0, eval_strategy="no", do_eval=False)
    result = train(r)
    per_step = {step: len(where) for step, where in reads.items()}
    assert per_step == {1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2}, reads
    assert all(where.startswith("tolist loop.py:") for found in reads.values() for where in found), reads

    step_loss = []
    for values in losses:
        total = 0.0
        for value in values:
            total += value / 4
        step_loss.append(total)
    log = read_log(result.output_dir / "trainer_log.jsonl")
    assert [rec["step"] for rec in log] == [5, 6]
    assert log[0]["loss"] == sum(step_loss[:5]) / 5 and log[1]["loss"] == step_loss[5]  # to the bit
    assert all(isinstance(rec["grad_norm"], float) and rec["grad_norm"] > 0 for rec in log)



@pytest.mark.parametrize("stage", ["dpo", "kto", "rm", "asft"])
def test_preference_and_reward_objectives_read_the_device_once_a_step(stage, request, monkeypatch):
    """dpo (with the BCO term), kto, rm, sft's ASFT loss: the objective's metrics stay on the device, summed in the Window, and are
    read with the log line's loss (one transfer); kto's KL estimate and dpo's BCO running mean are collectives on the
    device; the right-padded batch reaches the model without its mask, as pt / sft's (loop.lm_batch). 2 micro-batches
    a step, a log line at step 2: 1 read a step, 2 at a logged step. Before, every micro-batch read each metric (dpo
    6, rm 3, kto 7 values), kto / BCO one more for their collective, kto its chosen count, and every forward (dpo and
    kto: policy and reference) the mask's right padding."""
    keys = dict(gradient_accumulation_steps=2, logging_steps=2, max_steps=2, warmup_steps=0, eval_strategy="no",
                do_eval=False, save_steps=1000)
    if stage == "dpo":
        r = request.getfixturevalue("dpo_recipe")(name="reads_dpo", pref_bco_weight=0.5, **keys)
    elif stage == "kto":
        r = request.getfixturevalue("kto_recipe")(name="reads_kto", **keys)
    elif stage == "asft":
        r = request.getfixturevalue("make_recipe")(BASE_SFT, name="reads_asft", use_asft_loss=True, **keys)
    else:
        from tests.train.test_reward_train import BASE_RM

        request.getfixturevalue("dpo_recipe")  # the ranking data
        r = request.getfixturevalue("make_recipe")({**BASE_RM, "zero_stage": 0, **keys}, name="reads_rm")
    reads = count_device_reads(monkeypatch)
    result = train(r)
    assert {step: len(where) for step, where in reads.items()} == {1: 1, 2: 2}, reads
    log = read_log(result.output_dir / "trainer_log.jsonl")
    assert [rec["step"] for rec in log] == [2]
    assert all(isinstance(rec["loss"], float) for rec in log)
