"""Fixtures of the acceptance suite: a transformers-written checkpoint per family, a data folder, a workdir.

The helpers themselves live in tests/acceptance/harness.py (importable from any test folder).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from tests.acceptance import harness

pytest.importorskip("transformers")


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory) -> Callable[..., Path]:
    """hf_checkpoint(family="gpt2", seed=0, **config overrides) -> a save_pretrained directory (cached per args)."""
    made: dict[tuple, Path] = {}

    def get(family: str = "gpt2", seed: int = 0, **overrides: Any) -> Path:
        key = (family, seed, tuple(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"hf_{family}") / family
            harness.write_hf_checkpoint(path, family, seed=seed, **overrides)
            made[key] = path
        return made[key]

    return get


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """tmp_path with data/ (dataset_info.json + tiny sft and pt sources); the CLI runs here."""
    harness.write_data(tmp_path / "data")
    return tmp_path
