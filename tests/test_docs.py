"""The documentation holds together: every docs/ page is in the index, every relative link resolves.

README.md is the newcomer's guide and docs/*.md the reference; pages move and headings get renamed, and
a link that silently points nowhere is the usual casualty. Anchors are checked with GitHub's rule for
heading ids (lowercase, punctuation dropped, spaces to hyphens).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _pages() -> list[Path]:
    return [ROOT / "README.md", ROOT / "INTERNALS.md", *sorted(DOCS.glob("*.md"))]


def _prose(text: str) -> str:
    """The text outside fenced code blocks (a `[x](y)` inside code is not a link)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _anchors(path: Path) -> set[str]:
    ids = set()
    for line in _prose(path.read_text(encoding="utf-8")).splitlines():
        m = re.match(r"#{1,6} (.*)", line)
        if m:
            ids.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return ids


def test_every_docs_page_is_in_the_index():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    linked = {target.split("#")[0] for target in LINK.findall(index)}
    missing = [p.name for p in DOCS.glob("*.md") if p.name != "README.md" and p.name not in linked]
    assert not missing, f"docs/README.md does not link {missing}: add a row for each to its table"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z]+:", target):
            continue                                    # http(s):, mailto: — not checked offline
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest} does not exist")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with id '{anchor}' in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_merge_page_states_the_default_export_dtype_and_how_to_keep_bf16():
    """LLaMA-Factory exports in the model's own dtype; ours defaults to the schema's export_dtype (fp32: a bf16
    checkpoint comes out twice its size), which a user coming from there does not expect: the merge page says so."""
    import json

    schema = json.loads((ROOT / "pipeline/recipe/schema/recipe.schema.json").read_text(encoding="utf-8"))
    default = schema["properties"]["export_dtype"]["default"]
    text = " ".join(_prose((DOCS / "merge-eval.md").read_text(encoding="utf-8")).split())
    assert f"The default `export_dtype` is `{default}`" in text and "LLaMA-Factory keeps the model's dtype" in text
    assert "set `export_dtype: bf16`" in text


def test_the_readmes_mistyped_validate_prints_what_the_readme_shows():
    """README's tour runs `validate` with two mistyped overrides and shows, as comments under it, the messages and
    the exit code: the command runs here as typed (the interpreter running the tests for `.venv/bin/python`), and
    its stderr must be those lines, in order, with exit code 2 and no traceback."""
    import shlex
    import subprocess
    import sys

    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    (at,) = [i for i, line in enumerate(lines) if line.startswith(".venv/bin/python -m pipeline validate ")]
    shown = []
    for line in lines[at + 1:]:
        if not line.startswith("#   "):
            break
        shown.append(line[len("#   "):])
    expected, said = [line for line in shown if line.startswith("error: ")], shown[-1]
    assert expected and said.startswith("(exit code 2, no traceback"), shown
    argv = shlex.split(lines[at].split("  #")[0])
    done = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert (done.returncode, done.stderr.splitlines(), done.stdout) == (2, expected, ""), done.stderr
