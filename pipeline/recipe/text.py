"""Plain-text tables for the terminal (validate's report, plan's sections)."""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence


def format_table(rows: Iterable[Mapping[str, Any] | Sequence[Any]], header: Sequence[str] | None = None) -> str:
    """Rows of dicts (columns in first-seen order) or of sequences (with `header`) as aligned columns."""
    rows = list(rows)
    if not rows:
        return "(nothing)"
    if isinstance(rows[0], Mapping):
        columns: dict[str, None] = {}
        for row in rows:
            columns.update(dict.fromkeys(row))  # type: ignore[arg-type]
        header = list(columns)
        cells = [[_cell(row.get(c)) for c in header] for row in rows]  # type: ignore[union-attr]
    else:
        cells = [[_cell(v) for v in row] for row in rows]
    table = ([list(header)] if header else []) + cells
    widths = [max(len(r[i]) for r in table if i < len(r)) for i in range(max(len(r) for r in table))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(v) for v in value)
    return str(value)
