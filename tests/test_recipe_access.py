"""Library code takes typed argument groups, not the string-keyed recipe (INTERNALS.md, "How a stage gets its
settings").

A stage's command reads the resolved recipe once and turns it into small frozen groups
(pipeline/recipe/args.py); every function below it takes a group or plain values, so its signature says
what it depends on. This walks the syntax of every module outside the allow-list and fails on a recipe
read by key: `r["key"]`, `r.get("key")`, `self.r[...]` (r, recipe and resolved are the names the recipe
travels under).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE_NAMES = {"r", "recipe", "resolved"}

# Where reading the recipe by key is the module's job: the recipe layer itself (load, resolve, rules, plan,
# DeepSpeed config, the argument groups), the command line, and the stage entry modules that build the groups.
ALLOWED = {
    "pipeline/__main__.py",
    "pipeline/prepare.py",
    "pipeline/validate.py",
    "pipeline/chat.py",
    "pipeline/merge.py",
    "pipeline/evaluate/run.py",
    "pipeline/evaluate/report.py",
    "pipeline/evaluate/preference.py",
    "pipeline/train/run.py",
    "pipeline/train/loop.py",
    "pipeline/train/checkpoint.py",
    "pipeline/train/preference.py",
    "pipeline/train/dryrun.py",
    "pipeline/train/optim.py",
    "pipeline/train/schedule.py",
    "pipeline/train/export.py",
    "pipeline/runtime/log.py",
    "pipeline/runtime/layout.py",
    "pipeline/model/preference.py",
}
ALLOWED_PACKAGES = ("pipeline/recipe/",)


def _is_recipe(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in RECIPE_NAMES
    return isinstance(node, ast.Attribute) and node.attr in RECIPE_NAMES


def recipe_reads(source: str) -> list[tuple[int, str]]:
    """(line, text) of every read of a recipe mapping by key in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Subscript) and _is_recipe(node.value):
            found.append((node.lineno, ast.unparse(node)))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
              and _is_recipe(node.func.value)):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_check_sees_every_form_of_a_recipe_read():
    source = 'a = r["lr"]\nb = r.get("seed", 1)\nc = self.r["stage"]\nd = recipe[key]\ne = data.cutoff_len\n'
    assert [line for line, _ in recipe_reads(source)] == [1, 2, 3, 4]


def test_library_code_does_not_read_the_recipe_by_key():
    bad = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED or rel.startswith(ALLOWED_PACKAGES):
            continue
        bad += [f"{rel}:{line}: {text}" for line, text in recipe_reads(path.read_text(encoding="utf-8"))]
    assert not bad, ("library code reads the recipe by key; take a typed group (pipeline/recipe/args.py) or plain "
                     "values, built by the stage's command:\n" + "\n".join(bad))


def test_the_allow_list_names_existing_modules():
    missing = [rel for rel in ALLOWED if not (ROOT / rel).is_file()]
    assert not missing, f"remove from ALLOWED: {missing}"
