"""Lists of names as recipes write them: `a,b`, `a, b` or `[a, b]` (datasets, LoRA target modules).

LLaMA-Factory recipes write comma strings; YAML lists work too. Resolve turns the recipe's values into
lists once; library functions called with plain values (unit tests, other callers) use the same rule.
"""
from __future__ import annotations

from typing import Iterable


def split_names(value: str | Iterable[str] | None) -> list[str]:
    """The names in a comma string or a list, stripped, empty ones dropped; None gives []."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else value
    return [part.strip() for part in parts if part and part.strip()]
