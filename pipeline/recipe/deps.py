"""`deps`: what a recipe depends on, as `NAME=value` lines the Makefile reads.

    RECIPE_FILES=<the recipe and every file it extends>   (editing any of them makes the stages stale)
    OUTPUT_DIR=<output_dir>
    DATASET_DIR=<dataset_dir>
    DATASETS=<dataset names, space separated>
    DATA_FILES=<the local files those datasets (and eval_dataset) read, per dataset_info.json's file_name>
    STAGE=<pt|sft|dpo>
    UPSTREAM=<the recipe in the same folder whose output_dir holds model_name_or_path (or the adapter), or empty>
    UPSTREAM_GOAL=<merge when that path is the upstream's merged/ model, else train>

The same chain gives a chained recipe its tokenizer before the upstream has run (tokenizer_source).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import UserError
from pipeline.recipe import Resolved
from pipeline.recipe.load import load_chain


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(path), os.path.normpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def recipe_value(recipe: Path, key: str) -> Any:
    """A key's value as a sibling recipe (or a file it extends) writes it, read without validating the recipe;
    None when unset or unreadable."""
    try:
        chain = load_chain(recipe)
    except UserError:
        return None
    value: Any = None
    for layer in chain.layers:
        if key in layer:
            value = layer[key].value
    return value


def _output_dir(recipe: Path) -> str | None:
    """A sibling recipe's output_dir (its own or inherited; saves/<its name> by default)."""
    value = recipe_value(recipe, "output_dir")
    if value is None:
        return os.path.join("saves", recipe.stem)
    return value if isinstance(value, str) else None


def producer(recipe_path: Path, path: str) -> tuple[Path, str] | None:
    """(the recipe next to `recipe_path` whose output_dir holds `path`, the make goal that writes it: merge for its
    merged/ model, else train), or None."""
    siblings = sorted(p for p in recipe_path.parent.glob("*.y*ml") if p.suffix in (".yaml", ".yml"))
    for sibling in siblings:
        if sibling.resolve() == recipe_path.resolve():
            continue
        out = _output_dir(sibling)
        if out and _inside(path, out):
            return sibling, "merge" if _inside(path, os.path.join(out, "merged")) else "train"
    return None


def upstream(r: Resolved) -> str:
    """The recipe next to this one that produces its model (or adapter), or ''."""
    return _upstream(r)[0]


def _upstream(r: Resolved) -> tuple[str, str]:
    """(that recipe, the make goal that produces the path: merge for its merged/ model, else train), or ('', '')."""
    for path in (p for p in (r["model_name_or_path"], r["adapter_name_or_path"]) if p):
        found = producer(r.recipe_path, path)
        if found:
            return str(found[0]), found[1]
    return "", ""


def tokenizer_source(r: Mapping[str, Any]) -> str | None:
    """Where a resolved recipe's tokenizer comes from (pipeline.recipe.args.data_args records it in DataArgs).

    tokenizer_name_or_path when set, else model_name_or_path. A model that another recipe next to this one has
    still to produce (its output_dir/merged or model/: a chained recipe checked before the upstream ran) has
    the upstream's tokenizer, since merge and the full-run export copy their base's tokenizer files: the
    chain is followed to its root. Without this, a chained Llama recipe would be tokenized by whatever the
    missing directory defaulted to.
    """
    if r.get("tokenizer_name_or_path"):
        return str(r["tokenizer_name_or_path"])
    if not r.get("model_name_or_path"):  # a partial mapping (unit tests)
        return None
    name = str(r["model_name_or_path"])
    recipe = getattr(r, "recipe_path", None)
    if recipe is None:
        return name
    from pipeline.model.config import PRESETS

    seen: set[Path] = set()
    while name not in PRESETS and not Path(name).exists():
        found = producer(Path(recipe), name)
        if found is None or found[0].resolve() in seen:
            break
        recipe = found[0]
        seen.add(recipe.resolve())
        upstream_tokenizer = recipe_value(recipe, "tokenizer_name_or_path")
        if isinstance(upstream_tokenizer, str) and upstream_tokenizer:
            return upstream_tokenizer
        upstream_model = recipe_value(recipe, "model_name_or_path")
        if not isinstance(upstream_model, str):
            break
        name = upstream_model
    return name


_MAKE_UNSAFE = set(" \t\n#$:;=%*?[]\\'\"")  # a prerequisite make cannot name as it is


def data_files(r: Mapping[str, Any]) -> list[str]:
    """The local files the recipe's datasets read (`file_name`: a file, or a folder's files), read straight off
    dataset_info.json: so that `make data` re-runs when one is edited, wherever it sits (LLaMA-Factory keeps its
    files beside the registry, not under raw/). Validation is `build`'s job: an unreadable registry, a hub
    entry (its files come from the hub cache) or a missing file adds nothing here; a path make cannot name
    (a space, a colon) is left out too."""
    import json

    from pipeline.data.registry import REGISTRY_FILE

    folder = Path(str(r["dataset_dir"]))
    try:
        registry = json.loads((folder / REGISTRY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    found: list[str] = []
    for name in [*(r.get("dataset") or []), *(r.get("eval_dataset") or [])]:
        entry = registry.get(name) if isinstance(registry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or "hf_hub_url" in entry:
            continue
        path = folder / entry["file_name"]
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
        found += [str(p) for p in files if not _MAKE_UNSAFE & set(str(p)) and str(p) not in found]
    return found


def lines(r: Resolved) -> list[str]:
    return [
        f"RECIPE_FILES={' '.join(r.files)}",
        f"OUTPUT_DIR={r['output_dir']}",
        f"DATASET_DIR={r['dataset_dir']}",
        f"DATASETS={' '.join(r['dataset'])}",
        f"DATA_FILES={' '.join(data_files(r))}",
        f"STAGE={r['stage']}",
        *(f"{name}={value}" for name, value in zip(("UPSTREAM", "UPSTREAM_GOAL"), _upstream(r))),
    ]


def run(r: Resolved, args: argparse.Namespace | None = None) -> int:
    print("\n".join(lines(r)))
    return 0
