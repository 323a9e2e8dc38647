"""Collect every `file:line: problem` of one kind before failing, so a user fixes them in one pass."""
from __future__ import annotations

import re
from collections import Counter

from pipeline.errors import UserError

PER_FILE_CAP = 20
TOTAL_CAP = 60
_KEEP = 1000  # per file, kept for sorting; beyond that only counted
_NUMBER = re.compile(r"\d+")


def line_order(where: int | str | None) -> int:
    """Sort key: whole-file problems first, then by line/row number."""
    if where is None:
        return -1
    if isinstance(where, int):
        return where
    found = _NUMBER.search(where)
    return int(found.group()) if found else -1


def alike(count: int) -> str:
    """What a message said once for `count` rows with the same problem adds: they are not listed one by one."""
    return f" ({count:,} rows alike; this is the first)" if count > 1 else ""


class Problems:
    """Messages grouped by file, shown in line order: at most PER_FILE_CAP per file, with exact totals."""

    def __init__(self, per_file_cap: int = PER_FILE_CAP, total_cap: int = TOTAL_CAP):
        self.per_file_cap = per_file_cap
        self.total_cap = total_cap
        self.entries: dict[str, list[tuple[int, int, str]]] = {}
        self.count: Counter[str] = Counter()

    def add(self, file: str, where: int | str | None, text: str) -> None:
        """One problem at `file:where` (a line, a row, a `row:field`); None when it concerns the whole file."""
        self.count[file] += 1
        kept = self.entries.setdefault(file, [])
        if len(kept) < _KEEP:
            message = f"{file}:{where}: {text}" if where is not None else f"{file}: {text}"
            kept.append((line_order(where), len(kept), message))

    def extend(self, other: "Problems") -> None:
        """Add another collector's problems (a build worker process's), keeping their order and counts."""
        for file, entries in other.entries.items():
            kept = self.entries.setdefault(file, [])
            room = _KEEP - len(kept)
            kept.extend((order, len(kept) + i, message) for i, (order, _, message) in enumerate(entries[:max(room, 0)]))
        self.count.update(other.count)

    def __bool__(self) -> bool:
        return bool(self.count)

    def __len__(self) -> int:
        return sum(self.count.values())

    def messages(self) -> list[str]:
        out: list[str] = []
        for entries in self.entries.values():
            room = min(self.per_file_cap, self.total_cap - len(out))
            out.extend(message for _, _, message in sorted(entries)[:max(room, 0)])
        hidden = len(self) - len(out)
        if hidden:
            per_file = ", ".join(f"{file}: {n:,}" for file, n in self.count.items())
            out.append(f"... and {hidden:,} more problems not shown ({len(self):,} in all; {per_file})")
        return out

    def raise_if_any(self) -> None:
        if self:
            raise UserError(self.messages())
