"""Kills: SIGKILL during build, training, checkpoint saves and merge, then recovery.

Two ways to kill, both aimed at a phase, never at a time: the run SIGKILLs itself before its N-th file-system
operation (tests/reliability/crashpoint.py: hits every intermediate on-disk state deterministically), or it
pauses there and this process SIGKILLs it from outside (what `kill -9`, the OOM killer or a preempted node
does). N is drawn with fixed seeds, so a failure replays.

After a kill, nothing visible is corrupt: a built dataset is the old or the new one, complete; a visible
checkpoint that passes its sha256 manifest is byte-for-byte the uninterrupted run's checkpoint of that step;
adapter/ and merged/ exist only complete. Recovering as a user would (build again; resume_from_checkpoint=
latest, or start over when no checkpoint exists; merge again) gives bitwise the uninterrupted run's weights
and leaves no temp files. The default run does a few trials; `-m slow` (CI) a few more, within the suite's time.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.reliability import figures
from tests.reliability.conftest import ADAPTER, Reference, crash_run, same_tensors, tensors
from tests.reliability.rel_helpers import PYTHON, clean_env, jsonl, rows, data_snapshot, run_main, snapshot

SEED = 20240609


def hidden(folder: Path) -> list[str]:
    """Temp leftovers: dot-entries anywhere below `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


# ---------------------------------------------------------------------------------------------- build

def complete_build(directory: Path) -> dict | None:
    """The manifest of a complete build in `directory` (every file matches its sha256), else None."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    files = manifest.get("files", {})
    if set(files) != {"train.json", "val.json", "origins.json"}:  # sft: the splits and each row's raw origin
        return None
    for name, info in files.items():
        data = (directory / name).read_bytes() if (directory / name).is_file() else b""
        if hashlib.sha256(data).hexdigest() != info["sha256"]:
            return None
    return manifest


def _v2(root: Path) -> None:
    """New raw rows: the next build differs from the one on disk."""
    with open(root / "data" / "raw" / "a.jsonl", "a", encoding="utf-8") as handle:
        handle.write(jsonl({**row, "output": row["output"] + " v2"} for row in rows(6)))


@pytest.fixture(scope="module")
def build_reference(trained: Reference, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The v1 and v2 builds (train/val bytes) and the operations of a v2 build over v1."""
    root = trained.copy(tmp_path_factory.mktemp("build") / "proj")
    v1 = {f: (root / "data/build/a" / f).read_bytes() for f in ("train.json", "val.json")}
    _v2(root)
    ops_file = root.parent / "ops.json"
    assert crash_run(0, ["build", "r.yaml"], root, ops_file).code == 0
    v2 = {f: (root / "data/build/a" / f).read_bytes() for f in ("train.json", "val.json")}
    assert v1 != v2
    return {"v1": v1, "v2": v2, "ops": json.loads(ops_file.read_text())}


def _build_trial(trained: Reference, ref: dict, root: Path, kill) -> None:
    trained.copy(root)
    _v2(root)
    raw_before = snapshot(root / "data" / "raw")
    kill(root)
    built = root / "data" / "build" / "a"
    assert complete_build(built) is not None, "the build is missing or incomplete"  # the swap is one step
    now = {f: (built / f).read_bytes() for f in ("train.json", "val.json")}
    assert now in (ref["v1"], ref["v2"]), "the visible build is neither the old nor the new one"
    assert snapshot(root / "data" / "raw") == raw_before
    result = run_main(["build", "r.yaml"], root)  # recovery: build again
    assert result.code == 0, result.err
    assert {f: (built / f).read_bytes() for f in ("train.json", "val.json")} == ref["v2"]
    assert complete_build(built) is not None
    assert hidden(root / "data") == []
    figures.record("kill")


def _kill_at_ops(trained: Reference, ref: dict, tmp_path: Path, picks) -> None:
    for n in picks:
        def kill(root: Path) -> None:
            result = crash_run(n, ["build", "r.yaml"], root)
            assert result.code == -signal.SIGKILL, (n, result.err[-2000:])
        _build_trial(trained, ref, tmp_path / f"op{n}", kill)


def test_build_killed_before_random_file_operations(trained: Reference, build_reference: dict, tmp_path: Path):
    count = len(build_reference["ops"])
    _kill_at_ops(trained, build_reference, tmp_path, random.Random(SEED).sample(range(1, count + 1), 3))


@pytest.mark.slow
def test_build_killed_before_every_file_operation(trained: Reference, build_reference: dict, tmp_path: Path):
    _kill_at_ops(trained, build_reference, tmp_path, range(1, len(build_reference["ops"]) + 1))


def killed_from_outside(argv: list[str], cwd: Path, n: int, marker: Path) -> None:
    """`python -m pipeline ARGV` paused right before its n-th file operation, then SIGKILLed by this process (what
    `kill -9`, the OOM killer or a preempted node does), at that phase on a machine of any speed."""
    proc = subprocess.Popen([PYTHON, "-m", "tests.reliability.crashpoint", str(n), "-", *argv], cwd=cwd,
                            env=clean_env(CRASHPOINT_PAUSE=str(marker)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert proc.poll() is None, (n, proc.communicate()[0][-3000:])
            assert time.monotonic() < deadline, f"operation {n} was never reached"
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_build_killed_from_outside_at_random_phases(trained: Reference, build_reference: dict, tmp_path: Path):
    rng = random.Random(SEED)
    for trial in range(6):
        n = rng.randint(1, len(build_reference["ops"]))
        _build_trial(trained, build_reference, tmp_path / f"t{trial}",
                     lambda root: killed_from_outside(["build", "r.yaml"], root, n, root.parent / f"marker{trial}"))


# ---------------------------------------------------------------------------------------------- training

def check_after_kill(root: Path, trained: Reference) -> None:
    """What a kill may leave in output_dir: only complete things, each equal to the uninterrupted run's."""
    from pipeline.train import checkpoint

    out = root / "out"
    for ckpt in checkpoint.list_checkpoints(out):
        assert checkpoint.problems_with(ckpt) == [], f"{ckpt.name} is visible but incomplete"
        ref = trained.root / "out" / ckpt.name
        assert same_tensors(tensors(ckpt / "adapter/adapter_model.safetensors"),
                            tensors(ref / "adapter/adapter_model.safetensors")), ckpt.name
        assert json.loads((ckpt / "trainer_state.json").read_text()) == \
            json.loads((ref / "trainer_state.json").read_text())
    if (out / "adapter").exists():
        assert same_tensors(tensors(root / ADAPTER), trained.weights)
    for name in ("ds_config.json", "all_results.json"):
        if (out / name).exists():
            json.loads((out / name).read_text())  # never torn


def recover(root: Path, *overrides: str) -> str:
    """What a user does after a crash: resume from the newest checkpoint, or start over when there is none;
    `overrides`: further key=value the user adds."""
    from pipeline.train import checkpoint

    resume = bool(checkpoint.list_checkpoints(root / "out"))
    extra = "resume_from_checkpoint=latest" if resume else "overwrite_output_dir=true"
    result = crash_run(0, ["train", "r.yaml", extra, *overrides], root)
    assert result.code == 0, result.err[-3000:]
    return result.err


def check_recovered(root: Path, trained: Reference) -> None:
    from pipeline.runtime.log import read_log

    assert same_tensors(tensors(root / ADAPTER), trained.weights), "resumed weights differ from the uninterrupted run"
    assert [rec["step"] for rec in read_log(root / "out" / "trainer_log.jsonl")] == [1, 2, 3]
    assert hidden(root / "out") == [], "temp files left behind"
    assert data_snapshot(root / "data") == data_snapshot(trained.root / "data")


def _train_trial(trained: Reference, root: Path, n: int, phase=lambda out: True) -> None:
    trained.copy(root)
    result = crash_run(n, ["train", "r.yaml"], root)
    assert result.code == -signal.SIGKILL, (n, result.err[-2000:])
    assert phase(root / "out"), f"operation {n} is not in the phase this trial means to hit"
    check_after_kill(root, trained)
    recover(root)
    check_recovered(root, trained)
    figures.record("kill")


def test_training_killed_during_a_checkpoint_save_resumes_bitwise(trained: Reference, tmp_path: Path):
    window = trained.ops_in(".checkpoint-2.tmp")  # every operation of the step-2 save, temp dir to rename
    assert len(window) > 10
    _train_trial(trained, tmp_path / "proj", random.Random(SEED).choice(window),
                 lambda out: (out / "checkpoint-1").is_dir() and not (out / "checkpoint-2").exists())


@pytest.mark.slow
def test_training_killed_while_exporting_the_adapter_resumes_bitwise(trained: Reference, tmp_path: Path):
    window = [i for i in trained.ops_in("out/.adapter.tmp") if i > max(trained.ops_in(".checkpoint-3.tmp"))]
    assert window
    _train_trial(trained, tmp_path / "proj", random.Random(SEED + 1).choice(window),
                 lambda out: (out / "checkpoint-3").is_dir() and not (out / "adapter").exists())


@pytest.mark.slow
def test_training_killed_before_the_first_checkpoint_starts_over_bitwise(trained: Reference, tmp_path: Path):
    """One draw before the first checkpoint is whole: recovery starts over (overwrite_output_dir), the one trial of
    that path. A second draw after the step-2 save (it landed on the all_results.json write, op 150 of 154) resumed
    from checkpoint-3 as the adapter-export trial does (~20 s); the step-2 save itself is the phase of the
    checkpoint-save and outside-kill trials."""
    before = random.Random(SEED + 2).choice(range(1, max(trained.ops_in(".checkpoint-1.tmp")) + 1))
    _train_trial(trained, tmp_path / f"op{before}", before, lambda out: not (out / "checkpoint-1").exists())


def _outside_kill_trial(trained: Reference, root: Path, rng: random.Random) -> None:
    trained.copy(root)
    n = rng.randint(1, len(trained.ops))
    killed_from_outside(["train", "r.yaml"], root, n, root.parent / f"{root.name}.marker")
    check_after_kill(root, trained)
    recover(root)
    check_recovered(root, trained)
    figures.record("kill")


def test_training_killed_from_outside_at_a_random_phase_resumes_bitwise(trained: Reference, tmp_path: Path):
    """One draw: what a kill from outside adds to the crashpoint's own SIGKILL is the kill itself (the crashpoint
    trials above and below hit the phases, checkpoint saves included; a second outside draw, inside the step-3
    save, cost ~10 s and proved nothing they do not)."""
    _outside_kill_trial(trained, tmp_path / "proj", random.Random(SEED))


def test_a_damaged_checkpoint_is_skipped_with_a_message_and_the_previous_one_used(trained: Reference,
                                                                                  tmp_path: Path):
    root = trained.copy(tmp_path / "proj", output=True)
    (root / "out" / "all_results.json").unlink()
    for path in sorted((root / "out" / "adapter").iterdir()):
        path.unlink()
    (root / "out" / "adapter").rmdir()  # as if killed after the last checkpoint, before the export
    target = root / "out" / "checkpoint-3" / "adapter" / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit: same size, only the sha256 notices
    target.write_bytes(bytes(data))
    # overwrite_cache (a build first, current here): the refusals asked before it find the same checkpoint, and
    # the user hears of the damaged one once (failed before: twice, from main's check_start and from train)
    err = recover(root, "overwrite_cache=true")
    assert len([line for line in err.splitlines() if "skipped damaged checkpoints" in line]) == 1, err
    assert "skipped damaged checkpoints: checkpoint-3" in err and "does not match its sha256" in err
    assert "resuming from out/checkpoint-2" in err
    check_recovered(root, trained)


# ---------------------------------------------------------------------------------------------- merge

def _merge_trial(merged: Reference, root: Path, n: int) -> None:
    merged.copy(root, output=True)
    shutil.rmtree(root / "out" / "merged")
    adapter = snapshot(root / "out" / "adapter")
    result = crash_run(n, ["merge", "r.yaml"], root)
    assert result.code == -signal.SIGKILL, (n, result.err[-2000:])
    target = root / "out" / "merged"
    assert not target.exists() or n not in merged.ops_in(".merged.tmp"), "killed after the phase it meant to hit"
    if target.exists():
        assert same_tensors(tensors(target / "model.safetensors"), merged.weights), "a partial merged/ is visible"
        json.loads((target / "config.json").read_text())
    assert snapshot(root / "out" / "adapter") == adapter  # merge never touches its input
    result = crash_run(0, ["merge", "r.yaml"], root)  # recovery: merge again
    assert result.code == 0, result.err[-3000:]
    assert same_tensors(tensors(target / "model.safetensors"), merged.weights)
    assert hidden(root / "out") == [], "temp files left behind"
    figures.record("kill")


def test_merge_killed_before_a_random_file_operation(merged: Reference, tmp_path: Path):
    window = merged.ops_in(".merged.tmp")
    assert window
    n = random.Random(SEED).choice(window)
    _merge_trial(merged, tmp_path / "proj", n)


@pytest.mark.slow
def test_merge_killed_inside_the_merged_models_own_temp_folder(merged: Reference, tmp_path: Path):
    """One more draw in the window of the default run's one (the merge has one phase: writing its temp folder). It
    lands inside the model's own nested temp folder, before that folder is exchanged into merged/'s temp (op 12 of
    79; the default's 45 writes the tokenizer files after it). A second draw (26) hit the tokenizer writes again
    (~6 s, one killed merge and its recovery), as a third one, dropped before, had."""
    window = merged.ops_in(".merged.tmp")
    _merge_trial(merged, tmp_path / "proj", random.Random(SEED + 4).sample(window, 1)[0])


def test_the_crash_runner_counts_and_kills(tmp_path: Path):
    """The tool itself: operations outside the project are not counted, N kills before the N-th one."""
    from tests.reliability.rel_helpers import make_project

    root = make_project(tmp_path / "proj")
    ops_file = tmp_path / "ops.json"
    assert crash_run(0, ["build", "r.yaml"], root, ops_file).code == 0
    ops = json.loads(ops_file.read_text())
    renames = [path for _, op, path in ops if op == "replace"]
    assert "data/build/.a.tmp-" in renames[-1] and "ops.json" not in str(ops)  # the build's final rename
    assert [op[1] for op in ops][-2:] == ["unlink", "rmdir"]  # then the lock's release
    os.remove(ops_file)
    replace = next(i for i, op, _ in ops if op == "replace")
    shutil.rmtree(root / "data" / "build")
    assert crash_run(replace, ["build", "r.yaml"], root).code == -signal.SIGKILL
    assert not (root / "data" / "build" / "a").exists()  # killed right before the rename
    assert len(list((root / "data" / "build").glob(".a.tmp-*"))) == 1
