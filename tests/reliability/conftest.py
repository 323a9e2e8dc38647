"""Session references for the kill, signal and corruption tests: one uninterrupted training run (and its merge)
in a fresh interpreter, with the list of file-system operations it made. Trials copy the project and compare
their final weights with these, bitwise."""
from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.reliability.rel_helpers import BASE, PYTHON, Result, clean_env, make_project, run_main

# 18 training rows, micro-batch 2, accumulation 2: 4 optimizer steps per epoch, so 3 steps stop mid-epoch and
# a resume must find the right batch. Dropout makes the saved RNG state matter. A checkpoint after every step. Two
# warmup steps: the learning rate differs at each step (0, half, full), so a resume must restore the schedule's place
# (one warmup step only wasted step 1 at lr 0, which plan and train say as a notice).
KILL_RECIPE = BASE.replace("max_steps: 2", "max_steps: 3") + (
    "save_steps: 1\nlogging_steps: 1\nper_device_train_batch_size: 2\ngradient_accumulation_steps: 2\n"
    "dropout: 0.1\nlora_dropout: 0.1\nlearning_rate: 1.0e-3\nwarmup_steps: 2\nplot_loss: false\n")
ADAPTER = "out/adapter/adapter_model.safetensors"


def crash_run(n: int, argv: list[str], cwd: Path, ops_file: Path | None = None, timeout: float = 600) -> Result:
    """`python -m pipeline ARGV` in a fresh interpreter, SIGKILLed before its n-th file operation (0: never)."""
    proc = subprocess.run([PYTHON, "-m", "tests.reliability.crashpoint", str(n), str(ops_file or "-"), *argv],
                          cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@dataclass
class Reference:
    root: Path  # the project after an uninterrupted build + train (+ merge for `merged`)
    ops: list[list]  # [index, operation, path] of the run
    weights: dict  # the final tensors

    def copy(self, dest: Path, output: bool = False) -> Path:
        """A copy of the project with its built data (and the training output when `output`)."""
        shutil.copytree(self.root, dest, ignore=None if output else shutil.ignore_patterns("out"))
        return dest

    def ops_in(self, fragment: str) -> list[int]:
        return [index for index, _, path in self.ops if fragment in path]


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = make_project(tmp_path_factory.mktemp("reference") / "proj", KILL_RECIPE)
    assert run_main(["build", "r.yaml"], root).code == 0
    ops_file = root.parent / "train_ops.json"
    result = crash_run(0, ["train", "r.yaml"], root, ops_file)
    assert result.code == 0, result.err[-3000:]
    return Reference(root, json.loads(ops_file.read_text()), tensors(root / ADAPTER))


@pytest.fixture(scope="session")
def merged(trained: Reference, tmp_path_factory: pytest.TempPathFactory) -> Reference:
    root = trained.copy(tmp_path_factory.mktemp("merged") / "proj", output=True)
    ops_file = root.parent / "merge_ops.json"
    result = crash_run(0, ["merge", "r.yaml"], root, ops_file)
    assert result.code == 0, result.err[-3000:]
    return Reference(root, json.loads(ops_file.read_text()), tensors(root / "out" / "merged" / "model.safetensors"))


# ---------------------------------------------------------------------------------------------- figures

_RUN = {"collected": 0, "deselected": 0, "passed": 0, "other": 0, "files": set()}


def _ours(nodeid: str) -> bool:
    return nodeid.startswith("tests/reliability/")


def pytest_collection_modifyitems(items: list) -> None:
    _RUN["collected"] = sum(_ours(item.nodeid) for item in items)
    _RUN["files"] = {item.nodeid.split("::")[0] for item in items if _ours(item.nodeid)}


def pytest_deselected(items: list) -> None:
    _RUN["deselected"] += sum(_ours(item.nodeid) for item in items)


def pytest_runtest_logreport(report) -> None:
    if _ours(report.nodeid) and (report.when == "call" or report.outcome != "passed"):
        _RUN["passed" if report.outcome == "passed" and report.when == "call" else "other"] += 1


def pytest_sessionfinish(session, exitstatus) -> None:
    """Publish the figures after a complete, green run of this folder (see tests/reliability/figures.py)."""
    from tests.reliability import figures

    every_file = {f"tests/reliability/{p.name}" for p in Path(__file__).parent.glob("test_*.py")}
    complete = _RUN["collected"] and _RUN["files"] == every_file and not _RUN["deselected"] \
        and not _RUN["other"] and _RUN["passed"] == _RUN["collected"]
    if complete and exitstatus == 0:
        figures.publish(figures.COUNTS)
