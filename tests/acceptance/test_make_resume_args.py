"""ARGS that change nothing a stage produces do not make the recipe stale.

docs/troubleshooting.md answers "output_dir ... is not empty" with `make train ARGS='resume_from_checkpoint=latest'`,
and docs/checking-a-recipe.md shows `make train ARGS=--dry-run`. Every change of ARGS made all stages stale, so
the next plain `make train` / `make eval` retrained the whole (finished) run from scratch.
"""
from __future__ import annotations

from tests.acceptance.harness import files_under, make, scratch_repo, write_data, write_recipe


def test_resume_and_dry_run_args_leave_a_finished_run_alone(tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    venv = f"VENV={repo / 'venv'}"
    write_data(repo / "datasets")
    (repo / "recipes").mkdir()
    write_recipe(repo / "recipes" / "r.yaml", model_name_or_path="tiny", output_dir="saves/r", max_steps=1,
                 plot_loss=False)
    make("train", "RECIPE=recipes/r.yaml", venv, cwd=repo)
    done = files_under(repo / "saves" / "r")

    dry = make("train", "RECIPE=recipes/r.yaml", "ARGS=--dry-run", venv, cwd=repo)
    assert "dry run: ok" in dry.stdout, dry.stdout + dry.stderr   # still runs on a finished recipe
    make("train", "RECIPE=recipes/r.yaml", "ARGS=resume_from_checkpoint=latest", venv, cwd=repo)
    again = make("train", "RECIPE=recipes/r.yaml", venv, cwd=repo)
    assert "pipeline train" not in again.stdout, again.stdout
    assert files_under(repo / "saves" / "r") == done
