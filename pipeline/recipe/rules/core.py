"""The machinery every rule module shares: the `rule` decorator, the Context a rule reads, the command lists.

A rule is declared here (`@rule(keys..., commands=...)`) and runs once pipeline.recipe.rules.ORDER lists it; what a
rule checks lives in its theme's module, never here.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from pipeline.recipe.load import Origin
from pipeline.recipe.typed import cli_texts, command_options

RUNS_HERE = ("train", "eval", "generate", "merge", "inspect", "validate", None)  # commands that run on this machine
# Commands checked against the built row counts. Not `build`, which replaces those counts (a user told to "add
# data" must be able to rebuild), nor `deps`, which only names files for make (and runs first in `make data`).
READS_BUILT_DATA = ("validate", "inspect", "plan", "train", "merge", "export", "eval", "generate", "chat", None)


def cuda_available() -> bool:
    """Whether this machine has an NVIDIA GPU, without importing torch. Callers look it up here when they run
    (`core.cuda_available()`), so tests stub it in one place: rules.core.cuda_available."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def rebuilt_first(ctx: "Context") -> bool:
    """train and eval with overwrite_cache: true build first (pipeline.__main__.steps), so the counts on disk may be
    those of the build about to be replaced: they are checked when the recipe is resolved again after that build
    (`built`), before the model loads."""
    return bool(ctx.values["overwrite_cache"]) and ctx.command in ("train", "eval") and not ctx.built


@dataclass
class Context:
    values: Mapping[str, Any]
    origins: Mapping[str, Origin]
    recipe_file: str
    command: str | None
    built: bool = False  # the build that overwrite_cache asks for has run (see rebuilt_first)

    def where(self, key: str) -> str:
        """`file:line:col: key` when the user set it (or the value derived from theirs, load.Origin.derived), else
        `recipe: key`."""
        origin = self.origins.get(key)
        if origin is not None and origin.kind in ("file", "cli"):
            return f"{origin.where}: {key}"
        if origin is not None and origin.kind == "derived" and origin.file:
            return f"{origin.file}:{origin.line}:{origin.column}: {key}"
        return f"{self.recipe_file}: {key}"

    def given(self, key: str, value: Any = None) -> str:
        """How a message names `key`'s value (`value`: one shown in its place, in JSON): "given 8" when the user set
        it, else "8 (the default)" / "8 (derived)": a value the recipe leaves out was never given."""
        shown = json.dumps(self.values[key] if value is None else value)
        kind = {"default": "the default", "derived": "derived"}.get(self.origins[key].kind)
        return f"{shown} ({kind})" if kind else f"given {shown}"

    def set_here(self, key: str) -> bool:
        """Set in the recipe itself or on the command line (not inherited through extends)."""
        origin = self.origins[key]
        return origin.kind == "cli" or (origin.kind == "file" and origin.file == self.recipe_file)

    def run_this(self, goal: str, **changed: str) -> str:
        """pipeline.rerun.run_this for this recipe as the user named it and the overrides they typed, the keys of
        `changed` set to the value the message suggests (rerun.with_values): a rule's fix as a command to run."""
        from pipeline.rerun import run_this, with_values

        return run_this(goal, self.recipe_file, with_values(cli_texts(self.origins.values()), **changed),
                        **command_options(goal, self.recipe_file, self.values))

    def run_after_build(self, goal: str, **changed: str) -> str:
        """run_this for a fix that changes a build key (val_size): where make reads no pipeline Makefile, the build
        with those values first (rerun.run_after_build), since `python -m pipeline train` refuses the data built
        before."""
        from pipeline.rerun import run_after_build, with_values

        return run_after_build(goal, self.recipe_file, with_values(cli_texts(self.origins.values()), **changed),
                               **command_options(goal, self.recipe_file, self.values))

    def sort_key(self, key: str) -> tuple:
        origin = self.origins.get(key)
        if origin is not None and origin.kind in ("file", "derived") and origin.file:
            return (0, origin.file, origin.line, origin.column)
        return (1, "", 0, 0)


@dataclass(frozen=True)
class Rule:
    func: Callable[[Context], list[tuple[str, str]]]  # -> [(key the message is about, message)]
    keys: tuple[str, ...]
    commands: tuple[str | None, ...] | None


_DECLARED: dict[Callable[[Context], list[tuple[str, str]]], Rule] = {}


def rule(*keys: str, commands: tuple[str | None, ...] | None = None):
    """Declare a rule that reads `keys` (skipped when one of them failed the schema) and runs for `commands` (None:
    every command)."""
    def register(func: Callable[[Context], list[tuple[str, str]]]):
        _DECLARED[func] = Rule(func, keys, commands)
        return func
    return register


def in_order(funcs: Iterable[Callable[[Context], list[tuple[str, str]]]]) -> list[Rule]:
    """The declared rules in the order `funcs` gives. Every declared rule must be listed exactly once: one left out
    would never run, without a word."""
    funcs = list(funcs)
    left_out = [f"{f.__module__}.{f.__name__}" for f in _DECLARED if f not in funcs]
    twice = {f.__name__ for f in funcs if funcs.count(f) > 1}
    undeclared = [f.__name__ for f in funcs if f not in _DECLARED]
    if left_out or twice or undeclared:
        raise RuntimeError(f"pipeline.recipe.rules.ORDER must list each rule once: left out {left_out}, listed twice "
                           f"{sorted(twice)}, not declared with @rule {undeclared}")
    return [_DECLARED[f] for f in funcs]
