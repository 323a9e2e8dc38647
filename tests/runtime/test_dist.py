"""The launch environment a plain one-rank process gets (pipeline.runtime.dist.ensure_launch_env)."""
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
