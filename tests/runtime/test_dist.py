"""The launch environment a plain one-rank process gets, how ranks of one machine share its cores, and how a rank ends
(pipeline.runtime.dist)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime import dist

REPO = Path(__file__).resolve().parents[2]


def test_empty_variables_count_as_unset(monkeypatch):
    """make passes its empty MASTER_ADDR= / MASTER_PORT= defaults through the environment."""
    monkeypatch.setenv("MASTER_ADDR", "")
    monkeypatch.setenv("MASTER_PORT", "")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.ensure_launch_env()
    import os

    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
    assert os.environ["WORLD_SIZE"] == "1"


def test_ranks_of_one_machine_split_its_cores(monkeypatch):
    import os

    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    try:
        monkeypatch.setenv("LOCAL_SIZE", "2")
        assert dist.share_cores() == 4 and torch.get_num_threads() == 4
        monkeypatch.setenv("LOCAL_SIZE", "16")
        assert dist.share_cores() == 1 and torch.get_num_threads() == 1  # never below one thread
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("LOCAL_SIZE", "1")
    assert dist.share_cores() is None  # one rank keeps torch's default
    monkeypatch.setenv("LOCAL_SIZE", "2")
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert dist.share_cores() is None and torch.get_num_threads() == before  # the user's choice stands


# A rank's end (dist.end_process), in a process of its own: it ends that process. One rank (gloo, world size 1)
# runs a collective on a tensor Python made, registers an atexit handler and leaves half a line unflushed, in
# Python's buffer and in C's (printf: NCCL_DEBUG's lines, a C++ extension's prints); an object whose __del__ runs
# only when the interpreter finalizes tells whether it did.
END_SCRIPT = """
import atexit, ctypes, os, sys, torch
import torch.distributed as tdist
from pipeline.runtime import dist

class Finalized:
    def __del__(self, write=os.write):  # bound now: the module's globals may be cleared first
        write(2, b"interpreter finalized\\n")

kept = Finalized()

def command():
    dist.init()
    tdist.all_reduce(torch.ones(3))  # gloo's worker thread frees this tensor after the call returns
    atexit.register(lambda: print(f"atexit: process group initialized {tdist.is_initialized()}"))
    sys.stdout.write("half a line")
    ctypes.CDLL(None).printf(b"C stdio: line kept in libc's buffer\\n")
    if sys.argv[1] == "raise":
        raise ValueError("a bug on this rank")
    return int(sys.argv[1])

dist.end_process(command)
"""


def end_a_rank(outcome: str) -> subprocess.CompletedProcess:
    # PYTHONUNBUFFERED (set in some shells and CI) unbuffers Python's and C's stdout: the flushes then go untested
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT", "LOCAL_SIZE", "PYTHONUNBUFFERED")}
    return subprocess.run([sys.executable, "-c", END_SCRIPT, outcome], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env=env)


@pytest.mark.parametrize("outcome, code", [("0", 0), ("raise", 1)])
def test_a_rank_ends_without_finalizing_the_interpreter(outcome, code):
    """Ended well: the process groups are destroyed before the atexit handlers; a failing rank (here a traceback)
    keeps its own code and its groups (no barrier its peers may never reach). Either way the atexit handlers run,
    the streams are flushed and the interpreter is not finalized, where gloo's worker threads could still ask for
    the GIL and abort the process (std::terminate, SIGABRT)."""
    proc = end_a_rank(outcome)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "half a line" in proc.stdout  # block-buffered (a pipe): flushed before os._exit
    assert "C stdio: line kept in libc's buffer" in proc.stdout  # C's stdio buffer too (exit() flushes it)
    assert f"atexit: process group initialized {outcome != '0'}" in proc.stdout
    assert "interpreter finalized" not in proc.stderr and "terminate called" not in proc.stderr
    assert ("ValueError: a bug on this rank" in proc.stderr) == (outcome == "raise")


def test_a_process_without_process_groups_exits_as_usual(monkeypatch):
    """validate, plan, build: sys.exit with the code, so the interpreter finalizes as ever."""
    monkeypatch.setattr(dist, "initialized", lambda: False)
    with pytest.raises(SystemExit) as stop:
        dist.end_process(lambda: 2)
    assert stop.value.code == 2
    with pytest.raises(ValueError, match="a bug"):
        dist.end_process(lambda: (_ for _ in ()).throw(ValueError("a bug")))


def test_all_sum_unread_alone_stays_where_the_values_are(monkeypatch):
    """One process: nothing to reduce, so the sum stays on the values' device (the CPU for plain floats, e.g. an
    evaluation whose rank saw no batch) and no accelerator is asked for (dist.device imports DeepSpeed and names
    the GPU); the values widen to float64 exactly."""
    import torch

    def no_device():
        raise AssertionError("dist.device() asked for in a one-process sum")

    monkeypatch.setattr(dist, "device", no_device)
    summed = dist.all_sum_unread([0.5, 3, torch.tensor(0.25, dtype=torch.bfloat16)])
    assert summed.dtype == torch.float64 and summed.device.type == "cpu"
    assert summed.tolist() == [0.5, 3.0, 0.25]
    assert dist.all_sum_unread([1.0, 2]).tolist() == [1.0, 2.0]
