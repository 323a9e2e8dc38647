"""The recipe JSON Schema as data: defaults, groups and plain-English descriptions of each key.

schema/recipe.schema.json is the single source of truth; validation, defaults, `plan` and the README's
recipe reference all read it through this module.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("schema") / "recipe.schema.json"

# Order in which groups are shown (plan, README); groups not listed here follow in schema order.
GROUP_ORDER = ("recipe", "model", "method", "dataset", "output", "train", "eval", "generation", "export")


@functools.lru_cache(maxsize=None)
def schema() -> dict[str, Any]:
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        return json.load(handle)


def properties() -> dict[str, dict[str, Any]]:
    return schema()["properties"]


def defaults() -> dict[str, Any]:
    return {key: prop.get("default") for key, prop in properties().items()}


def groups() -> dict[str, list[str]]:
    """x-group -> keys, in GROUP_ORDER then schema order."""
    found: dict[str, list[str]] = {}
    for key, prop in properties().items():
        found.setdefault(prop.get("x-group", "other"), []).append(key)
    order = [g for g in GROUP_ORDER if g in found] + [g for g in found if g not in GROUP_ORDER]
    return {g: found[g] for g in order}


def allows_type(prop: dict[str, Any], type_name: str) -> bool:
    """Whether the key's schema admits JSON type `type_name` somewhere (type, anyOf or enum)."""
    types = prop.get("type")
    if isinstance(types, str):
        types = [types]
    if types and type_name in types:
        return True
    if "enum" in prop:
        py = {"string": str, "integer": int, "boolean": bool, "null": type(None)}.get(type_name)
        return py is not None and any(type(v) is py for v in prop["enum"])
    return any(allows_type(sub, type_name) for sub in prop.get("anyOf", []))


def is_integer_key(prop: dict[str, Any]) -> bool:
    """Integer but not number: an integral float such as 1e3 is stored as int 1000."""
    return allows_type(prop, "integer") and not allows_type(prop, "number")


_TYPE_WORDS = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "true or false",
    "null": "null",
    "array": "a list",
    "object": "a mapping",
}


def _fmt_num(x: Any) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() and abs(x) < 1e15 else str(x)


def describe_range(prop: dict[str, Any]) -> str:
    """'>= 1', '> 0 and < 1', '' when unbounded."""
    parts = []
    if "minimum" in prop:
        parts.append(f">= {_fmt_num(prop['minimum'])}")
    if "exclusiveMinimum" in prop:
        parts.append(f"> {_fmt_num(prop['exclusiveMinimum'])}")
    if "maximum" in prop:
        parts.append(f"<= {_fmt_num(prop['maximum'])}")
    if "exclusiveMaximum" in prop:
        parts.append(f"< {_fmt_num(prop['exclusiveMaximum'])}")
    return " and ".join(parts)


def _describe_one(prop: dict[str, Any]) -> list[str]:
    if "enum" in prop:
        return ["one of " + ", ".join(v if isinstance(v, str) else json.dumps(v) for v in prop["enum"])]
    if "anyOf" in prop:
        out: list[str] = []
        for sub in prop["anyOf"]:
            out.extend(_describe_one(sub))
        return out
    types = prop.get("type", [])
    if isinstance(types, str):
        types = [types]
    words = []
    rng = describe_range(prop)
    for t in types:
        word = _TYPE_WORDS.get(t, t)
        if t in ("integer", "number") and rng:
            word += " " + rng
        if t == "string" and prop.get("minLength"):
            word = "a non-empty string"
        if t == "array":
            item = _describe_one(prop.get("items", {}))
            item_word = item[0] if item else "values"
            noun = {"a string": "strings", "a non-empty string": "non-empty strings"}.get(item_word, item_word)
            word = ("a non-empty list of " if prop.get("minItems") else "a list of ") + noun
        words.append(word)
    return words


def describe(prop: dict[str, Any]) -> str:
    """What a key accepts, in words: 'an integer >= 1 or null', 'one of pt, sft'."""
    words = list(dict.fromkeys(_describe_one(prop)))
    if "null" in words:  # null reads best last
        words = [w for w in words if w != "null"] + ["null"]
    return " or ".join(words) if len(words) <= 2 else ", ".join(words[:-1]) + " or " + words[-1]


def type_name(prop: dict[str, Any]) -> str:
    """Short type for the reference table: 'integer | null', 'enum', 'string | list'."""
    if "enum" in prop:
        return "enum"
    if "anyOf" in prop:
        return " \\| ".join(type_name(sub) for sub in prop["anyOf"])
    types = prop.get("type", [])
    if isinstance(types, str):
        types = [types]
    names = {"array": "list", "number": "float", "boolean": "bool"}
    return " \\| ".join(names.get(t, t) for t in types)
