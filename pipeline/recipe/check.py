"""Check the merged recipe against the JSON Schema: every problem, each as `file:line:col: key: given X, expected Y`."""
from __future__ import annotations

import math
from typing import Any, Mapping

from pipeline.errors import UserError, did_you_mean
from pipeline.recipe import spec
from pipeline.recipe.load import Entry, Origin, parse_value

# Keys the pipeline computes itself; setting one in a recipe gets a precise answer instead of "unknown key".
DERIVED_KEYS = (
    "world_size", "rank", "local_rank", "total_train_batch_size", "num_train_examples",
    "steps_per_epoch", "total_steps", "num_warmup_steps",
)
# Key names: only a close match is suggested (at 0.6, do_train would suggest stop_strings).
KEY_CUTOFF = 0.75
_YAML11_BOOLS = {"yes", "no", "on", "off", "y", "n"}
_SHOWN_CHARS = 80  # longer strings and lists are shortened in messages
_SHOWN_ITEMS = 10


def show(value: Any) -> str:
    """A value as the user would write it in YAML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        if len(value) > _SHOWN_CHARS:  # a pasted file must not flood the terminal
            return repr(value[:_SHOWN_CHARS]) + f"... ({len(value):,} characters)"
        return repr(value)
    if isinstance(value, list):
        if len(value) > _SHOWN_ITEMS:
            return "[" + ", ".join(show(v) for v in value[:_SHOWN_ITEMS]) + f", ... ({len(value):,} items)]"
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "a mapping",
            type(None): "empty"}.get(type(value), type(value).__name__)


def _hint(value: Any, prop: dict[str, Any]) -> str:
    """A suggestion for the common ways of getting a key wrong."""
    if isinstance(value, str) and value in prop.get("x-aliases", {}):  # another name for a value: say which
        name, why = prop["x-aliases"][value]
        return f" (did you mean '{name}'? {why})"
    refused = prop.get("x-refused", {})  # LLaMA-Factory values not implemented here: the schema says why
    if isinstance(value, str) and value in refused:
        return f": {refused[value]}"
    if isinstance(value, str):
        if "enum" in prop and all(isinstance(v, str) for v in prop["enum"]):
            suggestion = did_you_mean(value, prop["enum"])
            if suggestion:
                return suggestion
        if spec.allows_type(prop, "boolean") and value.lower() in _YAML11_BOOLS | {"true", "false"}:
            return " (only true and false are booleans: yes/no/on/off are read as strings; write true or false)"
        if spec.allows_type(prop, "number") or spec.allows_type(prop, "integer"):
            try:
                parsed = parse_value(value, Origin("cli", text=""))
            except UserError:
                parsed = None
            if isinstance(parsed, (int, float)) and not isinstance(parsed, bool):
                return " (a number in quotes is a string; remove the quotes)"
            if value.replace("_", "").isdigit():
                return f" (write {value.replace('_', '')} without underscores)"
    if value is None and not spec.allows_type(prop, "null"):
        return " (the value is empty; give one, or leave the key out to use the default)"
    return ""


def check_schema(entries: Mapping[str, Entry], recipe_file: str, optional: tuple[str, ...] = ()
                 ) -> tuple[list[tuple[tuple, str]], set[str]]:
    """(sortable messages, keys with problems) for the user-set values in `entries`.

    `optional`: required keys the command does without (export/generate need no dataset).
    """
    from jsonschema import Draft202012Validator

    props = spec.properties()
    problems: list[tuple[tuple, str]] = []
    bad: set[str] = set()

    def add(entry: Entry | None, text: str, key: str, use_key_origin: bool = False) -> None:
        bad.add(key)
        if entry is None:
            problems.append(((0, recipe_file, 0, 0), f"{recipe_file}: {text}"))
            return
        origin = entry.key_origin if use_key_origin else entry.origin
        order = (0, origin.file, origin.line, origin.column) if origin.kind == "file" else (1, "", 0, 0)
        problems.append((order, f"{origin.where}: {text}"))

    from pipeline.rerun import run_this

    from pipeline.recipe.typed import cli_texts

    typed = cli_texts(e.origin for e in entries.values())  # for "run this"
    known = {}
    for key, entry in entries.items():
        if key not in props:
            if key in DERIVED_KEYS:
                add(entry, f"{key}: is computed by the pipeline (from the launcher and the data); do not set it",
                    key, True)
            else:
                add(entry, f"{key}: unknown key{did_you_mean(key, props, KEY_CUTOFF)}", key, True)
            continue
        if _non_finite(entry.value):
            add(entry, f"{key}: given {show(entry.value)}, expected a finite number", key)
            continue
        known[key] = entry.value

    schema = {k: v for k, v in spec.schema().items() if k != "additionalProperties"}
    by_key: dict[str, list] = {}
    for err in Draft202012Validator(schema).iter_errors(known):
        if err.validator == "required":
            missing = err.message.split("'")[1]
            if missing in optional:
                continue
            prop = props[missing]
            # LLaMA-Factory's merge recipes (export_dir, no dataset) are run by `export`, which needs none
            merge = (f"; a recipe with export_dir and no dataset, as LLaMA-Factory's merge_lora ones, is run by "
                     f"{run_this('export', recipe_file, typed)}" if missing == "dataset" and "export_dir" in known
                     else _inference_hint(recipe_file, typed) if missing == "dataset" and "infer_backend" in known
                     else "")
            if missing == "dataset" and known.get("task"):  # LLaMA-Factory's eval recipe: `eval` needs no dataset
                add(None, f"dataset: missing, and not needed here: this recipe has task: {known['task']} (LLaMA-"
                          "Factory's eval recipe, a multiple-choice benchmark), which trains nothing; it is run by "
                          f"{run_this('eval', recipe_file, typed)}", missing)
                continue
            add(None, f"{missing}: missing, expected {spec.describe(prop)} (set it in the recipe, "
                      f"a file it extends, or on the command line as {missing}=...){merge}", missing)
            continue
        if err.absolute_path:
            by_key.setdefault(str(err.absolute_path[0]), []).append(err)
    for key in sorted(by_key):
        entry, prop = entries[key], props[key]
        kinds = {e.validator for e in by_key[key]}
        given = show(entry.value)
        if kinds & {"type", "anyOf"} and not isinstance(entry.value, (list, dict)) and entry.value is not None:
            given += f" ({_kind(entry.value)})"
        add(entry, f"{key}: given {given}, expected {spec.describe(prop)}{_hint(entry.value, prop)}", key)
    return problems, bad


def _inference_hint(recipe_file: str, typed: tuple[str, ...]) -> str:
    """LLaMA-Factory's inference recipes (examples/inference: a model, an adapter, template, infer_backend; no dataset)
    are run by chat, which needs none: "dataset: missing" alone sent the user to add one, making it a training
    recipe."""
    from pipeline.rerun import make_runs_here, run_this

    one = "PROMPT='TEXT'" if make_runs_here() else "--prompt TEXT"
    return (f"; a recipe with infer_backend and no dataset, as LLaMA-Factory's inference ones, is run by "
            f"{run_this('chat', recipe_file, typed)}, with {one} for one answer")


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False
