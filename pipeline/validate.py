"""`validate`: the recipe (already checked by resolve) and the built data, as one report. Never imports torch."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from pipeline.data.args import DataArgs
from pipeline.data.check import check_built, format_summary
from pipeline.errors import did_you_mean
from pipeline.recipe import Resolved
from pipeline.recipe.args import data_args


def run(r: Resolved, args: argparse.Namespace | None = None) -> int:
    files = ", ".join(r.files)
    if r["task"] is not None:
        return validate_benchmark(r)
    print(f"recipe: OK ({files}; stage {r['stage']}, {r['finetuning_type']}, model {r['model_name_or_path']}, "
          f"dataset {', '.join(r['dataset'])})")
    data = data_args(r)
    checked = check_built(data)  # raises UserError listing every bad row
    tokenized = apply_length_policy(r, data)
    print("data: OK")
    for line in checked.warnings:
        print(line, file=sys.stderr)
    print(format_summary(checked.summary))
    if tokenized:
        from pipeline.data.loaders import dropped_note

        if (dropped := dropped_note(data)):  # train's words too (pipeline.train.run.print_plan)
            print(dropped)
    missing = missing_model_note(r)
    untokenized = bool(checked.summary) and all(row["tokens_min"] is None for row in checked.summary)
    if missing:
        print(missing + (" (token lengths are left out)" if untokenized else ""))
    elif untokenized:
        from pipeline.model.hub import cache_dir, cached_suggestion, offline

        model = str(r["model_name_or_path"])
        how = (f"HF_HUB_OFFLINE=1 here, so train will refuse it: `hf download {model}` on a machine with network into "
               "this cache, or unset HF_HUB_OFFLINE" if offline()  # train downloads nothing then (model.hub)
               else "a hub id is downloaded by train, or beforehand with `hf download`")
        print(f"note: token lengths need the tokenizer of {model}, which is not on this machine yet "
              f"({how}){cached_suggestion(model, cache_dir())}")
    return 0


def validate_benchmark(r: Resolved) -> int:
    """A benchmark recipe (eval with task: no dataset, nothing trained): the recipe, then its task folder read as eval
    reads it (a missing folder, mapping.json or subject file, a malformed CSV: eval's message, exit 2), before any
    model loads. The prompts' lengths against the model's context are eval's check (they need the model's config)."""
    from pipeline.recipe.benchmark import read_benchmark, summary

    print(f"recipe: OK ({', '.join(r.files)}; eval with task {r['task']}, model {r['model_name_or_path']}"
          f"{f' + adapter {a}' if (a := r['adapter_name_or_path']) else ''}, template {r['template']})")
    task = read_benchmark(r)
    print(f"task: OK ({summary(task, int(r['n_shot']))})")
    missing = missing_model_note(r)
    if missing:
        print(missing)
    from pipeline.recipe.typed import run_this_for

    print(f"eval runs it: {run_this_for('eval', r)}; {run_this_for('plan', r)} says how")
    return 0


def apply_length_policy(r: Resolved, data: DataArgs) -> bool:
    """The trainer's own length pass over the whole built data, so that validate refuses what train would, with
    train's message: rows over cutoff_len under overlength_policy: error, or a train split left without examples
    (or without one batch, or without one optimizer step: LLaMA-Factory's dpo / kto examples at a small max_samples
    passed validate and stopped at train) once the policy dropped its long rows, or a val split whose held-out rows
    give the run's evaluation nothing (LLaMA-Factory's pt example at max_samples 16: too little text for a window).
    check_built only samples token lengths. Skipped when the tokenizer is not on this machine yet (train reports it
    then): False."""
    from pipeline.data.loaders import count_examples
    from pipeline.recipe.evaluation import val_split_used
    from pipeline.recipe.exact import counted_steps

    counted = counted_steps(r, data)  # the micro-batches per rank train counts, which its refusal names
    if counted is None:
        return False
    if r["do_train"]:
        val_split_used(counted)  # held-out rows that give the run's evaluation nothing: train's refusal
    count_examples(data)  # the val split too: train counts it before it builds its loader
    return True


def missing_model_note(r: Resolved) -> str:
    """A note when model_name_or_path is a path (not a preset, not an `org/name` hub id, or one that reads as local,
    pipeline.model.hub.looks_local, and is not in the hub cache) that does not exist and that no recipe in
    scope (pipeline.recipe.siblings) produces: validate lets a missing model pass (an upstream run may make it), but
    train refuses this one, and calling it a hub id that train downloads would be wrong. "" otherwise: a cached
    `Qwen/Qwen3-0.6B` is what train loads even where a Qwen/ folder sits beside the recipe."""
    from pipeline.model.config import PRESETS
    from pipeline.model.hub import is_hub_id, local_only, looks_local
    from pipeline.recipe.siblings import producer

    model = str(r["model_name_or_path"])
    path = Path(model).expanduser()
    if model in PRESETS or (is_hub_id(model) and (not looks_local(model) or cached(model))) or path.exists() or \
            producer(r.recipe_path, model):
        return ""
    hint = near_model(model) or near_run_folder(r.recipe_path, model)
    if not hint and model.startswith("./") and is_hub_id(model[2:]):
        hint = f" (a hub id is written without './': {model[2:]})"
    under = f"it reads as a local path (under {model.split('/')[0]}/)"  # saves/, models/: never asked of the hub
    what = ("it is a path, not a hub id (org/name), so train will refuse it" if not is_hub_id(model) else
            f"{under}, so train will refuse it" if local_only(model) else
            f"{under} and is not in the hub cache, so train downloads it if it is a hub id and otherwise refuses it")
    return (f"note: model_name_or_path: directory '{model}' does not exist{hint}, and no recipe in its folder or "
            f"under the working directory produces it; {what}: fix the path, or run the recipe that writes it first")


def cached(model: str) -> bool:
    """Whether the hub id `model` is in the hub cache (what train loads then, with no network): resolve_model_path
    without a download, the one place that reads the cache."""
    from pipeline.errors import UserError
    from pipeline.model.hub import resolve_model_path

    try:
        resolve_model_path(model, download=False)
    except UserError:
        return False
    return True


def near_run_folder(recipe_path: Path, model: str) -> str:
    """' (did you mean X?)' for a path one slip from a folder that a run in scope writes in its output_dir
    (saves/demo_pt/modle -> saves/demo_pt/model before the demo's pt has run, when near_model finds no folder on
    disk), or ''."""
    from pipeline.names import RUN_FOLDERS
    from pipeline.recipe.siblings import producer

    parent, name = os.path.split(model.rstrip("/"))
    if not parent:
        return ""
    written = [folder for folder in RUN_FOLDERS if producer(recipe_path, os.path.join(parent, folder))]
    return did_you_mean(name, written, show=lambda folder: os.path.join(parent, folder))


def near_model(model: str) -> str:
    """' (did you mean X?)' for a missing model path, or '': X is a folder holding a config.json one folder name away,
    at the first folder of the path that is not there: a sibling of the model folder ('models/gpt' -> 'models/gpt2'),
    or an ancestor's ('saves/dmeo_pt/model' -> 'saves/demo_pt/model', the README's demo with one slip). Only names
    are compared, never whole paths (a model under /tmp got 'did you mean /tmp/.../tmp'), and only model folders
    are offered."""
    parts = model.split("/")
    parts[0] = parts[0] or "/"  # an absolute path keeps its root
    missing = next((i for i in range(1, len(parts) + 1) if not Path(*parts[:i]).expanduser().exists()), None)
    if missing is None:
        return ""
    head, rest = Path(*parts[:missing - 1]).expanduser() if missing > 1 else Path("."), parts[missing:]
    names = [p.name for p in head.iterdir() if (p.joinpath(*rest) / "config.json").is_file()] if head.is_dir() else []
    return did_you_mean(parts[missing - 1], names, show=lambda name: os.path.join(*parts[:missing - 1], name, *rest))
