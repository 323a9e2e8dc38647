"""Where each built row came from: the raw file and line (or row) a user wrote, kept beside the built splits.

The build writes `<dataset_dir>/build/<name>/origins.json` with train.json and val.json (sft and dpo): for row N
of a split, [source, where], `source` the index of the raw file in the manifest's `sources` (the registry
entry's order) and `where` what the build's own messages call the record there, a line (JSON Lines, a JSON
array, CSV, text), `"N: row K"` (row K of a minified JSON array on line N) or `"row N"` (Parquet). It is the
one record of a row's origin: cleaning, capping and the shuffled train/val split move rows around, so what
tokenize-time messages name (an example over cutoff_len, a row with no trained token, ...) is read back from
here, not recomputed. A build without it (an older build version) falls back to the built file and row.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple, Sequence

ORIGINS = "origins.json"

Where = int | str  # a line, "N: row K" or "row N": as sources.Table.where names a record


class Origin(NamedTuple):
    """A row's raw file, its line or row there, and the dataset it belongs to (None: not known)."""

    file: str
    where: Where | None
    dataset: str | None = None

    @property
    def place(self) -> Where | None:
        """`where` as a message shows it after `file:`; the dataset's name follows the line (or row)."""
        if self.dataset is None:
            return self.where
        return f"{'' if self.where is None else self.where} (dataset '{self.dataset}')".lstrip()

    def __str__(self) -> str:
        return self.file if self.place is None else f"{self.file}:{self.place}"


def origin_blob(splits: dict[str, Sequence[tuple[int, Where]]]) -> bytes:
    """origins.json's bytes: per split, one compact [source, where] per row (about 8 bytes a row)."""
    return (json.dumps({split: list(map(list, rows)) for split, rows in splits.items()}, separators=(",", ":"))
            + "\n").encode("utf-8")


def built_origins(path: Path, rows: int, sources: Sequence[str]) -> list[Origin]:
    """The origin of each of the `rows` rows of the built split `path` (`.../build/<name>/<split>.json`), its raw
    files named as `sources` (the dataset's files in registry order, as the build names them); `path`:row for
    each row when origins.json is absent, damaged or does not match (a build by an older version)."""
    path = Path(path)
    dataset = path.parent.name
    try:
        with open(path.parent / ORIGINS, encoding="utf-8") as handle:
            entries = json.load(handle)[path.stem]
        found = [Origin(sources[source], where, dataset) for source, where in entries]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        found = []
    if len(found) != rows:
        return [Origin(str(path), i, dataset) for i in range(1, rows + 1)]
    return found


def as_origin(origin: Origin | str) -> Origin:
    """An Origin from one given as text, `file:row` (callers and tests that name rows themselves)."""
    if isinstance(origin, Origin):
        return origin
    file, _, where = str(origin).rpartition(":")
    return Origin(file, where) if file else Origin(str(origin), None)
