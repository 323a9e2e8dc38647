"""Directory replacement under SIGKILL: `merged/`, a built dataset, `adapter/`, `eval/` (pipeline.io.atomic_dir)
and a checkpoint written again at the same step (pipeline.io.replace_dir) are, at every instant, either the old
or the new complete directory.

A child process replaces a directory and is SIGKILLed right before each of its file-system operations in turn
(tests/reliability/crashpoint.py counts them: the phase is hit by its operation number, never by timing);
then the directory must be whole and old or new, and a second replace must leave the new one and no
leftovers. Where the file system cannot swap two names atomically (the fallback path), a kill between the
two renames leaves the old version aside, and the next writer puts it back instead of deleting it.
"""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

from tests.reliability import figures
from tests.reliability.conftest import Reference, crash_run, same_tensors, tensors
from tests.reliability.rel_helpers import PYTHON, clean_env

CHILD = """
import sys
from tests.reliability.crashpoint import install
ops = install(int(sys.argv[1]))
import pipeline.io
if sys.argv[2] == "fallback":
    pipeline.io._RENAMEAT2 = None
with pipeline.io.atomic_dir("target") as tmp:
    for name in ("a", "b", "c"):
        (tmp / name).write_text("new " + name)
print(len(ops))
"""


def replace_in_child(root: Path, n: int, mode: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-c", CHILD, str(n), mode], cwd=root, env=clean_env(), capture_output=True,
                          text=True, timeout=120)


def state(target: Path) -> str:
    """'old' or 'new' when `target` is one of the two complete versions, else what it is."""
    if not target.is_dir():
        return "missing"
    files = {p.name: p.read_text() for p in target.iterdir()}
    for version in ("old", "new"):
        if files == {n: f"{version} {n}" for n in ("a", "b", "c")}:
            return version
    return f"mixed {files}"


def old_project(root: Path) -> Path:
    (root / "target").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (root / "target" / name).write_text("old " + name)
    return root


def count_ops(tmp_path: Path, mode: str) -> int:
    root = old_project(tmp_path / f"count-{mode}")
    result = replace_in_child(root, 0, mode)
    assert result.returncode == 0, result.stderr
    assert state(root / "target") == "new"
    return int(result.stdout)


def test_a_directory_replaced_under_a_kill_at_every_operation_is_always_old_or_new(tmp_path: Path):
    total = count_ops(tmp_path, "atomic")
    seen = []
    for n in range(1, total + 1):
        root = old_project(tmp_path / f"op{n}")
        result = replace_in_child(root, n, "atomic")
        assert result.returncode == -signal.SIGKILL, (n, result.stderr[-2000:])
        seen.append(state(root / "target"))
        assert seen[-1] in ("old", "new"), f"killed before operation {n}: target is {seen[-1]}"
        assert replace_in_child(root, 0, "atomic").returncode == 0  # the next writer
        assert state(root / "target") == "new"
        assert sorted(p.name for p in root.iterdir()) == ["target"], "leftovers of the killed writer"
        figures.record("kill")
    assert seen[0] == "old" and seen[-1] == "new", seen  # the kills spanned the whole window


def test_without_an_atomic_swap_a_kill_between_the_renames_puts_the_old_one_back(tmp_path: Path):
    total = count_ops(tmp_path, "fallback")
    for n in range(1, total + 1):
        root = old_project(tmp_path / f"op{n}")
        assert replace_in_child(root, n, "fallback").returncode == -signal.SIGKILL
        now = state(root / "target")
        if now == "missing":  # only between the two renames: the whole old version waits aside
            aside = [p for p in root.iterdir() if p.name.startswith(".target.old-")]
            assert len(aside) == 1 and state(aside[0]) == "old", n
            from pipeline.io import remove_leftovers

            remove_leftovers(root / "target")  # what a reader (build's up-to-date check) or the next writer does
            assert state(root / "target") == "old"
        else:
            assert now in ("old", "new"), (n, now)
        assert replace_in_child(root, 0, "fallback").returncode == 0
        assert state(root / "target") == "new" and sorted(p.name for p in root.iterdir()) == ["target"]
        figures.record("kill")


def test_merged_is_always_whole_when_a_merge_over_it_is_killed_at_the_swap(merged: Reference, tmp_path: Path):
    """The user's path: `merge` again over an existing merged/, killed right before and right after the swap."""
    ops_file = tmp_path / "ops.json"
    root = merged.copy(tmp_path / "again", output=True)
    assert crash_run(0, ["merge", "r.yaml"], root, ops_file).code == 0  # a merge over an existing merged/
    swap = [index for index, op, path in json.loads(ops_file.read_text())
            if op == "_exchange" and path.endswith("merged")]
    assert len(swap) == 1
    for n in (swap[0] - 1, swap[0], swap[0] + 1):
        root = merged.copy(tmp_path / f"op{n}", output=True)
        assert crash_run(n, ["merge", "r.yaml"], root).code == -signal.SIGKILL
        target = root / "out" / "merged"
        assert same_tensors(tensors(target / "model.safetensors"), merged.weights), n
        json.loads((target / "config.json").read_text())
        figures.record("kill")
