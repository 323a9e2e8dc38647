"""The launch environment a plain one-rank process gets, and how ranks of one machine share its cores (pipeline.runtime.dist)."""
from __future__ import annotations

from pipeline.runtime import dist


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
