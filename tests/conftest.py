"""Shared fixtures: tiny models and recipes are made by the tests themselves."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = [
    "tests.strict_deps",  # CI=true: a missing test dependency fails instead of skipping
    "tests.tiers",  # the long trials besides those marked in place: `make test` leaves them to `make test-slow`
    "tests.file_times",  # under xdist the files run longest first (and --record-file-times)
]

# Single-process DeepSpeed needs these; tests never reach the network or a GPU.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _one_share_of_the_cores() -> None:
    """Under pytest-xdist (`make test`: two workers on two cores) each worker, and every process it starts, computes
    on its share of the cores: torch's default, one thread per core in every worker, put 4 busy OpenMP threads on
    2 cores, and their spin-waits made the in-process tests 2-4x slower (tests/model side by side in two
    processes: 44-92 s with 2 threads each, 21-27 s with 1). An OMP_NUM_THREADS the caller set stands."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
    if workers < 2 or "OMP_NUM_THREADS" in os.environ:
        return
    threads = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch when it starts, here and in subprocesses
    if "torch" in sys.modules:  # already started (a plugin imported it): tell it directly
        sys.modules["torch"].set_num_threads(threads)


_one_share_of_the_cores()


def pytest_configure(config: pytest.Config) -> None:
    """Once per run (in xdist's controller, before the workers start): the project's modules byte-compiled.

    Why: with PYTHONDONTWRITEBYTECODE set (as in the environment CI ran in) no process writes __pycache__, so each
    of the suite's hundreds of `python -m pipeline` subprocesses compiled every module it imports from source:
    measured 0.2-0.6 CPU-s a process (validate 0.62 -> 0.51 user+sys, a tiny one-rank train 4.4 -> 4.0).
    compileall writes regardless of the variable; Python ignores a .pyc older than its source, so an edit made
    meanwhile still runs as edited."""
    if hasattr(config, "workerinput") or not sys.dont_write_bytecode:
        return  # a worker (the controller compiled), or every process writes its own .pyc anyway
    import compileall

    for folder in ("pipeline", "tests", "bench"):
        compileall.compile_dir(REPO / folder, quiet=1)


@pytest.fixture(autouse=True)
def _in_the_checkouts_root(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts in the checkout's root, the folder `make test` runs pytest in, wherever pytest was typed.

    Why: the "run this" messages give the make form only where make reads the pipeline's Makefile (pipeline.rerun),
    so an in-process test's expected message depended on the folder pytest started in (from /tmp: the python -m
    form; two tests of tests/data failed there). A fixture, not a chdir at import: pytest-xdist's workers resolve
    the typed test paths after importing this file. Tests that need another folder change to it themselves."""
    monkeypatch.chdir(REPO)


@pytest.fixture
def repo() -> Path:
    return REPO
