"""`make <stage>` on a recipe with mistakes prints each problem once (README: "one clear message per problem").

The Makefile's deps step printed its messages, then ran validate, which printed them again; then make added its own
lines ("deps.mk: No such file or directory", "make: *** [...scope.mk] Error 2").
"""
from __future__ import annotations

import re

import pytest

from tests.acceptance.harness import make, refused_before_any_stage, scratch_repo, write_data

# (recipe text, stderr): mistakes make finds before any stage runs
BEFORE_ANY_STAGE = [
    ("model_name_or_path: tiny\ndataset: tiny_sft\nlora_rnak: 3\n",
     ["error: recipes/bad.yaml:3:1: lora_rnak: unknown key (did you mean 'lora_rank'?)"]),
    ("model_name_or_path: tiny\ndataset: tiny_sfd\n",
     ["error: recipes/bad.yaml:2:10: dataset: dataset 'tiny_sfd' is not in datasets/dataset_info.json (did you mean "
      "'tiny_sft'?); known: tiny_pt, tiny_sft"]),
]


def _repo(tmp_path, recipe: str):
    repo = scratch_repo(tmp_path / "repo")
    write_data(repo / "datasets")
    (repo / "recipes").mkdir()
    (repo / "recipes" / "bad.yaml").write_text(recipe, encoding="utf-8")
    return repo, f"VENV={repo / 'venv'}"


@pytest.mark.parametrize("recipe,stderr", BEFORE_ANY_STAGE, ids=["misspelt key", "missing dataset"])
def test_a_mistake_found_before_any_stage_is_our_one_message(tmp_path, recipe, stderr):
    """Our message, as typed and under -n, then make's one stop line (the Makefile's $(error): exit 2), and nothing
    written. It was our message, then make's "deps.mk: No such file or directory" and "make: *** [...] Error 2"."""
    repo, venv = _repo(tmp_path, recipe)
    for goal in (["train"], ["-n", "train"]):
        failed = make(*goal, "RECIPE=recipes/bad.yaml", venv, cwd=repo, expect=2)
        assert refused_before_any_stage(failed) == stderr and failed.stdout == "", (goal, failed.stderr, failed.stdout)
        assert not list((repo / ".stamps").rglob("*.mk*")) and not (repo / "datasets/build").exists()


def test_a_missing_model_is_our_one_message_and_makes_line(tmp_path):
    """train refuses a model folder that is not there and that no recipe writes: a stage's refusal, after which GNU
    make always adds its own line and exits 2."""
    repo, venv = _repo(tmp_path, "model_name_or_path: models/nothing\ndataset: tiny_sft\n")
    failed = make("train", "RECIPE=recipes/bad.yaml", venv, cwd=repo, expect=2)
    assert failed.stderr.splitlines()[:-1] == [
        "error: recipes/bad.yaml:1:21: model_name_or_path: directory 'models/nothing' does not exist here; if another "
        "recipe produces it, run that one first"], failed.stderr
    # make's own line; "make[1]: ..." where this make runs under another (the suite under `make test`)
    assert re.match(r"make(\[\d+\])?: \*\*\* \[", failed.stderr.splitlines()[-1]), failed.stderr


def test_a_missing_recipe_is_named(tmp_path):
    """It was make's "No rule to make target 'recipes/nope.yaml', needed by '.stamps/nope/deps.mk'"."""
    repo = scratch_repo(tmp_path / "repo")
    (repo / "recipes").mkdir()
    (repo / "recipes" / "mine.yaml").write_text("model_name_or_path: tiny\n", encoding="utf-8")
    failed = make("train", "RECIPE=recipes/nope.yaml", f"VENV={repo / 'venv'}", cwd=repo, expect=2)
    assert ("RECIPE=recipes/nope.yaml: no such recipe file (the recipes here: recipes/mine.yaml)"
            in failed.stderr), failed.stderr
    assert not (repo / ".stamps").exists()
