"""Render the recipe key tables from the schema into docs/recipe-reference.md, between its markers.

The schema is the single source of truth for keys; the page's prose around the markers is written by
hand, the tables never are, and a test runs `--check` so that the page cannot drift from the schema.

    python -m pipeline.recipe.docs           # rewrite that region of docs/recipe-reference.md
    python -m pipeline.recipe.docs --check   # exit 1 if the page is stale
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.recipe import spec

START = "<!-- recipe-reference:start -->"
END = "<!-- recipe-reference:end -->"
PAGE = Path(__file__).resolve().parents[2] / "docs" / "recipe-reference.md"


def _default(key: str, prop: dict) -> str:
    if key in spec.schema().get("required", []):
        return "**required**"
    value = prop.get("default")
    if value is None:
        return "null"
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def _allowed(prop: dict) -> str:
    if "enum" in prop:
        return ", ".join(f"`{v}`" for v in prop["enum"])
    parts = []
    for sub in prop.get("anyOf", [prop]):
        rng = spec.describe_range(sub)
        if rng:
            parts.append(rng)
    return "; ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def render() -> str:
    """The markdown: one table per group (key, type, default, allowed values/range, description)."""
    props = spec.properties()
    out = [START, "", "_Generated from `pipeline/recipe/schema/recipe.schema.json` by "
                      "`python -m pipeline.recipe.docs`; do not edit by hand._", ""]
    for group, keys in spec.groups().items():
        out += [f"### {group}", "", "| key | type | default | allowed | description |", "|---|---|---|---|---|"]
        for key in keys:
            p = props[key]
            out.append(f"| `{key}` | {spec.type_name(p)} | {_cell(_default(key, p))} | {_cell(_allowed(p))} | "
                       f"{_cell(p.get('description', ''))} |")
        out.append("")
    out.append(END)
    return "\n".join(out)


def splice(page: str, section: str) -> str | None:
    """The page's text with the region between the markers replaced, or None when the markers are missing."""
    start, end = page.find(START), page.find(END)
    if start < 0 or end < start:
        return None
    return page[:start] + section + page[end + len(END):]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.recipe.docs", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from the schema")
    parser.add_argument("--page", type=Path, default=PAGE, help="the markdown page holding the markers")
    args = parser.parse_args(argv)
    text = args.page.read_text(encoding="utf-8") if args.page.exists() else ""
    updated = splice(text, render())
    if updated is None:
        print(f"{args.page}: no {START} ... {END} markers; add them where the reference goes", file=sys.stderr)
        return 1
    if args.check:
        if updated != text:
            print(f"{args.page}: the recipe reference is stale; run python -m pipeline.recipe.docs", file=sys.stderr)
            return 1
        return 0
    if updated != text:
        from pipeline.io import write_text

        write_text(args.page, updated)
        print(f"{args.page}: recipe reference updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
