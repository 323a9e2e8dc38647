"""Rules on the data: dataset and eval_dataset registered and listed once, dataset_dir's forms, val_size against
the built row counts and against an evaluation to run, the interleave mix (mix_strategy, interleave_probs), and
streaming (refused). Whether the training split fills a batch is training.py's enough_batches.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from pipeline.data.args import LLAMAFACTORY_DATASET_DIR, ROW_FORMS, data_form
from pipeline.errors import did_you_mean
from pipeline.names import trains_adapter
from pipeline.recipe.check import show
from pipeline.recipe.load import Origin
from pipeline.recipe.rules.core import READS_BUILT_DATA, Context, rebuilt_first, rule


def _registry(ctx: Context, folder: str | None = None) -> dict[str, Any] | None:
    path = Path(folder or ctx.values["dataset_dir"]) / "dataset_info.json"
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None  # missing or broken: `build` and `validate` report the registry itself
    return data if isinstance(data, dict) else None


@rule("dataset_dir")
def hub_dataset_dir(ctx: Context) -> list[tuple[str, str]]:
    """LLaMA-Factory's two dataset_dir forms that are not folders (its train_lora/qwen3_lora_sft_ray.yaml uses
    REMOTE:): said here, at the recipe's line, rather than "not a folder" once the registry is read."""
    given = ctx.values["dataset_dir"]
    if given.startswith("REMOTE:"):
        repo, local = given[len("REMOTE:"):], "data_remote"
        return [("dataset_dir", f"given {given!r}: LLaMA-Factory's REMOTE:<repo> reads dataset_info.json from a "
                                "hub dataset repository; here dataset_dir is a local folder. Download the repository "
                                f"(`hf download --repo-type dataset {repo} --local-dir {local}`) and set "
                                f"dataset_dir: {local}")]
    if given == "ONLINE":
        return [("dataset_dir", "given 'ONLINE': LLaMA-Factory's ONLINE (every dataset name is a hub repository) "
                                "is not supported; register each one with hf_hub_url in a dataset_info.json "
                                "(docs/datasets.md) and set dataset_dir to its folder")]
    return []


@rule("dataset", "eval_dataset", "dataset_dir")
def datasets_registered(ctx: Context) -> list[tuple[str, str]]:
    registry = _registry(ctx)
    if registry is None:
        return []
    problems = []
    where = os.path.join(ctx.values["dataset_dir"], "dataset_info.json")
    elsewhere = _llamafactory_registry(ctx)
    for key in ("dataset", "eval_dataset"):
        # one message per key: LLaMA-Factory's examples name two datasets (identity,alpaca_en_demo), and a message
        # per name repeated the list of known names and the one fix, dataset_dir, twice
        missing = [name for name in ctx.values[key] or [] if name not in registry]
        if not missing:
            continue
        one, theirs = len(missing) == 1, [name for name in missing if name in elsewhere]
        if one:
            said = f"dataset {missing[0]!r} is not in {where}{did_you_mean(missing[0], registry)}"
        else:
            named = ", ".join(f"{name!r}{did_you_mean(name, registry)}" for name in missing)
            said = f"datasets {named} are not in {where}"
        has = ("it" if one else "them") if theirs == missing else ", ".join(map(repr, theirs))
        fix = (f"; {LLAMAFACTORY_DATASET_DIR}/dataset_info.json (LLaMA-Factory's data/ folder) has {has}: add "
               f"`dataset_dir: {LLAMAFACTORY_DATASET_DIR}` to the recipe") if theirs else ""
        problems.append((key, f"{said}; known: {', '.join(sorted(registry)) or 'none'}{fix}"))
    return problems


def _llamafactory_registry(ctx: Context) -> dict[str, Any]:
    """LLaMA-Factory's data/ registry, when dataset_dir was left at its default and another folder was used: a user
    who copied LLaMA-Factory's data/ into this repository, whose datasets/ holds the demo's registry, gets the fix
    instead of a list of demo names (resolve takes data/ by itself only where datasets/ has no registry)."""
    if ctx.origins["dataset_dir"].kind != "default" or ctx.values["dataset_dir"] == LLAMAFACTORY_DATASET_DIR:
        return {}
    return _registry(ctx, LLAMAFACTORY_DATASET_DIR) or {}


@rule("dataset", "eval_dataset")
def datasets_listed_once(ctx: Context) -> list[tuple[str, str]]:
    """A name twice in `dataset` (or `eval_dataset`): LLaMA-Factory keys the loaded datasets by name, so it reads
    the dataset once (and mixes nothing), while the built splits here would be read twice, and an interleave
    mix_strategy would count two datasets in plan and interleave_probs but read one. Said rather than guessed."""
    problems = []
    for key in ("dataset", "eval_dataset"):
        names = ctx.values[key] or []
        repeated = [name for name in dict.fromkeys(names) if names.count(name) > 1]
        hint = (" To weight a dataset, set mix_strategy interleave_under / interleave_over with interleave_probs, "
                "or register a copy under a second name in dataset_info.json") if key == "dataset" else ""
        if repeated:
            problems.append((key, f"given {', '.join(names)}: {', '.join(map(repr, repeated))} listed more than "
                                  f"once; expected each dataset once (LLaMA-Factory reads a repeated name once).{hint}"))
    return problems


@rule("val_size", "dataset", "dataset_dir", "stage", "overwrite_cache", commands=READS_BUILT_DATA)
def val_size_fits_data(ctx: Context) -> list[tuple[str, str]]:
    """Against the built row counts: a val_size that holds out none (a fraction too small) or all of a dataset."""
    if data_form(ctx.values["stage"]) not in ROW_FORMS or rebuilt_first(ctx):
        return []
    from pipeline.data.built import built_dir, held_out, read_manifest, row_count

    problems = []
    size = ctx.values["val_size"]
    count = row_count(size) is not None
    for name in ctx.values["dataset"] or []:
        manifest = read_manifest(built_dir(ctx.values["dataset_dir"], name))
        rows = manifest.get("rows_kept") if manifest else None
        if not isinstance(rows, int) or rows <= 0 or size == 0:  # 0: no validation split, by request
            continue
        n_val = held_out(size, rows)  # as the build splits (pipeline.data.build.split_rows)
        if n_val < 1:
            problems.append(("val_size", f"given {size}, but dataset {name!r} has {rows} rows: the validation "
                                         f"split would be empty (needs val_size >= {1 / rows:.3g}, or a number "
                                         "of rows such as 1; 0 for no validation split)"))
        elif rows - n_val < 1:
            problems.append(("val_size", f"given {size}, but dataset {name!r} has {rows} rows: nothing would "
                                         "be left to train on; lower val_size"
                                         + (f" (at most {rows - 1} rows)" if count and rows > 1 else "")))
    return problems


def _ppo_policy(ctx: Context) -> str:
    """Where an sft recipe finds a ppo run's tuned policy: a LoRA or OFT policy is an adapter (adapter_name_or_path, as
    LLaMA-Factory's); a full / freeze one is output_dir/model (or its merged/), which an sft recipe of that
    finetuning_type with the same output_dir evaluates as its tuned model."""
    kind = ctx.values["finetuning_type"]
    if trains_adapter(kind):
        return "adapter with an sft recipe whose adapter_name_or_path is this run's output_dir"
    return (f"{kind} policy (output_dir/model) with an sft recipe of finetuning_type {kind} whose output_dir is this "
            "run's")


VAL_SIZE = "0.1"  # the val_size a message suggests where 0 leaves nothing to evaluate


def evaluates_other_datasets(values: Mapping[str, Any]) -> bool:
    """Whether eval_dataset names a dataset `dataset` does not train on: the val split is then not only what val_size
    holds out (pipeline.data.load.split_parts evaluates such a dataset whole)."""
    trained = set(values["dataset"] or [])
    return any(name not in trained for name in values["eval_dataset"] or [])


def asked_evaluation(values: Mapping[str, Any], origins: Mapping[str, Origin]) -> list[str]:
    """The keys the recipe or the command line sets that ask for an evaluation (during training, at its end, or after
    it): with none, a run evaluates only at its end, and only where it holds rows out."""
    return [key for key in ("eval_strategy", "eval_steps", "do_eval", "do_predict")
            if origins[key].kind in ("file", "cli") and values[key] not in (None, False, "no")]


@rule("val_size", "dataset", "eval_dataset", "do_eval", "do_predict", "eval_strategy", "eval_steps", "stage",
      "finetuning_type", commands=("train", "eval", "plan", "validate", None))
def val_size_zero_evaluates_nothing(ctx: Context) -> list[tuple[str, str]]:
    """val_size 0 holds out no rows; unless eval_dataset names a dataset not trained on, a run that asks for an
    evaluation would find nothing to evaluate (LLaMA-Factory's Trainer fails there, mid-run). Stage ppo holds out
    nothing and refuses val_size and eval_dataset (LLaMA-Factory's PPO evaluates nothing): its `eval` is pointed at
    an sft recipe on the tuned policy instead of at keys it would refuse."""
    if ctx.values["val_size"] != 0:
        return []
    if ctx.values["stage"] == "ppo" and ctx.command == "eval":
        return [("stage", f"ppo evaluates nothing (as in LLaMA-Factory): evaluate the tuned {_ppo_policy(ctx)} and "
                          "whose dataset holds out rows (val_size), e.g. `python -m pipeline eval sft.yaml` "
                          "(docs/ppo.md)")]
    if evaluates_other_datasets(ctx.values):
        return []
    asked = asked_evaluation(ctx.values, ctx.origins)
    if ctx.command == "eval":
        asked = ["the eval command"]
    if not asked:
        return []
    # the command the user ran, with the value: make rebuilds the data when ARGS change (the Makefile's args stamp);
    # the python -m form builds first, as train refuses data built with another val_size
    again = ctx.run_after_build(ctx.command or "data", val_size=VAL_SIZE)
    return [("val_size", f"given 0: no validation split, and no eval_dataset names a dataset outside `dataset`, "
                         f"so {' and '.join(asked)} would have nothing to evaluate; set val_size (a fraction such "
                         f"as {VAL_SIZE}, or a number of rows), e.g. {again}, or name an eval_dataset")]


@rule("mix_strategy", "interleave_probs", "dataset", "eval_dataset")
def interleave_probs_valid(ctx: Context) -> list[tuple[str, str]]:
    """interleave_probs only with an interleave mix_strategy (LLaMA-Factory refuses it with concat), one number per
    dataset, and per eval_dataset (mixed with them too; LLaMA-Factory's data_args checks both counts), that numpy
    can sample by (pipeline.data.mix.probs_problem): what LLaMA-Factory finds only when the mix is drawn, after the
    datasets are loaded, is found here before anything runs."""
    from pipeline.data.mix import parse_probs, probs_problem

    strategy, probs = ctx.values["mix_strategy"], ctx.values["interleave_probs"]
    if probs is None:
        return []
    if strategy == "concat":
        return [("interleave_probs", f"given {show(probs)}, but it only applies to an interleave mix_strategy "
                                     "(interleave_under, interleave_over, interleave_once); remove it, or set "
                                     "mix_strategy")]
    try:
        parsed = parse_probs(probs)
    except ValueError as err:
        return [("interleave_probs", f"given {show(probs)}: {err}; expected one probability per dataset, e.g. "
                                     "0.7,0.3 (numbers of 0 or more that sum to 1)")]
    problems = [probs_problem(parsed, len(ctx.values[key]), strategy, key) if ctx.values[key] else None
                for key in ("dataset", "eval_dataset")]
    return [("interleave_probs", f"given {show(probs)}: {problem}") for problem in dict.fromkeys(problems) if problem]


@rule("mix_strategy", "dataset", "eval_dataset", "val_size")
def interleaved_eval_datasets_have_rows(ctx: Context) -> list[tuple[str, str]]:
    """Several eval_datasets under an interleave mix_strategy are interleaved (pipeline.data.load.interleaved); one
    that `dataset` trains on gives its val split alone, empty with val_size 0. HF's interleave_datasets, which
    LLaMA-Factory calls, fails or returns no row with an empty dataset: said before anything runs."""
    values = ctx.values
    evals, trained = values["eval_dataset"] or [], values["dataset"] or []
    if values["mix_strategy"] == "concat" or len(evals) < 2 or values["val_size"] != 0:
        return []
    return [("eval_dataset", f"names {name!r}, which `dataset` trains on, so only its val split is evaluated, and "
                             f"val_size 0 holds none of its rows out: mix_strategy {values['mix_strategy']} would "
                             "interleave an empty dataset into the evaluation; set val_size, or drop it from "
                             "eval_dataset") for name in evals if name in trained]


@rule("streaming")
def refused_streaming(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["streaming"]:
        return [("streaming", "true iterates the raw data lazily during training, which is not implemented: "
                              "here `build` converts each dataset once and training reads the built JSON; "
                              "remove the key (preprocessing_num_workers speeds up a large build)")]
    return []
