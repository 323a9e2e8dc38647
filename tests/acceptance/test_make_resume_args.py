"""ARGS that change nothing a stage produces do not make the recipe stale.

docs/troubleshooting.md answers "output_dir ... is not empty" with `make train ARGS='resume_from_checkpoint=latest'`,
and docs/checking-a-recipe.md shows `make train ARGS=--dry-run`. Every change of ARGS made all stages stale, so
the next plain `make train` / `make eval` retrained the whole (finished) run from scratch.
"""
from __future__ import annotations

from tests.acceptance.harness import files_under, make, make_stages, trained_with_make


def test_resume_and_dry_run_args_leave_a_finished_run_alone(tmp_path):
    repo, venv, done = trained_with_make(tmp_path / "repo", "r")

    dry = make("train", "RECIPE=recipes/r.yaml", "ARGS=--dry-run", venv, cwd=repo)
    assert "dry run: ok" in dry.stdout, dry.stdout + dry.stderr   # still runs on a finished recipe
    make("train", "RECIPE=recipes/r.yaml", "ARGS=resume_from_checkpoint=latest", venv, cwd=repo)
    again = make("train", "RECIPE=recipes/r.yaml", venv, cwd=repo)
    assert "pipeline train" not in again.stdout, again.stdout
    assert files_under(repo / "saves" / "r") == done

    # README: `make -n <target>` lists what would run. The ARGS stamp was a rule forced to run, which -n takes as
    # remade: every stage of this finished run was listed (an upstream's too). Changed ARGS are listed, and -n writes
    # no stamp, so -n (and a plain make) after it still has nothing to do.
    assert make_stages(make("-n", "train", "RECIPE=recipes/r.yaml", venv, cwd=repo)) == []
    changed = make("-n", "train", "RECIPE=recipes/r.yaml", "ARGS=learning_rate=0.5", venv, cwd=repo)
    assert [command for command, _ in make_stages(changed)] == ["build", "validate", "train"], changed.stdout
    assert make_stages(make("-n", "train", "RECIPE=recipes/r.yaml", venv, cwd=repo)) == []

    # --dry-run is train's alone: a goal past train refuses it before anything runs (the dry run ran, then merge
    # refused the option), under -n too
    for goal in (["eval"], ["-n", "all"]):
        refused = make(*goal, "RECIPE=recipes/r.yaml", "ARGS=--dry-run", venv, cwd=repo, expect=2)
        assert refused.stdout == "" and len(refused.stderr.splitlines()) == 1, refused.stderr
        assert f"--dry-run is an option of train alone, and `make {goal[-1]}` has none" in refused.stderr
        assert "`make dry-run RECIPE=recipes/r.yaml`" in refused.stderr
    assert files_under(repo / "saves" / "r") == done
