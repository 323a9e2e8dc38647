"""Helpers for the data-stage tests (a uniquely named module: conftest.py files of other folders share a name)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def schema_defaults() -> dict[str, Any]:
    """Every recipe key with its default, read from the recipe JSON Schema (the single source of truth)."""
    schema = json.loads((REPO / "pipeline/recipe/schema/recipe.schema.json").read_text(encoding="utf-8"))
    return {key: prop.get("default") for key, prop in schema["properties"].items()}


def jsonl(rows: list[Any]) -> str:
    return "".join(json.dumps(row) + "\n" for row in rows)


def alpaca_rows(n: int, prefix: str = "task") -> list[dict[str, str]]:
    return [{"instruction": f"{prefix} {i}: say the number", "input": "" if i % 2 else f"n={i}",
             "output": f"The number is {i}."} for i in range(n)]
