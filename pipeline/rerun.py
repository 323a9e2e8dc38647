"""The command a message tells the user to run: `make GOAL RECIPE=... ARGS='...'` (python -m pipeline COMMAND ...).

One builder for every "run this" message (the data's rebuild, the training that produces what merge or eval lacks,
the benchmark's eval): it names the recipe as the user named it and carries the command-line overrides they gave. A
bare `make train` trains the Makefile's default recipe, not theirs, and one without the overrides (output_dir=...,
max_steps=40) another run than the one the message is about. make hands ARGS to every stage of the chain.
recipe.args.run_this_for: the same for a resolved recipe.
"""
from __future__ import annotations

import shlex
from typing import Sequence

# make goals whose pipeline command is another: its name, then the flags the Makefile gives it after the recipe
COMMANDS = {"data": ("build",), "dry-run": ("train", "--dry-run")}


def run_this(goal: str, recipe: str | None, overrides: Sequence[str] = ()) -> str:
    """"`make GOAL RECIPE=r ARGS='k=v'` (python -m pipeline COMMAND r k=v)", quoted for a POSIX shell; without a
    recipe (a message that has none at hand) "`make GOAL` (python -m pipeline COMMAND RECIPE)"."""
    command, *flags = COMMANDS.get(goal, (goal,))
    if not recipe:
        return f"`make {goal}` ({shlex.join(['python', '-m', 'pipeline', command, 'RECIPE', *flags])})"
    args = f" ARGS={shlex.quote(shlex.join(overrides))}" if overrides else ""
    typed = shlex.join(["python", "-m", "pipeline", command, recipe, *flags, *overrides])
    return f"`make {goal} RECIPE={shlex.quote(recipe)}{args}` ({typed})"

