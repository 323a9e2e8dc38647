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


# ------------------------------------------------------------------ what a newcomer types, checked against the repo

SPAN = re.compile(r"`([^`\n]+)`")
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")
# recipes the pages name as examples of a user's own (`recipes/x.yaml`), or that the page has the user write
# (README's `recipes/my_run.yaml`); every other recipe, script or doc path a page names must be in the repository
PLACEHOLDERS = {"recipes/x.yaml", "recipes/my_run.yaml", "recipes/dpo.yaml", "datasets/raw/x.jsonl"}


def _spans(page: Path) -> list[str]:
    return SPAN.findall(_prose(page.read_text(encoding="utf-8")))


def _make_commands(page: Path) -> list[str]:
    """The `make ...` commands a page gives, in code spans and code-block lines: from `make` (after any VAR=value the
    shell takes as the environment) to a `#` comment or the next `&&`."""
    text = page.read_text(encoding="utf-8")
    lines = [line for block in re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.S | re.M)
             for line in block.splitlines()]
    commands = []
    for candidate in [*_spans(page), *lines]:
        for part in candidate.split(" #")[0].split("&&"):
            m = re.fullmatch(r"\s*(?:[A-Z_]+=\S+\s+)*(make\s.*)", part)
            if m:
                commands.append(m.group(1).strip())
    return commands


def test_every_make_command_in_the_docs_names_targets_variables_and_recipes_that_exist():
    """`make <target> VAR=value` as README and docs/ write it: each target is a rule of the Makefile, each variable one
    it reads, each RECIPE= a file here (or a placeholder): a renamed target or variable left a page telling newcomers
    to type a command make answers with "No rule to make target"."""
    import shlex

    targets = set(re.findall(r"^([a-z][a-z-]*):", MAKEFILE, flags=re.M))
    variables = set(re.findall(r"\$\(([A-Z_]+)\)", MAKEFILE))
    wrong, seen = [], 0
    for page in _pages():
        for command in _make_commands(page):
            seen += 1
            for word in shlex.split(re.sub(r"<[^>]*>", "<_>", command.replace("…", "...")))[1:]:
                word = word.strip("[]")
                name, is_variable, value = word.partition("=")
                if word.startswith("-") or word.startswith("<") or word.strip(".") == "":
                    continue                                    # make's own options (-n, -B), placeholders
                if not is_variable and name not in targets:
                    wrong.append(f"{page.name}: `{command}`: no target '{name}' in the Makefile")
                elif is_variable and name not in variables:
                    wrong.append(f"{page.name}: `{command}`: the Makefile reads no variable {name}")
                elif name == "RECIPE" and value.endswith(".yaml") and value.startswith("recipes/") \
                        and value not in PLACEHOLDERS and not (ROOT / value).is_file():
                    wrong.append(f"{page.name}: `{command}`: {value} does not exist")
    assert seen > 50 and not wrong, "\n".join(wrong)


def test_every_repository_path_the_docs_name_exists():
    """A path in a code span that starts at a folder of the repository (`datasets/generate.py`,
    `tests/test_demo_data.py`, `bench/gpu_check.sh`, a recipe) names a file or folder that is there; a glob or a
    {a,b} list matches at least one each. Generated paths (datasets/build/, saves/) and quoted messages are not
    checked."""
    folders = "|".join(re.escape(p.name) for p in ROOT.iterdir() if p.is_dir() and (ROOT / p.name).resolve() == p
                       and p.name in {"pipeline", "tests", "bench", "datasets", "recipes", "docs", ".ci"})
    path = re.compile(rf"(?<![\w./-])((?:{folders})/[\w./{{}},*-]*[\w*}}/])")
    missing, seen = [], 0
    for page in _pages():
        for span in _spans(page):
            if re.match(r"(error|warning|notice|bug): ", span):
                continue
            for found in path.findall(span):
                if found.startswith("datasets/build/") or found in PLACEHOLDERS or "<" in span.split(found)[1][:1]:
                    continue
                seen += 1
                head, brace, rest = found.partition("{")
                options, _, tail = rest.partition("}")
                for one in [head + o + tail for o in options.split(",")] if brace else [found]:
                    if not (list(ROOT.glob(one)) if "*" in one else (ROOT / one).exists()):
                        missing.append(f"{page.name}: `{span}`: {one} does not exist")
    assert seen > 50 and not missing, "\n".join(missing)


def _yaml_blocks(page: Path) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_recipe_snippets_in_the_docs_use_keys_of_the_schema(tmp_path, monkeypatch):
    """Every ```yaml block of README and docs/, and every `key: value` span of README, is recipe keys (the schema's,
    which docs/recipe-reference.md lists); the blocks headed `# recipes/my_run.yaml`, which README's tour has the
    newcomer write and run with `make all`, resolve as written beside the recipe they extend (a link to it in a
    temporary folder: nothing is written here)."""
    import json

    import yaml

    from pipeline.recipe import resolve

    keys = set(json.loads((ROOT / "pipeline/recipe/schema/recipe.schema.json").read_text(encoding="utf-8"))["properties"])
    monkeypatch.chdir(ROOT)                              # a recipe's paths are relative to where make runs
    unknown, runs = [], 0
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for block in _yaml_blocks(page):
            data = yaml.safe_load(block)
            assert isinstance(data, dict), f"{page.name}: a yaml block that is not a recipe:\n{block}"
            unknown += [f"{page.name}: {key}" for key in data if key not in keys]
            if block.startswith("# recipes/my_run.yaml\n"):
                runs += 1
                folder = tmp_path / page.stem
                folder.mkdir()
                (folder / data["extends"]).symlink_to(ROOT / "recipes" / data["extends"])
                (folder / "my_run.yaml").write_text(block, encoding="utf-8")
                r = resolve(folder / "my_run.yaml", command="validate")
                assert r["output_dir"] == "saves/my_run" and r["learning_rate"] == float(data["learning_rate"])
    for span in _spans(ROOT / "README.md"):             # README's `tie_word_embeddings: false` and the like
        if re.match(r"[a-z_]+: ", span) and not span.startswith("make: "):
            unknown += [f"README.md: {key}" for key in yaml.safe_load(span) if key not in keys]
    assert not unknown, f"keys not in the recipe schema: {unknown}"
    assert runs == 2, "README.md and docs/recipe-reference.md each show recipes/my_run.yaml"


def test_every_module_and_test_file_the_docs_name_exists():
    """`python -m pipeline.recipe.docs`, `pipeline.errors.UserError`, `tests.helpers.sp_vocab`: the longest dotted
    prefix is a module or package here and the name after it occurs in that module's source; a bare `test_x.py` (the
    tables of test files in docs/) is a file under tests/. A module moved or a test file renamed left the pages
    pointing readers at nothing."""
    dotted = re.compile(r"(?<![\w./-])((?:pipeline|tests|bench)(?:\.[A-Za-z_]\w*)+)")
    test_files = {p.name for p in (ROOT / "tests").rglob("test_*.py")}
    missing, seen = [], 0
    for page in _pages():
        text = page.read_text(encoding="utf-8")
        for name in dotted.findall(text):
            seen += 1
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                base = ROOT.joinpath(*parts[:i])
                source = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
                if source.is_file():
                    break
            if i < 2 or (i < len(parts) and not re.search(rf"\b{parts[i]}\b", source.read_text(encoding="utf-8"))):
                missing.append(f"{page.name}: {name}")
        missing += [f"{page.name}: {name}" for name in set(re.findall(r"\btest_\w+\.py\b", text)) - test_files]
    assert seen > 50 and not missing, f"named in the docs, not in the repository: {missing}"


def test_the_make_line_the_pages_quote_after_a_mistake_is_the_makefiles():
    """README and docs/troubleshooting.md quote the one line GNU make adds after a mistake found before any stage runs;
    GNU make writes it as `Makefile:N: *** <the Makefile's $(error) text>.  Stop.`, so the quote must be that text:
    a reworded $(error) left the pages telling newcomers to expect a line make no longer prints."""
    (said,) = re.findall(r"^\$\(error (stopped by [^)]*)\)$", MAKEFILE, flags=re.M)
    quoted = f"Makefile:N: *** {said}.  Stop."
    for page in (ROOT / "README.md", DOCS / "troubleshooting.md"):
        spans = [s for s in _spans(page) if s.startswith("Makefile:N: ***")]
        assert spans and set(spans) == {quoted}, f"{page.name} quotes {spans}; make prints {quoted!r}"
