"""Library code takes typed argument groups, not the string-keyed recipe (INTERNALS.md, "How a stage gets its
settings").

A stage's command reads the resolved recipe once and turns it into small frozen groups
(pipeline/recipe/args.py); every function below it takes a group or plain values, so its signature says
what it depends on. This walks the syntax of every module outside the allow-list and fails on a recipe
read by key: `r["key"]`, `r.get("key")`, `self.r[...]`, or a schema key as an attribute (`r.cutoff_len`, which
a Resolved also answers); r, recipe and resolved are the names the recipe travels under.
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE_NAMES = {"r", "recipe", "resolved"}
KEYS = set(json.loads((ROOT / "pipeline/recipe/schema/recipe.schema.json").read_text(encoding="utf-8"))["properties"])

# Where reading the recipe by key is the job: the recipe layer itself (load, resolve, rules, plan, DeepSpeed
# config, the argument groups), the command line, and the stage commands that build the groups (None: the
# whole module; else only the functions named).
ALLOWED: dict[str, set[str] | None] = {
    "pipeline/__main__.py": None,
    "pipeline/prepare.py": None,
    "pipeline/validate.py": None,
    "pipeline/chat.py": {"run"},
    "pipeline/merge.py": {"run", "export_run", "adapter_dir", "_recipe", "_export_target", "export_generation"},
    "pipeline/evaluate/run.py": {"run", "check_start", "tuned_model", "_recipe"},
    "pipeline/evaluate/choice.py": {"run", "check_start", "_model"},
    "pipeline/train/run.py": None,
    "pipeline/train/dryrun.py": {"run"},
    # resume compares the whole recipe with the one a checkpoint saved: which keys changed, and where they are set
    "pipeline/train/checkpoint.py": {"where", "saved_recipe", "training_data", "check_compatible", "apply_changes",
                                     "check_schedule", "_refused", "reference_adapter_files",
                                     "_reference_adapter_notices", "resumed_world_change"},
}
ALLOWED_PACKAGES = ("pipeline/recipe/",)


def _is_recipe(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in RECIPE_NAMES
    return isinstance(node, ast.Attribute) and node.attr in RECIPE_NAMES


def _is_read(node: ast.AST) -> bool:
    if isinstance(node, ast.Subscript):
        return _is_recipe(node.value)
    if isinstance(node, ast.Attribute) and node.attr in KEYS:
        return _is_recipe(node.value)
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
            and _is_recipe(node.func.value))


def recipe_reads(source: str, allowed: set[str] | frozenset[str] = frozenset()) -> list[tuple[int, str]]:
    """(line, text) of every read of a recipe mapping by key in `source`, outside the top-level functions
    named in `allowed`."""
    tree = ast.parse(source)
    skipped = {id(node) for f in tree.body if isinstance(f, ast.FunctionDef) and f.name in allowed
               for node in ast.walk(f)}
    return sorted((node.lineno, ast.unparse(node)) for node in ast.walk(tree)
                  if _is_read(node) and id(node) not in skipped)


def test_the_check_sees_every_form_of_a_recipe_read():
    source = ('a = r["lr"]\nb = r.get("seed", 1)\nc = self.r["stage"]\nd = recipe[key]\ne = data.cutoff_len\n'
              'def entry(r):\n    return r["stage"]\nf = r.cutoff_len\ng = r.replace(seed=1)\n')
    assert [line for line, _ in recipe_reads(source)] == [1, 2, 3, 4, 7, 8]
    assert [line for line, _ in recipe_reads(source, {"entry"})] == [1, 2, 3, 4, 8]


def test_library_code_does_not_read_the_recipe_by_key():
    bad = []
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(ALLOWED_PACKAGES) or (rel in ALLOWED and ALLOWED[rel] is None):
            continue
        reads = recipe_reads(path.read_text(encoding="utf-8"), ALLOWED.get(rel) or frozenset())
        bad += [f"{rel}:{line}: {text}" for line, text in reads]
    assert not bad, ("library code reads the recipe by key; take a typed group (pipeline/recipe/args.py) or plain "
                     "values, built by the stage's command:\n" + "\n".join(bad))


def test_the_allow_list_names_existing_modules():
    missing = [rel for rel in ALLOWED if not (ROOT / rel).is_file()]
    assert not missing, f"remove from ALLOWED: {missing}"
