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
