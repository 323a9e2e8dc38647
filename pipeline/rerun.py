"""The command a message tells the user to run: `make GOAL RECIPE=... ARGS='...'` (python -m pipeline COMMAND ...).

One builder for every "run this" message (the data's rebuild, the training that produces what merge or eval lacks,
the benchmark's eval): it names the recipe as the user named it and carries the command-line overrides they gave. A
bare `make train` trains the Makefile's default recipe, not theirs, and one without the overrides (output_dir=...,
max_steps=40) another run than the one the message is about. make hands ARGS to every stage of the chain.
recipe.typed.run_this_for: the same for a resolved recipe; with_values: the overrides with the value a message
suggests (val_size=0.1 where val_size=0 was typed), so that the command runs the fix rather than the mistake again.

A recipe's relative paths (output_dir, dataset_dir, the models) are relative to the folder a command runs in, as
LLaMA-Factory's are, and so is the recipe's own name. The make form is given only where it is typed in the folder
of the pipeline's Makefile, which make runs its commands in: typed in recipes/, `make` finds no Makefile, and from
the root `make train RECIPE=x.yaml` names another file (and trains another output_dir) than the command that said it.
Elsewhere the message is the python -m form alone, which means the same run where the user is. A fix that changes
what the data build makes (val_size) is, in the python -m form (alone, or beside make's), the build and then the
command (run_after_build): make's goal rebuilds the data when ARGS change, `python -m pipeline train` refuses a
build made with other settings.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Mapping, Sequence

from pipeline.launched import RANKED, Launch, launch_of

# make goals whose pipeline command is another, or takes flags: its name, then the flags the Makefile gives it after
# the recipe
COMMANDS = {"data": ("build",), "dry-run": ("train", "--dry-run"), "chat": ("generate",)}
# the flag `make train` gives train after the recipe: make trains a finished run of the recipe again once it is stale.
# The python -m form of a message about such a run (merge's refusal of an untrained adapter, a finished run's
# refusal) carries it (`finished`), as without it that command is refused ("holds a finished run"); a run that never
# finished needs it not, and a command that shows it there reads as if something would be thrown away.
RETRAIN = "--retrain-finished"
# the goals the Makefile starts through its launcher on NPROC ranks ($(LAUNCH)): a message about a run on several
# ranks gives these with that rank count (run_this's `ranks`), launched as this run was where it ran on as many
# (pipeline.launched: its hostfile or nodes); the other commands run in one process
LAUNCHED = (*RANKED, *(goal for goal, (command, *_) in COMMANDS.items() if command in RANKED))
# the Makefile's variables that give one goal's command one option, after the recipe and ARGS (ARGS reach every stage
# of a goal's chain, which refuses the option): variable -> (goal, option)
MAKE_VARIABLES = {"NUM": ("inspect", "--num"), "PROMPT": ("chat", "--prompt")}
MAKEFILE = Path(__file__).resolve().parent.parent / "Makefile"  # the pipeline's own, beside the package


def make_runs_here() -> bool:
    """Whether `make` typed in this process's working folder reads the pipeline's Makefile (a link to it counts: a
    checkout's root, or a folder that links it)."""
    try:
        return os.path.samefile("Makefile", MAKEFILE)
    except OSError:
        return False


def run_this(goal: str, recipe: str | None, overrides: Sequence[str] = (), folder: str | None = None, *,
             ranks: int = 1, env: Sequence[str] = (), variables: Mapping[str, str] = {}, finished: bool = False) -> str:
    """"`make GOAL RECIPE=r ARGS='k=v'` (python -m pipeline COMMAND r k=v)", quoted for a POSIX shell, where make runs
    the pipeline's Makefile here (make_runs_here), else "`python -m pipeline COMMAND r k=v`"; without a recipe (a
    message that has none at hand) RECIPE stands for it. folder: the folder the command must be typed in when it is
    not this one (a recorded run started elsewhere, as a path from here): "`cd folder && python -m pipeline ...`".
    ranks > 1: `make GOAL NPROC=n ...` (python -m pipeline.launch --num_gpus n --module pipeline COMMAND ...), as
    the Makefile launches several ranks; env: VAR=value settings both forms start with (HF_HUB_OFFLINE=0);
    variables: MAKE_VARIABLES and their values (NUM=5), `make GOAL ... NUM=5` (python -m pipeline COMMAND ... --num 5);
    finished: a finished run of the recipe is in its output_dir, which the python -m form of train trains again with
    RETRAIN (make's does so itself). Where `ranks` are this run's and pipeline.launch started it
    (pipeline.launched.launch_of), both forms launch it as it was (its options: MASTER_PORT, its hostfile, or its
    nodes as node 0 types them, then the other nodes' NODE_RANK), the python -m form alone where make has no variable for an
    option; a run on several nodes started otherwise is run "as you launched this run"."""
    typed = python_form(goal, recipe, overrides, ranks=ranks, env=env, variables=variables, finished=finished)
    where = launch_note(goal, ranks)
    if folder is not None:
        return f"`cd {shlex.quote(folder)} && {typed}`{where}"
    make = make_form(goal, recipe, overrides, ranks=ranks, env=env, variables=variables)
    if make is None or not make_runs_here():
        return f"`{typed}`{where}"
    return f"{make} ({typed}){where}"


def _launch(goal: str, ranks: int) -> Launch | None:
    """How the command for `goal` on `ranks` ranks is launched: as this run was (launch_of), for a launched goal."""
    return launch_of(ranks) if goal in LAUNCHED else None


def launch_note(goal: str, ranks: int) -> str:
    """What a message adds after the command for `goal` on `ranks` ranks: where it is typed for a job on several
    nodes, or that it is launched as this run was when that launch is unknown (pipeline.launched.Launch.where)."""
    launch = _launch(goal, ranks)
    return launch.where() if launch is not None else ""


def make_form(goal: str, recipe: str | None, overrides: Sequence[str] = (), *, ranks: int = 1,
              env: Sequence[str] = (), variables: Mapping[str, str] = {}) -> str | None:
    """run_this's make form, in backticks: "`make GOAL RECIPE=r ARGS='k=v'`", quoted for a POSIX shell; with this
    run's launch (NPROC=8 HOSTFILE=hf, or its nodes); None where make has no variable for an option of that launch,
    or the launch is unknown."""
    launch = _launch(goal, ranks)
    launched = [f"NPROC={ranks}"] if ranks > 1 else []
    if launch is not None:
        launched = launch.make_variables() if launch.options is not None else None
        if launched is None:
            return None
    make = [*env, "make", goal, *launched]
    settings = "".join(f" {name}={shlex.quote(value)}" for name, value in variables.items())
    if not recipe:
        return f"`{shlex.join(make)}{settings}`"
    args = f" ARGS={shlex.quote(shlex.join(overrides))}" if overrides else ""
    return f"`{shlex.join(make)} RECIPE={shlex.quote(recipe)}{args}{settings}`"


def python_form(goal: str, recipe: str | None, overrides: Sequence[str] = (), *, ranks: int = 1,
                env: Sequence[str] = (), variables: Mapping[str, str] = {}, finished: bool = False) -> str:
    """run_this's python -m form, unquoted: "python -m pipeline COMMAND r k=v", quoted for a POSIX shell; through
    pipeline.launch with this run's launcher options where it has them (pipeline.launched), the bare command where
    that launch is unknown (launch_note says how it is launched)."""
    command, *flags = COMMANDS.get(goal, (goal,))
    flags += [RETRAIN] if goal == "train" and finished else []
    options = [part for name, value in variables.items() for part in (MAKE_VARIABLES[name][1], value)]
    launch = _launch(goal, ranks)
    launcher = ["--num_gpus", str(ranks)] if ranks > 1 and launch is None else None
    if launch is not None and launch.options is not None:
        launcher = list(launch.options)
    python = [*env, "python", "-m", *(["pipeline.launch", *launcher, "--module"] if launcher is not None else []),
              "pipeline", command]
    return shlex.join([*python, *((recipe, *flags, *overrides) if recipe else ("RECIPE", *flags)), *options])


def train_again(recipe: str, overrides: Sequence[str] = (), *, ranks: int = 1) -> str:
    """The command that trains the finished run of `recipe` in its output_dir again now, in backticks: the python -m
    form with RETRAIN, launched as this run was (launch_note). Never make's: `make train` retrains a finished run
    only once the recipe or its ARGS change, and with its train stamp current it says "Nothing to be done" (its
    adapter deleted since, or not)."""
    return f"`{python_form('train', recipe, overrides, ranks=ranks, finished=True)}`{launch_note('train', ranks)}"


def run_after_build(goal: str, recipe: str | None, overrides: Sequence[str] = (), *, ranks: int = 1,
                    finished: bool = False) -> str:
    """run_this for a fix that changes what the data build makes (a build key such as val_size, in `overrides`):
    make's goal rebuilds the data itself when ARGS change (the Makefile's args stamp), but `python -m pipeline
    COMMAND` reads the build as it is and refuses one made with other settings (pipeline.data.load.build_problem:
    "built with other settings than the recipe's"), so its python -m form builds first, alone where make does not
    run the pipeline's Makefile ("`python -m pipeline build r k=v && python -m pipeline COMMAND r k=v`") and beside
    the make form where it does ("`make COMMAND RECIPE=r ARGS=k=v` (python -m pipeline build ... && ...)"); ranks,
    finished: as run_this's (the build runs in one process, make's NPROC launches the goal alone)."""
    if goal == "data":
        return run_this(goal, recipe, overrides)
    command = python_form(goal, recipe, overrides, ranks=ranks, finished=finished)
    both = f"{python_form('data', recipe, overrides)} && {command}"
    where = launch_note(goal, ranks)
    make = make_form(goal, recipe, overrides, ranks=ranks)
    if make is None or not make_runs_here():
        return f"`{both}`{where}"
    return f"{make} ({both}){where}"


def key_of(override: str) -> str:
    """The recipe key an override `key=value` sets, as recipe.load.parse_overrides reads it."""
    return override.partition("=")[0].strip()


def with_values(overrides: Sequence[str], **changed: str) -> tuple[str, ...]:
    """The overrides `key=value` as typed, each key of `changed` set to its value instead: in the place where the
    user typed that key, else added at the end."""
    typed = [key_of(text) for text in overrides]
    return (*(f"{key}={changed[key]}" if key in changed else text for text, key in zip(overrides, typed)),
            *(f"{key}={value}" for key, value in changed.items() if key not in typed))
