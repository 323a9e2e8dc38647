"""`make <stage>` on a recipe with mistakes prints each problem once (README: "one clear message per problem").

The Makefile's deps step printed its messages, then ran validate, which printed them again.
"""
from __future__ import annotations

from tests.acceptance.harness import make, scratch_repo, write_data


def test_each_problem_is_printed_once(tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    write_data(repo / "datasets")
    (repo / "recipes").mkdir()
    (repo / "recipes" / "bad.yaml").write_text("model_name_or_path: tiny\ndataset: tiny_sft\nlora_rnak: 3\n",
                                               encoding="utf-8")
    failed = make("validate", "RECIPE=recipes/bad.yaml", f"VENV={repo / 'venv'}", cwd=repo, expect=2)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: recipes/bad.yaml:3:1: lora_rnak: unknown key (did you mean 'lora_rank'?)"], failed.stderr
    # make's own line is the usual failed-rule one, not "No rule to make target" (a -include hid the failure)
    assert "No rule to make target" not in failed.stderr, failed.stderr
    assert not list((repo / ".stamps").rglob("deps.mk*"))


def test_a_missing_recipe_is_named(tmp_path):
    """It was make's "No rule to make target 'recipes/nope.yaml', needed by '.stamps/nope/deps.mk'"."""
    repo = scratch_repo(tmp_path / "repo")
    (repo / "recipes").mkdir()
    (repo / "recipes" / "mine.yaml").write_text("model_name_or_path: tiny\n", encoding="utf-8")
    failed = make("train", "RECIPE=recipes/nope.yaml", f"VENV={repo / 'venv'}", cwd=repo, expect=2)
    assert ("RECIPE=recipes/nope.yaml: no such recipe file (the recipes here: recipes/mine.yaml)"
            in failed.stderr), failed.stderr
    assert not (repo / ".stamps").exists()
