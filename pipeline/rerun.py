"""The command a message tells the user to run: `make GOAL RECIPE=... ARGS='...'` (python -m pipeline COMMAND ...).

One builder for every "run this" message (the data's rebuild, the training that produces what merge or eval lacks,
the benchmark's eval): it names the recipe as the user named it and carries the command-line overrides they gave. A
bare `make train` trains the Makefile's default recipe, not theirs, and one without the overrides (output_dir=...,
max_steps=40) another run than the one the message is about. make hands ARGS to every stage of the chain.
recipe.typed.run_this_for: the same for a resolved recipe; with_values: the overrides with the value a message
suggests (val_size=0.1 where val_size=0 was typed), so that the command runs the fix rather than the mistake again.
"""
from __future__ import annotations

import shlex
from typing import Sequence

# make goals whose pipeline command is another: its name, then the flags the Makefile gives it after the recipe
COMMANDS = {"data": ("build",), "dry-run": ("train", "--dry-run")}


def run_this(goal: str, recipe: str | None, overrides: Sequence[str] = (), *, ranks: int = 1,
             env: Sequence[str] = ()) -> str:
    """"`make GOAL RECIPE=r ARGS='k=v'` (python -m pipeline COMMAND r k=v)", quoted for a POSIX shell; without a
    recipe (a message that has none at hand) "`make GOAL` (python -m pipeline COMMAND RECIPE)". ranks > 1: `make
    GOAL NPROC=n ...` (python -m pipeline.launch --num_gpus n --module pipeline COMMAND ...), as the Makefile
    launches several ranks; env: VAR=value settings both forms start with (HF_HUB_OFFLINE=0)."""
    command, *flags = COMMANDS.get(goal, (goal,))
    make = [*env, "make", goal, *([f"NPROC={ranks}"] if ranks > 1 else [])]
    python = [*env, "python", "-m", *(["pipeline.launch", "--num_gpus", str(ranks), "--module"] if ranks > 1 else []),
              "pipeline", command]
    if not recipe:
        return f"`{shlex.join(make)}` ({shlex.join([*python, 'RECIPE', *flags])})"
    args = f" ARGS={shlex.quote(shlex.join(overrides))}" if overrides else ""
    return (f"`{shlex.join(make)} RECIPE={shlex.quote(recipe)}{args}` "
            f"({shlex.join([*python, recipe, *flags, *overrides])})")


def key_of(override: str) -> str:
    """The recipe key an override `key=value` sets, as recipe.load.parse_overrides reads it."""
    return override.partition("=")[0].strip()


def with_values(overrides: Sequence[str], **changed: str) -> tuple[str, ...]:
    """The overrides `key=value` as typed, each key of `changed` set to its value instead: in the place where the
    user typed that key, else added at the end."""
    typed = [key_of(text) for text in overrides]
    return (*(f"{key}={changed[key]}" if key in changed else text for text, key in zip(overrides, typed)),
            *(f"{key}={value}" for key, value in changed.items() if key not in typed))
