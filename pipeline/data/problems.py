"""Collect every `file:line: problem` of one kind before failing, so a user fixes them in one pass."""
from __future__ import annotations

from collections import Counter

from pipeline.errors import UserError

PER_FILE_CAP = 20
TOTAL_CAP = 60


class Problems:
    """Messages grouped by file; at most PER_FILE_CAP shown per file, with the exact totals."""

    def __init__(self, per_file_cap: int = PER_FILE_CAP, total_cap: int = TOTAL_CAP):
        self.per_file_cap = per_file_cap
        self.total_cap = total_cap
        self.shown: list[str] = []
        self.count: Counter[str] = Counter()

    def add(self, file: str, where: int | str | None, text: str) -> None:
        """One problem at `file:where` (a line, a row, a `row:field`); None when it concerns the whole file."""
        self.count[file] += 1
        if self.count[file] <= self.per_file_cap and len(self.shown) < self.total_cap:
            self.shown.append(f"{file}:{where}: {text}" if where is not None else f"{file}: {text}")

    def __bool__(self) -> bool:
        return bool(self.count)

    def __len__(self) -> int:
        return sum(self.count.values())

    def messages(self) -> list[str]:
        out = list(self.shown)
        hidden = len(self) - len(self.shown)
        if hidden:
            per_file = ", ".join(f"{file}: {n:,}" for file, n in self.count.items())
            out.append(f"... and {hidden:,} more problems not shown ({len(self):,} in all; {per_file})")
        return out

    def raise_if_any(self) -> None:
        if self:
            raise UserError(self.messages())
