"""Signals and rank failures while training, on 1 rank (a plain process) and 2 ranks (the deepspeed launcher).

Ctrl-C is SIGINT to the whole foreground process group (what a terminal sends); `kill PID` is SIGTERM to one
process; a scheduler (SLURM's scancel) sends SIGTERM to every process of the job. The run finishes its step,
saves a checkpoint that passes its manifest, and exits non-zero without a traceback; resuming finishes the
run (on 1 rank, bitwise equal to the uninterrupted reference). A rank that dies takes the whole job down
within a bounded time, the survivor saying in one line which rank died; the run resumes from its last
checkpoint. A repeated SIGTERM (a job-wide one reaches each rank twice) is ignored, and the stop is always
announced.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

from pipeline.train import checkpoint
from pipeline.runtime.log import read_log
from tests.reliability import figures
from tests.reliability.conftest import ADAPTER, Reference, crash_run, same_tensors, tensors
from tests.reliability.rel_helpers import PYTHON, clean_env

LONG = ["max_steps=200", "save_steps=2"]  # long enough that a signal lands mid-run; a checkpoint every 2 steps


def start(argv: list[str], cwd: Path, ranks: int = 1) -> subprocess.Popen:
    """`python -m pipeline ARGV` (1 rank) or the deepspeed launcher (2 ranks), in its own process group
    (tests/ports.start_job: faulthandler on, so finish's stop shows every stack)."""
    from pipeline.runtime.dist import free_port
    from tests.ports import start_job

    launch = [PYTHON, "-m", "pipeline"] if ranks == 1 else [  # as `make train NPROC=2` launches
        PYTHON, "-m", "pipeline.launch", "--num_gpus", str(ranks), "--master_port", str(free_port()),
        "--module", "pipeline"]
    return start_job([*launch, *argv], cwd=cwd, env=clean_env(), stderr=subprocess.STDOUT)


def start_training(argv: list[str], cwd: Path, steps: int, ranks: int = 2,
                   ready: Callable[[], bool] | None = None) -> subprocess.Popen:
    """start() and wait for `steps` logged steps (or until `ready()`); a launch that lost its port to another
    process (found free, taken before the bind) is started again on a new one."""
    from tests.ports import ATTEMPTS, port_taken

    log = cwd / "out" / "trainer_log.jsonl"
    for attempt in range(ATTEMPTS):
        proc = start(argv, cwd, ranks)
        try:
            wait_until(proc, ready or (lambda: len(read_log(log)) >= steps))
            return proc
        except AssertionError:
            if proc.poll() is None or attempt == ATTEMPTS - 1:
                raise
            output = proc.communicate()[0]
            if not port_taken(output):
                raise AssertionError(output[-3000:]) from None
    raise AssertionError("unreachable")


def wait_until(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "training ended before the signal"
        assert time.monotonic() < deadline, "training never got there"
        time.sleep(0.02)


def wait_for_marker(proc: subprocess.Popen, marker: Path, timeout: float = 600) -> None:
    """Until the run reaches the phase that creates `marker` (timeout only against a hang)."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the phase was never reached"
        time.sleep(0.01)


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, float]:
    """(exit code, output, seconds until exit); the job is stopped if it overruns, every process of it with its stack
    (tests/ports.stop_job: pipeline.launch's runner and ranks are in a session of their own)."""
    from tests.ports import stop_job

    start_time = time.monotonic()
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, _ = stop_job(proc)
        pytest.fail(f"no exit within {timeout} s:\n{out[-6000:]}")
    return proc.returncode, out, time.monotonic() - start_time


def saved_checkpoint(out_dir: Path, output: str, ranks: int, announced: bool = True) -> int:
    """The step of the one checkpoint the stop wrote: complete, announced, with every rank's RNG state."""
    saved = checkpoint.list_checkpoints(out_dir)
    assert saved, output[-3000:]
    last = saved[-1]
    assert checkpoint.problems_with(last) == []
    step = checkpoint.step_of(last)
    assert not announced or f"stopped at step {step}: saved {out_dir.name}/checkpoint-{step}" in output, output[-3000:]
    assert {p.name for p in (last / "rng").iterdir()} == {f"rank-{r}.safetensors" for r in range(ranks)}
    assert not list(out_dir.glob(".checkpoint-*")), "a half-written checkpoint was left"
    return step


def _stop_one_rank(trained: Reference, tmp_path: Path, send, code: int) -> Path:
    """A one-rank run paused right after step 1 (the signal lands there on any machine) gets `send`: it exits with
    `code`, no traceback, checkpoint-1 saved and announced, no adapter. The project's folder."""
    root = trained.copy(tmp_path / "proj")
    marker = tmp_path / "after-step-1"
    proc = subprocess.Popen([PYTHON, "-m", "tests.reliability.crashpoint", "0", "-", "train", "r.yaml"], cwd=root,
                            env=clean_env(CRASHPOINT_PAUSE_AFTER_LOG=str(marker)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    wait_for_marker(proc, marker)
    send(proc)
    marker.unlink()
    exit_code, output, _ = finish(proc, 300)
    assert exit_code == code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    step = saved_checkpoint(root / "out", output, 1)
    assert step == 1 and not (root / "out" / "adapter").exists()
    return root


def test_ctrl_c_on_one_rank_saves_a_checkpoint_and_the_resumed_run_is_bitwise(trained: Reference, tmp_path):
    root = _stop_one_rank(trained, tmp_path, lambda proc: os.killpg(proc.pid, signal.SIGINT), 130)  # the terminal's
    result = crash_run(0, ["train", "r.yaml", "resume_from_checkpoint=latest"], root)
    assert result.code == 0, result.err[-3000:]
    assert same_tensors(tensors(root / ADAPTER), trained.weights)
    assert [r["step"] for r in read_log(root / "out" / "trainer_log.jsonl")] == [1, 2, 3]
    figures.record("signal")


@pytest.mark.slow
def test_sigterm_to_one_rank_saves_the_checkpoint_of_the_uninterrupted_run(trained: Reference, tmp_path):
    """`kill PID`: the stop Ctrl-C makes, by the other signal. Its checkpoint-1 is the uninterrupted run's (adapter
    and RNG state bitwise, the same trainer state), what the Ctrl-C test's resume starts from and ends bitwise from;
    resuming this one too cost a run (~5 s)."""
    root = _stop_one_rank(trained, tmp_path, lambda proc: proc.send_signal(signal.SIGTERM), 143)
    ours, reference = root / "out" / "checkpoint-1", trained.root / "out" / "checkpoint-1"
    for saved in ("adapter/adapter_model.safetensors", "rng/rank-0.safetensors"):
        assert same_tensors(tensors(ours / saved), tensors(reference / saved)), saved
    assert json.loads((ours / "trainer_state.json").read_text()) == \
        json.loads((reference / "trainer_state.json").read_text())
    figures.record("signal")


def test_the_stop_announcement_is_never_swallowed(trained: Reference, tmp_path, monkeypatch, capfd):
    from pipeline.runtime import dist
    from pipeline.train import run as train_run
    from tests.reliability.rel_helpers import run_main

    dist.ensure_launch_env()
    original = train_run.quietly

    sent = []

    def quietly(func, *args):
        def interrupted(*inner):
            if not sent:  # one Ctrl-C, while the export reads the base: a second one would mean "stop now"
                sent.append(1)
                os.kill(os.getpid(), signal.SIGINT)
            return func(*inner)
        return original(interrupted, *args)
    monkeypatch.setattr(train_run, "quietly", quietly)
    root = trained.copy(tmp_path / "proj")
    # freeze: the one kind whose export reads the base (with its output held back) at each save; LoRA and full
    # fill a skeleton from the engine alone
    recipe = root / "r.yaml"
    lines = [line for line in recipe.read_text().splitlines() if not line.startswith(("lora_", "finetuning_type"))]
    recipe.write_text("\n".join(lines + ["finetuning_type: freeze", "freeze_trainable_layers: 1"]) + "\n")
    result = run_main(["train", "r.yaml"], root)
    assert result.code == 130, result.err[-3000:]
    assert "stopped at step " in result.err
    assert "SIGINT: finishing the current step" in result.err + capfd.readouterr().err


def ranks_of(launcher: subprocess.Popen) -> list:
    import psutil

    found = [c for c in psutil.Process(launcher.pid).children(recursive=True)
             if "--local_rank=" in " ".join(c.cmdline())]
    ranks = [c for c in found if c.ppid() not in {p.pid for p in found}]  # not their DataLoader workers (forks)
    assert len(ranks) == 2
    return ranks


@pytest.mark.multirank
def test_sigterm_to_the_job_on_two_ranks_saves_a_checkpoint(trained: Reference, tmp_path):
    """A scheduler's stop (scancel, a preemption) signals every process of the job: the ranks, their DataLoader
    workers (which leave the stop to their rank, then are ended by it), and deepspeed's launcher, which forwards
    another SIGTERM to its whole tree (a repeat, ignored)."""
    import threading

    import psutil

    root = trained.copy(tmp_path / "proj")
    proc = start_training(["train", "r.yaml", *LONG, "dataloader_num_workers=2"], root, 1)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        ranks = ranks_of(proc)
        job = [p for rank in ranks for p in rank.children(recursive=True)]  # the workers
        assert job, "no DataLoader worker running"
        for process in psutil.Process(proc.pid).children(recursive=True):  # the scheduler: all but pipeline.launch
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=10)
    output = "".join(lines)
    assert "killed by signal" not in output, output[-3000:]
    saved_checkpoint(root / "out", output, 2)
    assert not [p for p in job if p.is_running() and p.status() != psutil.STATUS_ZOMBIE], "a worker outlived the job"
    figures.record("signal")


def rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    import psutil

    for child in psutil.Process(launcher.pid).children(recursive=True):
        if f"--local_rank={rank}" in " ".join(child.cmdline()):
            return child.pid
    raise AssertionError(f"rank {rank} not found")


@pytest.fixture(scope="module")
def dead_rank(trained: Reference, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, float]:
    """Two ranks training; rank 1 SIGKILLed after checkpoint-2: (project, exit code, output, seconds to exit)."""
    root = trained.copy(tmp_path_factory.mktemp("dead_rank") / "proj")
    proc = start_training(["train", "r.yaml", *LONG], root, 3)
    os.kill(rank_pid(proc, 1), signal.SIGKILL)
    code, output, seconds = finish(proc, 180)
    return root, code, output, seconds


@pytest.fixture(scope="module")
def resumed_then_ctrl_c(dead_rank) -> tuple[int, int, str]:
    """The dead rank's run resumed on two ranks (resume_from_checkpoint=latest) until it saves a checkpoint past
    every one the dead run left, then the terminal's Ctrl-C (SIGINT to the whole process group): (the step it
    resumed from, exit code, output). One launch for two claims: the run resumes after a dead rank, and Ctrl-C on
    two ranks saves a checkpoint (each claim had a launch of its own, ~13 s)."""
    root = dead_rank[0]
    out = root / "out"
    valid = [p for p in checkpoint.list_checkpoints(out) if not checkpoint.problems_with(p)]
    assert valid, dead_rank[2][-3000:]
    left = max(checkpoint.step_of(p) for p in checkpoint.list_checkpoints(out))
    proc = start_training(["train", "r.yaml", *LONG, "resume_from_checkpoint=latest"], root, 0,
                          ready=lambda: any(checkpoint.step_of(p) > left for p in checkpoint.list_checkpoints(out)))
    os.killpg(proc.pid, signal.SIGINT)
    code, output, _ = finish(proc, 240)
    return checkpoint.step_of(valid[-1]), code, output


@pytest.mark.multirank
def test_a_dead_rank_stops_the_job_promptly_and_the_run_resumes(dead_rank, resumed_then_ctrl_c):
    root, code, output, seconds = dead_rank
    assert code != 0, output[-3000:]
    # bounded: the launcher notices, the survivor does not wait forever in a collective (finish() fails the test
    # if the job outlives its 180 s bound; no tighter figure, which would only measure the machine)
    assert re.search(r"rank\W{0,3}1\b", output), output[-3000:]  # the launcher names it (--local_rank=1 ...)
    step, _, resumed = resumed_then_ctrl_c
    assert f"resuming from out/checkpoint-{step}" in resumed, resumed[-3000:]
    logged = [r["step"] for r in read_log(root / "out" / "trainer_log.jsonl")]
    assert logged == list(range(1, len(logged) + 1)) and logged[-1] > step  # trained on past it, each step once
    figures.record("kill")  # a rank SIGKILLed, the job stopped and resumed


@pytest.mark.multirank
def test_ctrl_c_on_two_ranks_saves_a_checkpoint(dead_rank, resumed_then_ctrl_c):
    step, code, output = resumed_then_ctrl_c
    out = dead_rank[0] / "out"
    assert code != 0, "an interrupted run must not look finished to make"
    assert saved_checkpoint(out, output, 2) > step and not (out / "adapter").exists()
    # the ranks stop cleanly; DeepSpeed's own runner (bin/deepspeed) dies of the KeyboardInterrupt it was sent
    tracebacks = output.split("Traceback (most recent call last):")[1:]
    assert all("deepspeed/launcher/runner.py" in t and "KeyboardInterrupt" in t for t in tracebacks), output[-3000:]
    figures.record("signal")


@pytest.mark.multirank
def test_a_dead_rank_is_named_in_one_clear_message(dead_rank):
    _, code, output, _ = dead_rank
    assert code != 0 and "Traceback" not in output and re.search(r"rank 1 (died|was killed|exited)", output), \
        output[-3000:]


@pytest.mark.multirank
def test_two_quick_sigterms_to_the_launcher_stop_the_job_cleanly(trained: Reference, tmp_path):
    """`timeout ... make train` signals make's group and make signals its child again: two SIGTERMs a few ms
    apart. The second re-entered the launcher's handler while the first was importing psutil; the launcher
    died with a traceback and the ranks, in their own session, trained on as orphans. The first SIGTERM is also
    `kill LAUNCHER_PID` alone (the ranks take the forwarded second one as a repeat and ignore it): the ranks must
    hear it, save and exit with the launcher, which a launch of its own (~16 s) used to check apart."""
    import psutil

    root = trained.copy(tmp_path / "proj")
    proc = start_training(["train", "r.yaml", *LONG], root, 1)
    job = psutil.Process(proc.pid).children(recursive=True)  # the runner, deepspeed's launch, the ranks
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        code, output, _ = finish(proc, 240)
        assert code == 143, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        _, alive = psutil.wait_procs(job, timeout=10)  # the launcher returns only once the job is gone
        assert not alive, f"left running: {alive}"
        saved_checkpoint(root / "out", output, 2, announced=False)
        figures.record("signal")
    finally:
        for process in job:
            with contextlib.suppress(psutil.Error):
                process.kill()
