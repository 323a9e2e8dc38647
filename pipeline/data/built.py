"""Where built data lives and how its manifest is read: `<dataset_dir>/build/<name>/manifest.json`.

Small and dependency-free on purpose: the build writes these folders, the loaders and checks read them,
and resolve reads the manifests to count training examples before any stage runs (`validate` and `plan`
must start fast, so this imports nothing heavy).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def built_dir(dataset_dir: str | Path, name: str) -> Path:
    """The folder a build of dataset `name` writes (it holds train.json, val.json, manifest.json)."""
    return Path(dataset_dir) / "build" / name


def read_manifest(directory: Path) -> dict[str, Any] | None:
    """The manifest of a built dataset folder, or None when absent or unreadable."""
    try:
        with open(directory / MANIFEST, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def training_splits(name: str, eval_names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The built splits of training dataset `name` that training reads. Its val split too when `eval_dataset`
    names other datasets: then nothing evaluates on it, and leaving it out would drop val_size of the data
    without a word (LLaMA-Factory trains the whole dataset then)."""
    return ("train", "val") if eval_names and name not in eval_names else ("train",)


def row_count(val_size: float) -> int | None:
    """val_size as a number of rows, or None for a fraction. A whole float >= 1 (`val_size: 2.0`) is a count too:
    the recipe schema accepts it as an integer (JSON Schema's rule) and LLaMA-Factory reads any val_size > 1 as
    int(val_size) rows; taken as a fraction it held out every row."""
    if isinstance(val_size, bool):
        return None
    if isinstance(val_size, int):
        return val_size
    return int(val_size) if val_size >= 1 and float(val_size).is_integer() else None


def held_out(val_size: float, n: int) -> int:
    """Rows of `n` that val_size holds out, in LLaMA-Factory's two forms: an integer is a number of rows (capped at
    `n`; the caller refuses a split that leaves none to train on), a float in [0, 1) the fraction ceil(val_size x n).
    0 (either form) holds out nothing: no validation split, as LLaMA-Factory's default."""
    count = row_count(val_size)
    if count is not None:
        return min(count, n)
    return math.ceil(val_size * n - 1e-9)


def file_stamp(info: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file is written, replaced or edited in place (its mtime set back too: the ctime)."""
    return info.st_size, info.st_mtime_ns, info.st_ino, info.st_ctime_ns
