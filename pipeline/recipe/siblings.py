"""The recipes next to a recipe, read without validating them: what each writes, and which one writes a path.

make chains the recipes of one folder (pipeline.recipe.deps); the recipe rules refuse two of them sharing an
export_dir. Both read the siblings' raw values here, below the resolver: a sibling may be broken or unfinished,
and it is not this recipe's to validate.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
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


def _export_dir(recipe: Path) -> str | None:
    value = recipe_value(recipe, "export_dir")
    return value if isinstance(value, str) and value else None


def _writes(recipe: Path) -> list[tuple[str, str]]:
    """(folder, make goal that writes it) for what a sibling recipe produces: train its output_dir, merge its merged
    model (output_dir/merged, or export_dir when set). A recipe naming no dataset cannot train (a LLaMA-Factory
    merge recipe): `export` writes its export_dir."""
    out, export_dir = _output_dir(recipe), _export_dir(recipe)
    found = [(out, "train")] if out else []
    if export_dir:  # merge writes there instead of merged/
        found.append((export_dir, "merge" if recipe_value(recipe, "dataset") else "export"))
    elif out:
        found.append((os.path.join(out, "merged"), "merge"))
    return found


def _siblings(recipe_path: Path) -> list[Path]:
    """The other recipes in the folder of `recipe_path`, sorted (the first of several producers wins)."""
    me = recipe_path.resolve()
    return sorted(p for p in recipe_path.parent.glob("*.y*ml")
                  if p.suffix in (".yaml", ".yml") and p.resolve() != me)


def producer(recipe_path: Path, path: str) -> tuple[Path, str] | None:
    """(the recipe next to `recipe_path` that writes `path`, the make goal that writes it), or None. Of several
    folders holding `path` (saves/sft and saves/sft/merged; an export_dir inside another recipe's output_dir), the
    innermost one names the producer."""
    best: tuple[int, Path, str] | None = None
    for sibling in _siblings(recipe_path):
        for folder, goal in _writes(sibling):
            depth = len(os.path.normpath(folder))
            if _inside(path, folder) and (best is None or depth > best[0]):
                best = (depth, sibling, goal)
    return None if best is None else (best[1], best[2])


def export_dir_sharers(recipe_path: Path, export_dir: str) -> list[Path]:
    """The recipes next to `recipe_path` whose export_dir is `export_dir`, or holds it, or lies inside it: export
    replaces the folder as a whole, so each would delete the other's model, and make, which counts each recipe's
    own stamp, could hand a recipe that starts from the folder the other's newer export."""
    return [sibling for sibling in _siblings(recipe_path)
            if (theirs := _export_dir(sibling)) and (_inside(theirs, export_dir) or _inside(export_dir, theirs))]
