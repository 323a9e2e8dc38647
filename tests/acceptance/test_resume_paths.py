"""Interrupted and resumed runs as a user drives them: `python -m pipeline train` and `make train` typed again.

Each test starts from a finished tiny LoRA run; a Ctrl-C lands where the crash runner pauses the run (after
its first log record), so the stop falls at a known step on any machine speed.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.acceptance.harness import PYTHON, cli_env, make, pipeline, refused, scratch_repo, write_data, write_recipe

KEYS = dict(model_name_or_path="tiny", dataset_dir="data", output_dir="saves/run", max_steps=2, save_steps=1,
            logging_steps=1)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A scratch repository with data/ and a finished 2-step run in saves/run (built and trained by make)."""
    root = scratch_repo(tmp_path_factory.mktemp("resume_paths"))
    write_data(root / "data")
    write_recipe(root / "r.yaml", **KEYS)
    make("train", "RECIPE=r.yaml", cwd=root)
    return root


def copy_of(finished: Path, tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    shutil.copytree(finished, root, symlinks=True)
    return root


def ctrl_c_after_first_step(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -m pipeline train r.yaml ARGS`, Ctrl-C once its first step is logged; returns the finished run."""
    marker = root / "after-first-step"
    proc = subprocess.Popen([PYTHON, "-m", "tests.reliability.crashpoint", "0", "-", "train", "r.yaml", *args],
                            cwd=root, env=cli_env(CRASHPOINT_PAUSE_AFTER_LOG=str(marker)), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)
    marker.unlink()
    out, _ = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.mark.slow
def test_make_train_after_an_interrupted_resume_of_a_finished_run_does_not_wipe_it(finished, tmp_path):
    """The finished run's all_results.json outlived the resume that continued it; `make train` took it for a
    finished run and passed overwrite_output_dir=true, deleting the interrupted run's checkpoints."""
    root = copy_of(finished, tmp_path)
    write_recipe(root / "r.yaml", **{**KEYS, "max_steps": 4})  # the user lengthens the run: the stamp is stale
    stopped = ctrl_c_after_first_step(root, "resume_from_checkpoint=latest")
    assert stopped.returncode == 130, stopped.stdout[-3000:]
    assert (root / "saves/run/checkpoint-3").is_dir()
    again = make("train", "RECIPE=r.yaml", cwd=root, expect=2)
    assert "resume_from_checkpoint: latest to continue that run" in again.stderr, again.stderr[-2000:]
    assert (root / "saves/run/checkpoint-3").is_dir()


@pytest.mark.slow
def test_a_resume_at_the_last_step_keeps_the_losses_in_all_results(finished, tmp_path):
    """What a Ctrl-C at the last step leaves is resumed with nothing left to log: all_results.json had
    train_loss and eval_loss null (and the eval report's training line lost them)."""
    root = copy_of(finished, tmp_path)
    before = json.loads((root / "saves/run/all_results.json").read_text())
    pipeline("train", "r.yaml", "resume_from_checkpoint=latest", cwd=root)
    after = json.loads((root / "saves/run/all_results.json").read_text())
    for key in ("global_step", "epoch", "train_loss", "eval_loss", "eval_perplexity", "tokens_seen"):
        assert after[key] == before[key] and after[key] is not None, key


@pytest.mark.slow  # the module's finished run (make train) takes ~1 min
@pytest.mark.parametrize("given, expected", [
    ("saves/run", "saves/run is a run's output directory, not a checkpoint; give one of its checkpoints (checkpoint-1, "
                  "checkpoint-2, e.g. saves/run/checkpoint-2), or 'latest'"),
    ("saves/run/checkpoint-2/adapter", "saves/run/checkpoint-2/adapter is a folder inside the checkpoint "),
    ("checkpoint-2", "directory 'checkpoint-2' not found; give a checkpoint-<step> directory or 'latest' (saves/run "
                     "holds checkpoint-1, checkpoint-2: paths are relative to the working directory; did you mean "
                     "'saves/run/checkpoint-2'?)"),
], ids=["output-dir", "inside-a-checkpoint", "bare-name"])
def test_resume_from_a_folder_that_is_no_checkpoint_says_which_to_give(finished, given, expected):
    """Pointing resume_from_checkpoint at the output_dir (or the adapter in a checkpoint) said "manifest.json is
    missing (the checkpoint was not finished)"; the name as listed in output_dir said only "not found"."""
    before = sorted(p.name for p in (finished / "saves/run").iterdir())
    # the first case as typed (a fresh interpreter); the others in this process, the same refusal without the
    # interpreter's start and torch's import
    stderr = refused("train", "r.yaml", f"resume_from_checkpoint={given}", cwd=finished, as_typed=given == "saves/run")
    assert expected in stderr, stderr[-2000:]
    assert sorted(p.name for p in (finished / "saves/run").iterdir()) == before
