"""Shared fixtures: tiny models and recipes are made by the tests themselves."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.strict_deps"]  # CI=true: a missing test dependency fails instead of skipping

# Single-process DeepSpeed needs these; tests never reach the network or a GPU.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def repo() -> Path:
    return REPO


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (`make test` runs two workers, one file per worker at a time), the files holding the
    most `slow` tests go first, so the long end-to-end files run side by side instead of one of them alone at
    the end; within a file the order stays as written. Every worker computes the same order (xdist requires
    it). A plain `pytest` run keeps pytest's order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    slow: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        path = item.nodeid.split("::", 1)[0]
        first_seen.setdefault(path, i)
        slow[path] = slow.get(path, 0) + (item.get_closest_marker("slow") is not None)
    items.sort(key=lambda item: (-slow[p := item.nodeid.split("::", 1)[0]], first_seen[p]))
