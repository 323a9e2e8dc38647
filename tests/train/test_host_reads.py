"""How often the training loop reads device values on the host (float(t), t.item(), int(t), t.tolist(), ...).

Each such read stops the host until the device has run everything queued, so the next micro-batch's kernels cannot
be queued meanwhile: at small batches the GPU idles (1-7% model-FLOPs utilisation at batch 8 on an H100). The loop
reads once per optimizer step (nan_policy stop's check before the update) and once more at each log point.

Evaluation (during training at eval points, and the eval stage's loss and pair scores) reads nothing per batch and
once at its end (its sums, after the one all-reduce of several ranks).

There is no GPU here, so "on the device" is told apart by where a tensor came from: the loader's batches
(Loader.batch) are made HostTensor (an ordinary tensor subclass; ops on it alone stay HostTensor), what .to() makes of
them is a plain tensor (the device batch: to_device's copy, or one made by hand; a .to(dtype) on the host would count
too, which errs on the strict side), and a read counts when the tensor read is not a HostTensor and the reading line is in pipeline/
(DeepSpeed's own reads are listed in the report of this change, not counted: we cannot remove them).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.data.loaders import Loader
from pipeline.evaluate import preference as eval_preference, reward as eval_reward, run as eval_run
from pipeline.recipe import resolve
from pipeline.runtime.log import read_log
from pipeline.train import loop
from pipeline.train.asft import AsftObjective
from pipeline.train.ppo import PPOTrainer
from pipeline.train.preference import KtoObjective, PreferenceObjective
from pipeline.train.reward import RewardObjective
from pipeline.train.run import train
from tests.train.helpers import BASE_SFT
from tests.train.test_dpo import dpo_recipe  # noqa: F401 - the ranking data fixture
from tests.train.test_kto import kto_recipe  # noqa: F401 - the KTO data fixture

PIPELINE = str(Path(loop.__file__).resolve().parents[1])
READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")
# what evaluates: during training (pt / sft, dpo, kto, ASFT, rm) and the eval stage (loss, pair log-probs, rm scores)
EVALUATIONS = ((loop, "evaluate"), (PreferenceObjective, "evaluate"), (KtoObjective, "evaluate"),
               (AsftObjective, "evaluate"), (RewardObjective, "evaluate"), (eval_run, "split_loss"),
               (eval_preference, "split_logps"), (eval_reward, "split_scores"))


class HostTensor(torch.Tensor):
    """A tensor of a loader batch, in host memory: reading it (or what is computed from it alone) is no sync; what
    .to() makes of it is on the device (a plain tensor)."""

    def to(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return super().to(*args, **kwargs).as_subclass(torch.Tensor)


def count_device_reads(monkeypatch: pytest.MonkeyPatch) -> dict[Any, list[str]]:
    """{optimizer step: ['method file:line', ...]} of the device reads made from pipeline/ inside Trainer.train; and
    {("eval", n, b): [...]} of those made inside the n-th evaluation (EVALUATIONS) while it holds its b-th batch
    (b = -1 before the first; the last batch's entry includes what the evaluation reads after its loop)."""
    reads: dict[Any, list[str]] = {}
    now: dict[str, Any] = {"step": None, "evaluations": 0}

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

    batch = Loader.batch

    def host_batch(self, k):
        if isinstance(now["step"], tuple):  # an evaluation draws its next batch
            kind, n, b = now["step"]
            now["step"] = (kind, n, b + 1)
            reads.setdefault(now["step"], [])
        return {key: value.as_subclass(HostTensor) for key, value in batch(self, k).items()}

    monkeypatch.setattr(Loader, "batch", host_batch)

    def evaluating(original):
        def evaluation(*args, **kwargs):
            outer, now["step"] = now["step"], ("eval", now["evaluations"], -1)
            now["evaluations"] += 1
            reads.setdefault(now["step"], [])
            try:
                return original(*args, **kwargs)
            finally:
                now["step"] = outer
        return evaluation

    for owner, name in EVALUATIONS:
        monkeypatch.setattr(owner, name, evaluating(getattr(owner, name)))

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
    ppo_step = PPOTrainer.optimizer_step  # stage ppo's own step

    def ppo_optimizer_step(self, window):
        now["step"] = self.state.global_step + 1
        reads.setdefault(now["step"], [])
        return ppo_step(self, window)

    monkeypatch.setattr(PPOTrainer, "optimizer_step", ppo_optimizer_step)
    monkeypatch.setattr(loop.Trainer, "train", counted_train)
    return reads


def step_reads(reads: dict[Any, list[str]]) -> dict[int, int]:
    """{optimizer step: device reads}, evaluation's left out."""
    return {step: len(where) for step, where in reads.items() if isinstance(step, int)}


def evaluation_reads(reads: dict[Any, list[str]]) -> list[list[int]]:
    """Per evaluation, its reads [before its first batch, while it holds batch 0, ..., the last batch and the end]."""
    found: dict[int, dict[int, int]] = {}
    for key, where in reads.items():
        if isinstance(key, tuple):
            found.setdefault(key[1], {})[key[2]] = len(where)
    return [[counts[b] for b in sorted(counts)] for _, counts in sorted(found.items())]


def assert_evaluations_read_once_at_the_end(reads: dict[Any, list[str]], evaluations: int) -> None:
    """`evaluations` evaluations of 2 batches or more, each reading nothing before or per batch and once at the end
    (after its last batch: the sums, in one transfer)."""
    found = evaluation_reads(reads)
    assert len(found) == evaluations, found
    for counts in found:
        assert len(counts) >= 3 and counts == [0] * (len(counts) - 1) + [1], (found, reads)


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
                    warmup_steps=0, eval_strategy="no", do_eval=True, compute_accuracy=True,
                    per_device_eval_batch_size=1)
    result = train(r)
    assert step_reads(reads) == {1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2}, reads
    assert all(where.startswith("tolist batches.py:") for step, found in reads.items() if isinstance(step, int)
               for where in found), reads
    # the evaluation at the last step (4 val rows, 1 a batch, with compute_accuracy): before, 3 reads a batch (the
    # loss, the mask's right padding, the accuracy sum; 4 with int(examples.max()) under packing)
    assert_evaluations_read_once_at_the_end(reads, 1)

    # the eval stage's loss over the val split, of the base model and the tuned one: before, 2 reads a batch
    eval_run.run(resolve(r.recipe_path, ["max_eval_samples=1", "max_new_tokens=2"], command="eval"))
    assert_evaluations_read_once_at_the_end(reads, 3)

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
    device; the right-padded batch reaches the model without its mask, as pt / sft's (batches.lm_batch). 2 micro-batches
    a step, a log line at step 2: 1 read a step, 2 at a logged step. Before, every micro-batch read each metric (dpo
    6, rm 3, kto 7 values), kto / BCO one more for their collective, kto its chosen count, and every forward (dpo and
    kto: policy and reference) the mask's right padding; kto with pref_ftx read its chosen count per micro-batch until
    that count was the selection's size."""
    keys = dict(gradient_accumulation_steps=2, logging_steps=2, max_steps=2, warmup_steps=0, eval_strategy="no",
                do_eval=True, per_device_eval_batch_size=1 if stage == "asft" else 2, save_steps=1000)
    if stage == "dpo":
        r = request.getfixturevalue("dpo_recipe")(name="reads_dpo", pref_bco_weight=0.5, **keys)
    elif stage == "kto":
        r = request.getfixturevalue("kto_recipe")(name="reads_kto", pref_ftx=0.5, **keys)  # its chosen rows counted too
    elif stage == "asft":
        r = request.getfixturevalue("make_recipe")(BASE_SFT, name="reads_asft", use_asft_loss=True, **keys)
    else:
        from tests.train.test_reward_train import BASE_RM

        request.getfixturevalue("dpo_recipe")  # the ranking data
        r = request.getfixturevalue("make_recipe")({**BASE_RM, "zero_stage": 0, **keys}, name="reads_rm")
    reads = count_device_reads(monkeypatch)
    result = train(r)
    assert step_reads(reads) == {1: 1, 2: 2}, reads
    log = read_log(result.output_dir / "trainer_log.jsonl")
    assert [rec["step"] for rec in log] == [2]
    assert all(isinstance(rec["loss"], float) for rec in log)
    # the evaluation at the last step (3 or 4 batches): before, every batch read each metric's sum and the pair
    # count (kto: its loss, 7 metrics and the row count), the padding (dpo, kto: in both forwards)
    assert_evaluations_read_once_at_the_end(reads, 1)
    if stage in ("dpo", "rm"):  # the eval stage's pair log-probs (dpo; kto's are the same) and rm's scores,
        # base and tuned: before, one read a batch (the columns, in one transfer)
        eval_run.run(resolve(r.recipe_path, ["max_eval_samples=1", "max_new_tokens=2"], command="eval"))
        assert_evaluations_read_once_at_the_end(reads, 3)



def test_a_ppo_step_reads_the_device_once_an_update_and_once_for_the_kl_controller(monkeypatch):
    """Stage ppo's step past its rollout (generation reads each new token to know when to stop; a reward server's
    scorer reads the ids it decodes): ppo_buffer_size 2 and ppo_epochs 2, 2 mini-batches an update, so 4 updates
    and 8 mini-batches (tests/train/test_ppo_parts.py's step, its rollouts given). 1 read an update (nan_policy
    stop's check of its mini-batch losses, before the engine.step that applies it) and 1 a step (the mean KL the
    controller moves by, as TRL 0.9.6 reads it): 5. Before, every mini-batch read 8 values (its loss, ppo_losses'
    ratio-threshold test and 5 stats, the model's right-padding check of the mask) and the step 5 more (the mean
    reward, the KL twice, the token counts on the device rollout): 69. The losses and stats stay on the device,
    summed in the Window, read with the log line (the same values to the bit: a scratch old-vs-new run)."""
    from tests.train.test_ppo_parts import buffered_ppo_step

    run = buffered_ppo_step(monkeypatch)
    trainer, engine = run["trainer"], run["engine"]
    reads = count_device_reads(monkeypatch)
    checked_at = []  # DeepSpeed's update count when each check ran: before the update it guards
    check = PPOTrainer.stop_if_nonfinite
    monkeypatch.setattr(PPOTrainer, "stop_if_nonfinite",
                        lambda self, losses: checked_at.append((engine.global_steps, len(losses))) or check(self, losses))
    window = loop.Window()
    trainer.optimizer_step(window)
    assert step_reads(reads) == {1: 5}, reads
    assert checked_at == [(0, 2), (1, 2), (2, 2), (3, 2)] and engine.global_steps == 4
    assert sorted(where.split(":")[0] for where in reads[1]) == ["__float__ ppo.py"] + ["tolist batches.py"] * 4
    assert isinstance(window.loss, torch.Tensor) and window.loss.dtype == torch.float64  # unread, summed in double
    assert window.tokens == int(run["data"]["attention_mask"].sum())  # counted on the host prompts + responses
    assert window.trained_tokens == int(run["data"]["mask"].sum())
