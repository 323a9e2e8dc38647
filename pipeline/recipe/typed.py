"""What the user typed, for the commands messages tell them to run: the command line's key=value overrides as typed,
and "run this" for a resolved recipe (pipeline.rerun.run_this: the recipe as the user named it, with those overrides).

A module of its own, importing only the recipe's Origin, pipeline.recipe.started (whether a finished run is there)
and pipeline.rerun, so that every layer that words a message (the recipe's rules, its ds_config notice, the stages)
can name the command without importing the recipe's args.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.recipe.load import Origin
from pipeline.recipe.started import finished_by
from pipeline.rerun import LAUNCHED, run_after_build, run_this, with_values


def cli_texts(origins: Iterable[Origin]) -> tuple[str, ...]:
    """The command line's overrides among `origins`, as typed (Origin.text): what a "run this" message carries, so
    that the command it names runs this run, not the recipe as written."""
    return tuple(o.text for o in origins if o.kind == "cli" and o.text)


def typed_overrides(r: Mapping[str, Any]) -> tuple[str, ...]:
    """The command line's key=value overrides that set the recipe's values, as typed; () for a plain mapping
    (tests)."""
    origin = getattr(r, "origin", None)
    return () if origin is None else cli_texts(origin(key) for key in r)


def finished_here(goal: str, recipe: str | None, values: Mapping[str, Any]) -> bool:
    """Whether the command for `goal` trains a finished run of `recipe` again (rerun.run_this's `finished`: the
    python -m form carries --retrain-finished): a train goal, and the recipe's output_dir (in its resolved `values`)
    holds a finished run of it (recipe.started.finished_by). A run that never trained, or that stopped before its
    end, needs no flag."""
    output_dir = values.get("output_dir")
    return goal == "train" and bool(recipe) and bool(output_dir) and finished_by(Path(str(output_dir)), str(recipe))


def ranks_here(goal: str, values: Mapping[str, Any]) -> int:
    """The ranks the command for `goal` launches (rerun.run_this's `ranks`): for a goal the Makefile launches
    (rerun.LAUNCHED), those of the run a message is about (world_size: WORLD_SIZE, which the launcher sets), so that
    a fix typed as printed runs on the ranks the user launched (`NPROC=2`: without it the fix ran on one, another
    global batch); 1 for the commands that run in one process."""
    return int(values.get("world_size") or 1) if goal in LAUNCHED else 1


def command_options(goal: str, recipe: str | None, values: Mapping[str, Any]) -> dict[str, Any]:
    """rerun.run_this's / run_after_build's `ranks` and `finished` for the command for `goal` about the run of
    `recipe` whose resolved `values` a message has at hand (ranks_here, finished_here): one place for every caller."""
    return {"ranks": ranks_here(goal, values), "finished": finished_here(goal, recipe, values)}


def _recipe_of(r: Mapping[str, Any]) -> str | None:
    path = getattr(r, "recipe_path", None)
    return str(path) if path else None


def run_this_for(goal: str, r: Mapping[str, Any], *, ranks: int | None = None, **changed: str) -> str:
    """pipeline.rerun.run_this for a resolved recipe: its path as the user gave it and its command-line overrides as
    typed (typed_overrides), the keys of `changed` set to the value a message suggests (rerun.with_values), on the
    run's ranks (ranks_here; `ranks`: others, a checkpoint's) and with train's flag for a finished run there."""
    recipe = _recipe_of(r)
    options = command_options(goal, recipe, r) | ({} if ranks is None else {"ranks": ranks})
    return run_this(goal, recipe, with_values(typed_overrides(r), **changed), **options)


def run_after_build_for(goal: str, r: Mapping[str, Any], **changed: str) -> str:
    """pipeline.rerun.run_after_build for a resolved recipe (a fix that changes a build key), as run_this_for."""
    recipe = _recipe_of(r)
    return run_after_build(goal, recipe, with_values(typed_overrides(r), **changed), **command_options(goal, recipe, r))
