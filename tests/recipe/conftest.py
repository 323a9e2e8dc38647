"""Recipe tests run in a temporary folder: recipes, manifests and DeepSpeed JSON files are written per test."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest

from pipeline.recipe import rules
from tests.recipe.helpers import BASE


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rules.core, "cuda_available", lambda: False)  # same answer on GPU and CPU machines
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., str]:
    """write("recipes/x.yaml", "key: value ...") -> the relative path; text is dedented; bytes written as is."""
    def _write(name: str, content: str | bytes | dict[str, Any]) -> str:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, dict):
            path.write_text(json.dumps(content, indent=2), encoding="utf-8")
        else:
            path.write_text(textwrap.dedent(content).lstrip("\n"), encoding="utf-8")
        return name
    return _write


@pytest.fixture
def manifest(write: Callable[..., str]) -> Callable[..., None]:
    """manifest("alpaca_demo", train=900, val=100) writes datasets/build/<name>/manifest.json."""
    def _manifest(name: str, train: int, val: int = 0, dataset_dir: str = "datasets") -> None:
        write(f"{dataset_dir}/build/{name}/manifest.json", {
            "schema_version": 1, "name": name, "stage": "sft", "sources": [], "rows_read": train + val,
            "rows_kept": train + val, "removed": {}, "splits": {"train": train, "val": val}})
    return _manifest




@pytest.fixture
def recipe(write: Callable[..., str]) -> Callable[..., str]:
    """recipe("lora_rank: 4") writes BASE + the text to r.yaml (or `name`) and returns its path."""
    def _recipe(extra: str = "", name: str = "r.yaml") -> str:
        return write(name, BASE + textwrap.dedent(extra).lstrip("\n"))
    return _recipe
