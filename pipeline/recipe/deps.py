"""`deps`: what a recipe depends on, as `NAME=value` lines the Makefile reads.

    RECIPE_FILES=<the recipe and every file it extends>   (editing any of them makes the stages stale)
    OUTPUT_DIR=<output_dir>
    DATASET_DIR=<dataset_dir>
    DATASETS=<dataset names, space separated>
    DATA_FILES=<the local files those datasets (and eval_dataset) read, per dataset_info.json's file_name>
    STAGE=<pt|sft|dpo|kto|rm|ppo>
    EXPORT_DIR=<export_dir, or empty: `make export` then refuses the recipe before making its upstreams>
    BENCHMARK=<task (LLaMA-Factory's eval recipe: `make eval` runs the benchmark, no data / train / merge), or empty>
    BENCHMARK_FILES=<the files of the task's folder, task_dir/<name>/ (editing them makes `make eval` stale)>
    NO_TRAIN=<y for do_train: false (an eval recipe: `make eval` runs data, validate, eval; no train, no merge), or empty>
    CHECKPOINT_FILES=<the files of a run's checkpoint-<step> it starts from, used as it is (no upstream): a run trained
        again, which replaces the step, makes train, eval and export stale>
    UPSTREAMS=<recipe:goal ...: every recipe in scope that writes a model this one starts from>
    UPSTREAM=<the first of them (the one holding model_name_or_path, else the adapter, else ref_model), or empty>
    UPSTREAM_GOAL=<its goal>
    SCOPE_FOLDERS=<the folders searched for those recipes, each with a trailing />

A recipe starts from the paths in UPSTREAM_KEYS: model_name_or_path, adapter_name_or_path, (stages dpo / kto)
ref_model and ref_model_adapters, and (stage ppo) reward_model.
The recipe in scope (pipeline.recipe.siblings: its folder and the working tree) that writes such a path is its
upstream, with the make goal that writes it: train for its
output_dir, merge for its output_dir/merged (or, when it trains, its export_dir: merge writes there), export for
the export_dir of a recipe that names no dataset (a LLaMA-Factory merge recipe: `make export`). UPSTREAM and
UPSTREAM_GOAL are kept for readers of the one-upstream format. The Makefile makes deps.mk again when a YAML file
of SCOPE_FOLDERS is edited or a name in one of those folders is added, removed or renamed, so a recipe written later
into one of them, or into a folder created in one of them, is seen.

The same chain gives a chained recipe its tokenizer before the upstream has run (tokenizer_source).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Mapping

from pipeline.data.choice_tasks import parse_task  # the rule eval reads the folder by (rules refuse another name)
from pipeline.errors import UserError
from pipeline.recipe import Resolved
from pipeline.recipe.siblings import (UPSTREAM_KEYS, producer, producers, recipe_value, run_checkpoint, scanned,
                                      unsaved_step, upstream_paths)

_GOAL_ORDER = ("train", "merge", "export")  # merge runs train first: of two goals of one recipe, the later one


def upstreams(r: Resolved) -> list[tuple[str, str]]:
    """(recipe, make goal) for every recipe in scope that writes a model it starts from, in UPSTREAM_KEYS
    order, each recipe once (with the later of its goals: merge includes train). A cycle (two recipes each
    starting from the other's output) is a UserError: make would call itself forever. A path several recipes write
    names none: upstream_has_one_producer refuses it while it is not there, and once it is, the model there is used
    as it is."""
    goals: dict[str, str] = {}
    for path in upstream_paths(r):
        found = _upstream(r.recipe_path, path)
        if found is not None:
            recipe, goal = str(found[0]), found[1]
            goals[recipe] = max(goals.get(recipe, goal), goal, key=_GOAL_ORDER.index)
    _refuse_cycle(r.recipe_path, [Path(recipe) for recipe in goals])
    return list(goals.items())


def _upstream(recipe_path: Path, path: str) -> tuple[Path, str] | None:
    """The one recipe in scope that writes `path`, with its goal, for make to build first; None when none does, when
    several do (upstream_has_one_producer), or when `path` is one of its run's checkpoint-<step> folders (or inside
    one) and is there. Such a checkpoint is a step the user chose from a run that went on past it (LLaMA-Factory's
    examples/merge_lora name saves/x/checkpoint-500): it is used as it is. Chained to the training recipe, an edit
    of that recipe (max_steps raised, a learning rate tried) made `make export` retrain the run from scratch, which
    removes the step chosen and writes another model under its name. A missing one is chained where the recipe's
    keys save that step (siblings.unsaved_step): train writes it; else the command names the missing folder and why
    (pipeline.recipe.rules.model.written_by) rather than make training a run that cannot give it."""
    found = producers(recipe_path, path)
    if len(found) != 1:
        return None
    recipe, goal = found[0]
    step = run_checkpoint(path, recipe) if goal == "train" else None
    return None if step is not None and (os.path.exists(path) or unsaved_step(recipe, step)) else found[0]


def checkpoint_files(r: Resolved) -> list[str]:
    """The files of each run's checkpoint-<step> the recipe starts from (_upstream: used as it is, not chained): it
    has no stamp of its own, so its files are make's prerequisites instead. Without them, after its run was trained
    again (checkpoint-<step> replaced), `make export` said nothing to be done and export_dir kept the merge of a step
    the run no longer holds. [] while it is missing (then it is chained, or refused)."""
    files: list[str] = []
    for path in upstream_paths(r):
        found = producers(r.recipe_path, path)
        if len(found) == 1 and found[0][1] == "train" and run_checkpoint(path, found[0][0]) is not None:
            files += [f for f in nameable_files(Path(path)) if f not in files]
    return files


def _refuse_cycle(recipe_path: Path, first: list[Path]) -> None:
    """Follows the upstreams of `first` (read off the recipes in scope without validating them); reaching
    `recipe_path` again is a cycle."""
    me, seen = recipe_path.resolve(), set()

    def visit(recipe: Path, trail: list[Path]) -> None:
        if recipe.resolve() == me:
            raise UserError(f"{recipe_path}: its upstream recipes lead back to it ({' -> '.join(map(str, trail))}: "
                            "each starts from the next one's output), so none can be built first; point one of "
                            "them (model_name_or_path, adapter_name_or_path, ref_model, ref_model_adapters or reward_model) at a "
                            "checkpoint, hub id or preset instead")
        if recipe.resolve() in seen:
            return
        seen.add(recipe.resolve())
        values = {key: recipe_value(recipe, key) for key in (*UPSTREAM_KEYS, "stage", "reward_model_type")}
        for path in upstream_paths(values):
            found = _upstream(recipe, path)
            if found is not None:  # as upstreams() follows them
                visit(found[0], [*trail, found[0]])

    for recipe in first:
        visit(recipe, [recipe_path, recipe])


def tokenizer_source(r: Mapping[str, Any]) -> str | None:
    """Where a resolved recipe's tokenizer comes from (pipeline.recipe.args.data_args records it in DataArgs).

    tokenizer_name_or_path when set, else model_name_or_path. A model that another recipe in scope has
    still to produce (its output_dir/merged or model/: a chained recipe checked before the upstream ran) has
    the upstream's tokenizer, since merge and the full-run export copy their base's tokenizer files (merge's
    with the template's end of answer as EOS: token statistics may differ by that token): the
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
        found += [path for path in nameable_files(folder / entry["file_name"]) if path not in found]
    return found


def nameable_files(path: Path) -> list[str]:
    """The files at `path` (a file, or a folder's files at any depth, sorted) that make can name as prerequisites:
    one with a space, a colon or another character make reads as its own is left out. [] for a missing path."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return [str(p) for p in files if not _MAKE_UNSAFE & set(str(p))]


def benchmark_files(r: Mapping[str, Any]) -> list[str]:
    """The files of a benchmark recipe's task folder (task_dir/<name of mmlu_test>/, LLaMA-Factory's layout), so
    that `make eval` runs again when they change; none for another recipe, or while the folder is missing (validate
    and eval then say so, naming the folder)."""
    if not r["task"]:
        return []
    return nameable_files(Path(r["task_dir"]) / parse_task(r["task"])[0])


def lines(r: Resolved) -> list[str]:
    found = upstreams(r)
    folders = [f"{folder}/" for folder in scanned(r.recipe_path)[1] if not _MAKE_UNSAFE & set(str(folder))]
    return [
        f"RECIPE_FILES={' '.join(r.files)}",
        f"OUTPUT_DIR={r['output_dir']}",
        f"DATASET_DIR={r['dataset_dir']}",
        f"DATASETS={' '.join(r['dataset'] or [])}",  # none: an export recipe
        f"DATA_FILES={' '.join(data_files(r))}",
        f"STAGE={r['stage']}",
        f"EXPORT_DIR={r['export_dir'] or ''}",
        f"BENCHMARK={r['task'] or ''}",
        f"BENCHMARK_FILES={' '.join(benchmark_files(r))}",
        f"NO_TRAIN={'' if r['do_train'] else 'y'}",
        f"CHECKPOINT_FILES={' '.join(checkpoint_files(r))}",
        f"UPSTREAMS={' '.join(f'{recipe}:{goal}' for recipe, goal in found)}",
        f"UPSTREAM={found[0][0] if found else ''}",
        f"UPSTREAM_GOAL={found[0][1] if found else ''}",
        f"SCOPE_FOLDERS={' '.join(folders)}",
    ]


def run(r: Resolved, args: argparse.Namespace | None = None) -> int:
    print("\n".join(lines(r)))
    return 0
