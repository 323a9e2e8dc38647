"""Fixtures for the data stage: recipes as plain dicts with the schema's defaults, registries in tmp_path."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from data_helpers import schema_defaults


@pytest.fixture
def make_recipe(tmp_path: Path) -> Callable[..., dict[str, Any]]:
    """make_recipe(registry={...}, files={"raw/x.jsonl": "..."}, **keys) -> a recipe dict over tmp_path/data."""

    def make(registry: dict[str, Any] | None = None, files: dict[str, str | bytes] | None = None,
             **keys: Any) -> dict[str, Any]:
        data = tmp_path / "data"
        data.mkdir(exist_ok=True)
        for name, content in (files or {}).items():
            path = data / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8")
        if registry is not None:
            (data / "dataset_info.json").write_text(json.dumps(registry, indent=2), encoding="utf-8")
        r = schema_defaults()
        r.update(model_name_or_path="tiny", dataset=list(registry or {})[:1], dataset_dir=str(data))
        r.update(keys)
        if isinstance(r["dataset"], str):
            r["dataset"] = [r["dataset"]]
        return r

    return make
