"""`make train` never wipes another recipe's finished run.

make retrains a stale finished run from scratch (it passes overwrite_output_dir=true when all_results.json is
there). A recipe that `extends` another and leaves output_dir out inherits the parent's output_dir
(docs/recipe-reference.md); its first `make train` found the parent's all_results.json and removed the parent's
run. Only a run of the same recipe (output_dir/resolved.yaml names it) is retrained that way now.
"""
from __future__ import annotations

from tests.acceptance.harness import files_under, make, trained_with_make, write_recipe


def test_a_child_recipe_does_not_overwrite_its_parents_run(tmp_path):
    repo, venv, before = trained_with_make(tmp_path / "repo", "base")
    assert "all_results.json" in before

    (repo / "recipes" / "child.yaml").write_text("extends: base.yaml\nlearning_rate: 1.0e-3\n", encoding="utf-8")
    refused = make("train", "RECIPE=recipes/child.yaml", venv, cwd=repo, expect=2)
    assert "saves/base is not empty" in refused.stderr and "Traceback" not in refused.stderr
    assert files_under(repo / "saves" / "base") == before

    # the recipe's own stale finished run is still retrained from scratch (here spelled ./recipes/...)
    write_recipe(repo / "recipes" / "base.yaml", model_name_or_path="tiny", output_dir="saves/base", max_steps=1,
                 plot_loss=False, seed=7)
    make("train", "RECIPE=./recipes/base.yaml", venv, cwd=repo)
    assert files_under(repo / "saves" / "base") != before
