"""Papercuts a user meets on the first day, through the CLI as typed, from a transformers-written GPT-2 checkpoint.

- `train` of an epoch-based recipe (num_train_epochs, no max_steps) before `make data`: the steps cannot be counted,
  and train does not build (DESIGN.md: `make data` / `python -m pipeline build` builds; train builds only with
  LLaMA-Factory's overwrite_cache: true). One line naming the dataset that is not built and the commands that build
  it, exit 2, nothing written. (It already said so when this test was written: a guard, not a fix.)
- `train --dry-run` with an output_dir the real run could not write: the dry run writes only to a temporary folder,
  so it reports as usual (exit 0) and names the folder in ONE warning line, the refusal the real run would stop
  with. Failed before: refused, exit 2, as the real run is (the dry run took output_dir's lock like train).
"""
from __future__ import annotations

import os
from pathlib import Path

from tests.acceptance.harness import cli_env, pipeline, refused, write_recipe


def files(workdir: Path) -> list[Path]:
    """What is under workdir, but the TMPDIR given to the run (tiktoken keeps its cache there)."""
    return sorted(p.relative_to(workdir) for p in workdir.rglob("*") if not p.is_relative_to(workdir / "tmp"))


def test_an_epoch_recipe_trained_before_its_data_is_built_says_what_builds_it(workdir, hf_checkpoint):
    write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                 output_dir="saves/r", max_steps=None, num_train_epochs=2)
    err = refused("train", "r.yaml", cwd=workdir)
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: data/build/tiny_sft: dataset 'tiny_sft' is not built; run `make data` (python -m pipeline build "
        "RECIPE), or set overwrite_cache: true so that train and eval rebuild it themselves"], err
    assert sorted(p.name for p in workdir.iterdir()) == ["data", "r.yaml"]  # no saves/, no build


def test_a_dry_run_names_an_output_dir_the_real_run_cannot_write_and_goes_on(workdir, hf_checkpoint):
    """As root, who may write anywhere, /proc stands in for a folder this user may not create in (as
    tests/recipe/test_careless_user.py does for the real run); as another user, a folder without write permission."""
    write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                 output_dir="saves/r", max_steps=3)
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    if os.geteuid() == 0:
        value, why = "/proc/no-such-run", "No such file or directory (/proc)"
    else:
        (workdir / "locked").mkdir(mode=0o555)
        value, why = "locked/run", f"Permission denied ({workdir / 'locked'})"
    tmp = workdir / "tmp"
    tmp.mkdir()
    before = files(workdir)
    done = pipeline("train", "r.yaml", "--dry-run", f"output_dir={value}", cwd=workdir, env=cli_env(TMPDIR=str(tmp)))
    assert "dry run: ok" in done.stdout and f"output_dir {value} was not touched" in done.stdout, done.stdout
    assert [line for line in done.stderr.splitlines() if line.startswith(("warning:", "error:"))] == [
        f"warning: command line override output_dir={value}: output_dir: {value} cannot be created: {why}; choose a "
        "directory this user may write, or make that one writable. The real run would stop there; this dry run "
        "writes only to a temporary folder, so it goes on"], done.stderr
    assert files(workdir) == before and not [p for p in tmp.iterdir() if p.name.startswith("pipeline-dry-run")]
