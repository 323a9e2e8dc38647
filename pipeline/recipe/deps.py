"""`deps`: what a recipe depends on, as `NAME=value` lines the Makefile reads.

    RECIPE_FILES=<the recipe and every file it extends>   (editing any of them makes the stages stale)
    OUTPUT_DIR=<output_dir>
    DATASET_DIR=<dataset_dir>
    DATASETS=<dataset names, space separated>
    STAGE=<pt|sft|dpo>
    UPSTREAM=<the recipe in the same folder whose output_dir holds model_name_or_path (or the adapter), or empty>
    UPSTREAM_GOAL=<merge when that path is the upstream's merged/ model, else train>
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.recipe import Resolved
from pipeline.recipe.load import load_chain


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def _output_dir(recipe: Path) -> str | None:
    """A sibling recipe's output_dir (its own or inherited), read without validating it."""
    try:
        chain = load_chain(recipe)
    except UserError:
        return None
    value: Any = None
    for layer in chain.layers:
        if "output_dir" in layer:
            value = layer["output_dir"].value
    if value is None:
        return os.path.join("saves", recipe.stem)
    return value if isinstance(value, str) else None


def upstream(r: Resolved) -> str:
    """The recipe next to this one that produces its model (or adapter), or ''."""
    return _upstream(r)[0]


def _upstream(r: Resolved) -> tuple[str, str]:
    """(that recipe, the make goal that produces the path: merge for its merged/ model, else train), or ('', '')."""
    wanted = [p for p in (r["model_name_or_path"], r["adapter_name_or_path"]) if p]
    here = r.recipe_path
    siblings = sorted(p for p in here.parent.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))
    for path in wanted:
        for sibling in siblings:
            if sibling.resolve() == here.resolve():
                continue
            out = _output_dir(sibling)
            if out and _inside(path, out):
                return str(sibling), "merge" if _inside(path, os.path.join(out, "merged")) else "train"
    return "", ""


def lines(r: Resolved) -> list[str]:
    return [
        f"RECIPE_FILES={' '.join(r.files)}",
        f"OUTPUT_DIR={r['output_dir']}",
        f"DATASET_DIR={r['dataset_dir']}",
        f"DATASETS={' '.join(r['dataset'])}",
        f"STAGE={r['stage']}",
        *(f"{name}={value}" for name, value in zip(("UPSTREAM", "UPSTREAM_GOAL"), _upstream(r))),
    ]


def run(r: Resolved, args: argparse.Namespace | None = None) -> int:
    print("\n".join(lines(r)))
    return 0
