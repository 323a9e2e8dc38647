"""Failing well: non-finite loss, output_dir policy, out of memory, SIGTERM from outside, impossible combinations."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.__main__ import main
from pipeline.data.loaders import make_loader
from pipeline.recipe.args import data_args
from pipeline.errors import UserError
from pipeline.model.gpt import GPTModel
from pipeline.train import checkpoint
from pipeline.runtime.log import read_log
from pipeline.train.run import train
from tests.acceptance.harness import write_hf_checkpoint
from tests.train.helpers import BASE_SFT, GOLDEN_GPT2

REPO = Path(__file__).resolve().parents[2]


def poison_forward(monkeypatch, call: int, value: float = math.nan) -> None:
    """The model's loss is `value` on its `call`-th training forward (1-based)."""
    original = GPTModel.loss
    calls = {"n": 0}

    def loss(self, hidden, labels, reduction="mean", *args):
        out = original(self, hidden, labels, reduction, *args)
        if reduction == "sum" and torch.is_grad_enabled():  # training: (summed loss, labelled tokens)
            calls["n"] += 1
            if calls["n"] == call:
                return out[0] * value, out[1]
        return out
    monkeypatch.setattr(GPTModel, "loss", loss)


def test_nan_loss_stops_naming_the_step_and_keeps_earlier_checkpoints(make_recipe, monkeypatch):
    """Micro-batch 5 is step 3's first: the loop reads the step's losses once, after the last backward, and stops
    before the engine.step that would apply the update (the weights are still step 2's)."""
    from pipeline.train import loop

    poison_forward(monkeypatch, call=5)  # accumulation 2: micro-batch 5 belongs to optimizer step 3
    seen: dict[str, Any] = {}
    step = loop.Trainer.optimizer_step

    def optimizer_step(self, window):
        if self.state.global_step == 2:
            seen["engine"] = self.engine
            seen["before"] = {n: p.detach().clone() for n, p in self.engine.module.named_parameters()}
        return step(self, window)

    monkeypatch.setattr(loop.Trainer, "optimizer_step", optimizer_step)
    r = make_recipe(max_steps=6, save_steps=1, warmup_steps=0)
    with pytest.raises(UserError) as err:
        train(r)
    message = err.value.messages[0]
    assert "optimizer step 3 is nan" in message and "learning_rate" in message and "nan_policy" in message
    after = dict(seen["engine"].module.named_parameters())
    assert all(torch.equal(after[n].detach(), p) for n, p in seen["before"].items())  # no update applied
    out = Path(r["output_dir"])
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]
    assert all(checkpoint.problems_with(p) == [] for p in checkpoint.list_checkpoints(out))
    assert not (out / "adapter").exists()
    assert [rec["step"] for rec in read_log(out / "trainer_log.jsonl")] == [1, 2]


def test_nan_policy_skip_drops_the_batch_and_finishes(make_recipe, monkeypatch):
    poison_forward(monkeypatch, call=3, value=math.inf)
    r = make_recipe(max_steps=3, warmup_steps=0, nan_policy="skip")
    result = train(r)
    assert result.exit_code == 0 and result.state.skipped_batches == 1
    assert result.state.batch_in_epoch == 7  # 3 steps x 2 micro-batches + the dropped one
    results = json.loads((result.output_dir / "all_results.json").read_text())
    assert results["skipped_batches"] == 1 and math.isfinite(results["train_loss"])
    assert all(torch.isfinite(p).all() for p in result.engine.module.parameters())


def test_every_key_of_the_training_log_is_named_in_training_md(make_recipe, monkeypatch):
    """docs/training.md's "What you see" lists the keys of a trainer_log.jsonl line: a user reading the log (or a
    script plotting it) looks a key up there. A run that writes the optional ones too (l1_lambda, a skipped
    micro-batch under nan_policy: skip, an evaluation) must name nothing the page leaves out."""
    import re

    text = (REPO / "docs" / "training.md").read_text(encoding="utf-8")
    paragraph = text.split("**What you see.**", 1)[1].split("At the end:", 1)[0]
    documented = set(re.findall(r"`([a-z_0-9]+)`", paragraph))
    poison_forward(monkeypatch, call=3, value=math.inf)
    r = make_recipe(max_steps=2, warmup_steps=0, nan_policy="skip", l1_lambda=1e-6, eval_steps=2)
    result = train(r)
    assert result.state.skipped_batches == 1
    logged = set().union(*(record for record in read_log(result.output_dir / "trainer_log.jsonl")))
    assert {"l1", "skipped_batches", "eval_loss"} <= logged  # the optional keys were written
    assert logged - documented == set(), f"docs/training.md does not name {sorted(logged - documented)}"


def test_nan_policy_skip_logs_the_mean_over_the_tokens_trained(make_recipe, workdir, monkeypatch):
    """A micro-batch replaced under gradient accumulation: the update's logged loss is the mean over the tokens it
    trained (the replacement's count, not the dropped batch's). Golden: transformers + PEFT with the adapter after
    step 1 (the same in both runs: micro-batch 3 is step 2's first), on the two micro-batches step 2 trained."""
    from tests.train.test_golden_hf import hf_loss, peft, transformers  # here: they skip without transformers

    write_hf_checkpoint(workdir / "gpt2")
    one = train(make_recipe(BASE_SFT, name="one", max_steps=1, **GOLDEN_GPT2))
    poison_forward(monkeypatch, call=3, value=math.inf)
    r = make_recipe(BASE_SFT, name="skip", max_steps=2, nan_policy="skip", **GOLDEN_GPT2)
    result = train(r)
    assert result.state.skipped_batches == 1
    batches = list(make_loader(data_args(r), "train", rank=0, world_size=1, epoch=0, shuffle=True))
    dropped, kept, replacement = batches[2:5]  # step 2 drew micro-batches 2 and 3; 4 replaced 2
    labelled = [int((b["labels"] != -100).sum()) for b in (dropped, replacement)]
    assert labelled[0] != labelled[1]  # the count drawn and the count trained differ
    base = transformers.GPT2LMHeadModel.from_pretrained(workdir / "gpt2").eval()
    tuned = peft.PeftModel.from_pretrained(base, one.output_dir / "adapter").eval()
    logged = read_log(result.output_dir / "trainer_log.jsonl")[1]["loss"]
    assert logged == pytest.approx(hf_loss(tuned, kept, replacement), rel=1e-5)


def write_recipe(path: Path, **keys) -> Path:
    values = {**BASE_SFT, "output_dir": "saves/cli", **keys}
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()), encoding="utf-8")
    return path


def test_non_empty_output_dir_without_resume_is_exit_2(workdir, capsys):
    recipe = write_recipe(workdir / "cli.yaml", max_steps=1)
    assert main(["build", str(recipe)]) == 0
    out = workdir / "saves" / "cli"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "saves/cli is not empty (it holds notes.txt)" in err and "resume_from_checkpoint" in err
    assert "overwrite_output_dir" in err and "Traceback" not in err
    assert (out / "notes.txt").read_text() == "mine"  # nothing touched
    # overwrite_output_dir starts over in the same place
    assert main(["train", str(recipe), "overwrite_output_dir=true"]) == 0
    assert not (out / "notes.txt").exists() and (out / "adapter" / "adapter_config.json").is_file()


def test_a_start_that_never_saved_does_not_block_the_rerun(workdir, capsys):
    """A run that stopped before its first checkpoint (a mistake found after the start, a crash) leaves only its
    start files; the corrected rerun starts over there, saying so, instead of refusing a 'not empty' output_dir."""
    recipe = write_recipe(workdir / "again.yaml", max_steps=1)
    assert main(["build", str(recipe)]) == 0
    out = workdir / "saves" / "cli"  # write_recipe's output_dir
    out.mkdir(parents=True)
    for name in ("resolved.yaml", "ds_config.json", "trainer_log.jsonl"):  # what such a start leaves
        (out / name).write_text("{}")
    capsys.readouterr()
    assert main(["train", str(recipe)]) == 0
    assert "holds only what a run that stopped before its first checkpoint wrote (ds_config.json, resolved.yaml, " \
           "trainer_log.jsonl); starting over there" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_config.json").is_file()


def test_overwrite_never_empties_the_working_directory(workdir):
    recipe = write_recipe(workdir / "here.yaml", output_dir=".", overwrite_output_dir=True, max_steps=1)
    assert main(["build", str(recipe)]) == 0
    assert main(["train", str(recipe)]) == 2
    assert (workdir / "here.yaml").is_file() and (workdir / "data").is_dir()


def test_out_of_memory_names_the_knobs(make_recipe, monkeypatch):
    def oom(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(GPTModel, "loss", oom)
    with pytest.raises(UserError) as err:
        train(make_recipe(max_steps=2))
    message = err.value.messages[0]
    assert message.startswith("out of memory at optimizer step 1 (CUDA out of memory. Tried to allocate 20.00 GiB)")
    for knob in ("per_device_train_batch_size (now 4)", "gradient_accumulation_steps (now 2)", "cutoff_len (now 64)",
                 "zero_stage (now 0)", "offload_optimizer: cpu", "finetuning_type: lora"):
        assert knob in message


def test_l1_with_zero3_is_refused_before_training(make_recipe):
    with pytest.raises(UserError, match="l1_lambda > 0 .* zero_stage 3"):
        train(make_recipe(l1_lambda=1e-4, zero_stage=3))


def wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _worker_started_late(go) -> None:
    """A DataLoader worker whose start is slow: the job's stop lands before its worker_init_fn runs."""
    from pipeline.data.loaders import _leave_stops_to_training

    go.wait(60)
    _leave_stops_to_training(0)


def test_a_stop_before_a_worker_has_started_leaves_the_worker_alive():
    """The race a CI run lost under load: the job-wide SIGTERM reached a DataLoader worker forked a moment before,
    whose worker_init_fn (SIG_IGN) had not run yet, so it died of the signal and the run failed with "DataLoader
    worker exited unexpectedly" instead of saving. Forked inside _stops_held (as Loader forks its workers), the
    worker holds the stop until its init discards it. Failed before (the worker's exit code -15)."""
    import multiprocessing

    from pipeline.data.loaders import _stops_held

    ctx = multiprocessing.get_context("fork")  # torch's DataLoader default here
    go = ctx.Event()
    with _stops_held():
        worker = ctx.Process(target=_worker_started_late, args=(go,))
        worker.start()
    os.kill(worker.pid, signal.SIGTERM)  # before its init: the worker is still waiting for `go`
    time.sleep(0.2)
    go.set()
    worker.join(60)
    assert worker.exitcode == 0


def test_sigterm_saves_a_checkpoint_and_exits_143_then_resume_finishes(workdir):
    """A job-wide SIGTERM (SLURM preemption, a Kubernetes stop, `kill -TERM -- -PGID`): the whole process group gets
    it, DataLoader workers too (dataloader_num_workers: LLaMA-Factory's examples set 4). The workers leave the stop to
    training, which saves and ends them; before, they died of it and the run failed with torch's "DataLoader worker
    (pid N) is killed by signal: Terminated" traceback instead of saving."""
    from tests.ports import end_job, start_job

    recipe = write_recipe(workdir / "long.yaml", max_steps=400, save_steps=1000, eval_steps=None,
                          dataloader_num_workers=2)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a plain `python -m pipeline train` sets its own
    subprocess.run([sys.executable, "-m", "pipeline", "build", str(recipe)], cwd=workdir, env=env, check=True,
                   capture_output=True)
    log = workdir / "saves" / "cli" / "trainer_log.jsonl"
    proc = start_job([sys.executable, "-m", "pipeline", "train", str(recipe)], cwd=workdir, env=env)  # its own group
    job: list = []
    try:
        assert wait_for(lambda: len(read_log(log)) >= 2 or proc.poll() is not None, 240), "training never started"
        # each epoch's loader starts its workers afresh (not persistent): between two epochs there are none (a CI
        # run looked in that gap once)
        assert wait_for(lambda: workers_of(proc.pid) or proc.poll() is not None, 60)
        job = workers_of(proc.pid)
        assert job, "no DataLoader worker running"
        os.killpg(proc.pid, signal.SIGTERM)
    finally:  # a hang at exit (workers waited for, never told to stop) fails here, every process of the job stopped
        err = end_job(proc, timeout=240).stderr
    assert proc.returncode == 143, err[-2000:]
    assert not [p for p in job if p.is_running() and p.status() != "zombie"], "a DataLoader worker outlived the run"
    saved = checkpoint.list_checkpoints(workdir / "saves" / "cli")
    assert len(saved) == 1 and checkpoint.problems_with(saved[0]) == []
    step = checkpoint.step_of(saved[0])
    assert 2 <= step < 400 and f"stopped at step {step}" in err and "Traceback" not in err
    state = json.loads((saved[0] / "trainer_state.json").read_text())
    assert state["global_step"] == step and (state["batch_in_epoch"] > 0 or state["epoch"] > 0)
    # it continues from there (max_steps may change on resume: two more steps keep the test short)
    assert main(["train", str(recipe), "resume_from_checkpoint=latest", f"max_steps={step + 2}"]) == 0
    assert [rec["step"] for rec in read_log(log)][-3:] == [step, step + 1, step + 2]


def workers_of(pid: int) -> list:
    """The processes below `pid` (a one-rank run's: its DataLoader workers), as psutil.Process objects."""
    import psutil

    return psutil.Process(pid).children(recursive=True)


def test_ctrl_c_asks_for_a_clean_stop_and_a_second_one_interrupts():
    # Python's own Ctrl-C handler to start from: a process started in the background (nohup, `cmd &` in a
    # script, some CI runners) inherits SIGINT ignored, and then a second Ctrl-C rightly stays ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _ctrl_c_twice()
    finally:
        signal.signal(signal.SIGINT, previous)


def _ctrl_c_twice() -> None:
    from pipeline.train.loop import StopRequest

    with StopRequest() as stop:
        assert not stop.requested() and stop.exit_code == 0
        signal.raise_signal(signal.SIGINT)  # to this thread: os.kill may land on another thread (flaked in CI)
        assert stop.requested() and stop.exit_code == 130
        with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C is not deferred
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_export_verification_catches_an_empty_or_partial_adapter(tmp_path):
    from safetensors.torch import save_file

    from pipeline.train.export import verify_tensors

    expected = {"a.lora_A.weight": (4, 64), "a.lora_B.weight": (64, 4)}
    save_file({"a.lora_A.weight": torch.zeros(0), "a.lora_B.weight": torch.ones(64, 4)}, str(tmp_path / "x"))
    with pytest.raises(RuntimeError, match=r"a.lora_A.weight has shape \[0\], expected \[4, 64\]"):
        verify_tensors(tmp_path / "x", expected)
    save_file({"a.lora_B.weight": torch.full((64, 4), math.nan)}, str(tmp_path / "y"))
    with pytest.raises(RuntimeError, match="missing tensor a.lora_A.weight; a.lora_B.weight holds NaN"):
        verify_tensors(tmp_path / "y", expected)


def test_nan_policy_checks_the_router_aux_term_too():
    """moe_aux_loss_coef: the update trains the cross-entropy plus the router's aux loss, so nan_policy (stop and
    skip) checks their sum: a non-finite aux loss beside a finite cross-entropy counts as a non-finite loss."""
    from pipeline.train.loop import AUX_LOSS, checked_loss

    finite = torch.tensor(2.0, requires_grad=True)
    assert float(checked_loss(finite, {})) == 2.0
    assert float(checked_loss(finite, {AUX_LOSS: torch.tensor(0.5)})) == 2.5
    assert math.isnan(float(checked_loss(finite, {AUX_LOSS: torch.tensor(math.nan)})))
    assert not checked_loss(finite, {AUX_LOSS: torch.tensor(1.0, requires_grad=True)}).requires_grad
