"""The recipes a recipe can chain to, read without validating them: what each writes, and which one writes a path.

make chains recipes (pipeline.recipe.deps); the recipe rules refuse two of them sharing an export_dir or leaving the
producer of an upstream path undecided. All of them read the other recipes' raw values here, below the resolver: one
may be broken or unfinished, and it is not this recipe's to validate.

The scope is the recipe's own folder and the working tree make runs from (the current directory), because paths in
recipes are relative to that directory (LLaMA-Factory resolves output_dir the same way) and LLaMA-Factory's layout puts
the recipe that trains an adapter (examples/train_lora/) and the one that merges it (examples/merge_lora/) in
different folders. Every *.yaml / *.yml under it is read, except in hidden folders, saves/, tests/, __pycache__/,
node_modules/, virtual environments (a pyvenv.cfg), run folders (a resolved.yaml) and linked folders, and only files
that set model_name_or_path (which every recipe needs, itself or through extends) count; at most MAX_FILES files are
read and MAX_ENTRIES names looked at, so a make started from a huge directory stays quick (what lies past them is
not looked at; the recipe's own folder always is).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import UserError
from pipeline.names import CHECKPOINT_NAME, PREFERENCE_STAGES, RUN_FOLDERS, split_names
from pipeline.recipe.load import load_chain, shown_here
from pipeline.recipe.started import RESOLVED_FILE

MAX_FILES = 2000  # YAML files read per search; a working tree of recipes holds far fewer (LLaMA-Factory's: ~150)
# Names (files and folders) looked at per search: make or validate started from a directory holding a large data tree
# (a home folder, a dataset of many small files) would otherwise walk all of it for no recipe
MAX_ENTRIES = 100_000
# Besides hidden ones: outputs and caches, and test fixtures (this project's tests/compat/lf_examples holds
# LLaMA-Factory's recipes: a user's copy of one in recipes/ would share their export_dir and output_dirs).
SKIPPED_FOLDERS = ("saves", "tests", "__pycache__", "node_modules")
_RUN_MARKERS = (RESOLVED_FILE, "pyvenv.cfg")  # a run's output_dir, a virtual environment: no recipes inside
_KEYS = ("output_dir", "export_dir", "dataset", "model_name_or_path")
_values_cache: dict[str, tuple[tuple, dict[str, Any]]] = {}

UPSTREAM_KEYS = ("model_name_or_path", "adapter_name_or_path", "ref_model", "ref_model_adapters",
                 "reward_model")  # what it starts from
REFERENCE_KEYS = ("ref_model", "ref_model_adapters")  # read by the preference stages and sft's ASFT loss only
STAGE_KEYS = {key: PREFERENCE_STAGES for key in REFERENCE_KEYS} | {"reward_model": ("ppo",)}  # read there only


def upstream_items(r: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, path) for the paths of UPSTREAM_KEYS the recipe sets (the reference's only under the preference stages
    and sft with use_asft_loss, the reward model's under stage ppo: the stages that read them, and not a reward
    server's URL; ref_model_adapters' comma-separated folders each)."""
    asft = r.get("stage") == "sft" and bool(r.get("use_asft_loss"))
    server = r.get("reward_model_type") == "api"  # reward_model is then a URL, which no recipe writes
    keys = [k for k in UPSTREAM_KEYS
            if (k not in STAGE_KEYS or r.get("stage") in STAGE_KEYS[k] or (asft and k in REFERENCE_KEYS))
            and not (server and k == "reward_model")]
    lists = {k: split_names(r[k]) if k == "ref_model_adapters" else [r[k]] for k in keys if r.get(k)}
    return [(k, str(path)) for k, paths in lists.items() for path in paths]


def upstream_paths(r: Mapping[str, Any]) -> list[str]:
    """The paths of upstream_items, in UPSTREAM_KEYS order."""
    return [path for _, path in upstream_items(r)]


def _inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies in it, both relative to the working directory (or absolute)."""
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def recipe_value(recipe: Path, key: str) -> Any:
    """A key's value as another recipe (or a file it extends) writes it, read without validating the recipe;
    None when unset or unreadable."""
    return recipe_values(recipe, key)[key]


def recipe_values(recipe: Path, *keys: str) -> dict[str, Any]:
    """recipe_value of several keys from one read of the recipe's chain."""
    values: dict[str, Any] = dict.fromkeys(keys)
    try:
        chain = load_chain(recipe)
    except UserError:
        return values
    for layer in chain.layers:
        for key in keys:
            if key in layer:
                values[key] = layer[key].value
    return values


def _values(recipe: Path) -> dict[str, Any]:
    """The keys of _KEYS a recipe sets, read once per version of its files: a search reads every recipe of the
    working tree, and deps asks again for each path and each step of a chain."""
    def stat(file: str) -> tuple:
        try:
            s = os.stat(file)
        except OSError:
            return (file, None)
        return (file, s.st_mtime_ns, s.st_size)

    key = os.path.abspath(recipe)
    cached = _values_cache.get(key)
    if cached is not None and all(stat(entry[0]) == entry for entry in cached[0]):
        return cached[1]
    try:
        chain = load_chain(recipe)
    except UserError:
        values: dict[str, Any] = {}
        files: list[str] = [str(recipe)]
    else:
        values = {}
        for layer in chain.layers:
            values.update({k: layer[k].value for k in _KEYS if k in layer})
        files = list(chain.files)
    _values_cache[key] = (tuple(stat(os.path.abspath(f)) for f in files), values)
    return values


def output_dir_of(recipe: Path) -> str | None:
    """A recipe's output_dir (its own or inherited; saves/<its name> by default)."""
    value = _values(recipe).get("output_dir")
    if value is None:
        return os.path.join("saves", recipe.stem)
    return value if isinstance(value, str) else None


def _export_dir(recipe: Path) -> str | None:
    value = _values(recipe).get("export_dir")
    return value if isinstance(value, str) and value else None


def _writes(recipe: Path) -> list[tuple[str, str]]:
    """(folder, make goal that writes it) for what a recipe produces: train its output_dir, merge its merged
    model (output_dir/merged, or export_dir when set). A recipe naming no dataset cannot train (a LLaMA-Factory
    merge recipe): `export` writes its export_dir."""
    out, export_dir = output_dir_of(recipe), _export_dir(recipe)
    found = [(out, "train")] if out else []
    if export_dir:  # merge writes there instead of merged/
        found.append((export_dir, "merge" if _values(recipe).get("dataset") else "export"))
    elif out:
        found.append((os.path.join(out, "merged"), "merge"))
    return found


def _run_writes(path: str, out: str) -> bool:
    """Whether `path`, inside the output_dir `out`, is a folder a run writes there: out itself, one of RUN_FOLDERS or
    a checkpoint-<step>/ (or inside them). Any other name is not made by the run (saves/demo_pt/modle, one slip from
    the demo's saves/demo_pt/model): make chained it to the run, validate called it produced, and train refused it."""
    rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(out))).parts
    return not rel or rel == (".",) or rel[0] in RUN_FOLDERS or bool(CHECKPOINT_NAME.fullmatch(rel[0]))


def run_checkpoint(path: str, recipe: Path) -> int | None:
    """The step of the checkpoint-<step> folder of the run `recipe` trains (its output_dir's) that `path` is or lies
    in (checkpoint-<step>/adapter); None for another path."""
    out = output_dir_of(recipe)
    if out is None or not _inside(path, out) or os.path.abspath(path) == os.path.abspath(out):
        return None
    step = CHECKPOINT_NAME.fullmatch(Path(os.path.relpath(os.path.abspath(path), os.path.abspath(out))).parts[0])
    return int(step[1]) if step else None


def unsaved_step(recipe: Path, step: int) -> str | None:
    """Why the run `recipe` trains writes no checkpoint-<step>, by its keys as written (save_strategy, save_steps,
    max_steps; the schema's defaults where unset), or None when it does or may (a run of num_train_epochs ends at a
    step counted from the data: any step may be its last, which always saves). train saves every save_steps steps
    under save_strategy steps, and at the end; save_total_limit then removes all but the newest (a removed step was
    chained: make retrained a finished run from scratch for a folder that training removes again)."""
    from pipeline.recipe.spec import defaults

    given = recipe_values(recipe, "save_strategy", "save_steps", "max_steps", "save_total_limit")
    default = defaults()
    strategy, every, last = (default[k] if given[k] is None else given[k]
                             for k in ("save_strategy", "save_steps", "max_steps"))
    if not isinstance(last, int) or last < 1 or step == last:
        return None
    limit = given["save_total_limit"]  # train.checkpoint.prune: the newest `limit` stay
    limit = limit if isinstance(limit, int) and limit >= 1 else None
    if step < last and strategy == "steps" and isinstance(every, int) and every > 0 and step % every == 0:
        if limit is None:
            return None
        saved = range(every, last, every)
        kept = [*saved[max(0, len(saved) - limit + 1):], last]
        shown = " and ".join(f"checkpoint-{k}" for k in kept) if len(kept) < 3 else \
            f"checkpoint-{kept[0]} to checkpoint-{last}"
        return None if step in kept else f"save_total_limit {limit} removes it (the run keeps {shown})"
    if step < last and strategy == "epoch":
        # an epoch's end, counted from the data: saved, unless save_total_limit 1 keeps the last step alone (which
        # epoch ends a larger limit keeps depends on the data's count too)
        return f"save_total_limit 1 removes it (the run keeps checkpoint-{last})" if limit == 1 else None
    return f"save_strategy {strategy}, save_steps {every}, max_steps {last}"


def scanned(recipe_path: Path) -> tuple[list[Path], list[Path]]:
    """(every YAML file in scope, the folders read), sorted: the recipe's own folder and the working tree, as the
    module says. The Makefile lists the folders and their YAML files as prerequisites of deps.mk, so a recipe written
    into one later, or into a folder created in one, is seen by the next make."""
    folders = {Path(os.path.normpath(recipe_path.parent))}
    files: list[Path] = []
    seen = 0
    for top, dirs, names in os.walk(os.curdir):
        seen += len(dirs) + len(names)
        if any(marker in names for marker in _RUN_MARKERS):
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS)
        folders.add(Path(os.path.normpath(top)))
        files += [Path(os.path.normpath(os.path.join(top, n))) for n in sorted(names) if n.endswith((".yaml", ".yml"))]
        if len(files) >= MAX_FILES or seen >= MAX_ENTRIES:
            break
    files = files[:MAX_FILES] + [Path(os.path.normpath(p)) for p in recipe_path.parent.glob("*.y*ml")
                                 if p.suffix in (".yaml", ".yml")]
    return sorted({p.resolve(): shown_here(p) for p in files}.values()), sorted(folders)


def _recipes(recipe_path: Path) -> list[Path]:
    """The other recipes in scope (files that set model_name_or_path), sorted."""
    me = recipe_path.resolve()
    return [p for p in scanned(recipe_path)[0] if p.resolve() != me and _values(p).get("model_name_or_path")]


def producers(recipe_path: Path, path: str) -> list[tuple[Path, str]]:
    """(recipe, the make goal that writes `path`) for the recipe in scope that writes it: one, or none, or several
    when make cannot tell (pipeline.recipe.rules.outputs refuses that). Of several folders holding `path`
    (saves/sft and saves/sft/merged; an export_dir inside another recipe's output_dir) the innermost one names the
    producer; of several recipes writing that folder, the one in this recipe's own folder (the only one make searched
    before it searched the working tree: a layout that chained then chains the same way), else the one with this
    recipe's file name (LLaMA-Factory names examples/merge_lora/qwen3_lora_sft.yaml after the
    examples/train_lora/qwen3_lora_sft.yaml it merges, while four other train_lora / train_qlora examples write the
    same output_dir)."""
    best: list[tuple[int, Path, str]] = []
    for other in _recipes(recipe_path):
        for folder, goal in _writes(other):
            if _inside(path, folder) and (goal != "train" or _run_writes(path, folder)):
                depth = len(os.path.abspath(folder))
                if best and depth > best[0][0]:
                    best = []
                if not best or depth == best[0][0]:
                    best.append((depth, other, goal))
    found: list[tuple[Path, str]] = []
    for _, other, goal in best:
        if all(other != seen for seen, _ in found):  # a recipe whose export_dir is its output_dir counts once
            found.append((other, goal))
    here = recipe_path.parent.resolve()
    for preferred in ([(o, g) for o, g in found if o.parent.resolve() == here],
                      [(o, g) for o, g in found if o.stem == recipe_path.stem]):
        if len(preferred) == 1:
            return preferred
    return found


def producer(recipe_path: Path, path: str) -> tuple[Path, str] | None:
    """The one recipe producers() names for `path`, or None; of several, the first (a recipe that reaches a
    command past validate and deps with several is told which by the rule, not here)."""
    found = producers(recipe_path, path)
    return found[0] if found else None


def export_dir_sharers(recipe_path: Path, export_dir: str) -> list[Path]:
    """The recipes in scope whose export_dir is `export_dir`, or holds it, or lies inside it: export replaces the
    folder as a whole, so each would delete the other's model, and make, which counts each recipe's own stamp, could
    hand a recipe that starts from the folder the other's newer export."""
    return [other for other in _recipes(recipe_path)
            if (theirs := _export_dir(other)) and (_inside(theirs, export_dir) or _inside(export_dir, theirs))]
