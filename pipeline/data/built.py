"""Where built data lives and how its manifest is read: `<dataset_dir>/build/<name>/manifest.json`.

Small and dependency-free on purpose: the build writes these folders, the loaders and checks read them,
and resolve reads the manifests to count training examples before any stage runs (`validate` and `plan`
must start fast, so this imports nothing heavy).
"""
from __future__ import annotations

import json
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
