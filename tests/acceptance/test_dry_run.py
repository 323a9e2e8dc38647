"""`train RECIPE --dry-run` and `make dry-run`: one real step and a checkpoint write, output_dir untouched.

Each test runs the CLI with TMPDIR pointed at a folder of its own, so that "the temporary files are removed"
is checked on the folder the dry run used.
"""
from __future__ import annotations

import re

import pytest

from tests.acceptance.harness import cli_env, files_under, make, pipeline, scratch_repo, write_data, write_recipe


@pytest.fixture
def dry(workdir, hf_checkpoint):
    """(workdir, recipe path, env): a built LoRA recipe on a save_pretrained GPT-2 and a private TMPDIR."""
    tmp = workdir / "tmp"
    tmp.mkdir()
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                          output_dir="saves/r", max_steps=3, save_steps=1)
    pipeline("build", recipe, cwd=workdir)
    return workdir, recipe, cli_env(TMPDIR=str(tmp))


def leftovers(tmp) -> list[str]:
    """What dry runs left in TMPDIR (other libraries keep caches there: data-gym-cache is tiktoken's)."""
    return [p.name for p in tmp.iterdir() if p.name.startswith("pipeline-dry-run")]


def check_report(stdout: str) -> None:
    assert "dry run: ok" in stdout
    assert re.search(r"first optimizer step: [0-9.]+ s \(loss [0-9.]+\)", stdout), stdout
    assert re.search(r"checkpoint write: [0-9.]+ s, [0-9.]+ MiB", stdout), stdout
    assert re.search(r"peak memory: [0-9,]+ MiB resident", stdout), stdout
    assert re.search(r"whole run: 3 steps x", stdout), stdout


def test_dry_run_creates_no_output_dir(dry):
    workdir, recipe, env = dry
    done = pipeline("train", recipe, "--dry-run", cwd=workdir, env=env)
    check_report(done.stdout)
    assert not (workdir / "saves").exists()
    assert leftovers(workdir / "tmp") == []


def test_dry_run_leaves_a_finished_run_and_resumes_from_its_checkpoint_read_only(dry):
    workdir, recipe, env = dry
    pipeline("train", recipe, cwd=workdir)
    before = files_under(workdir / "saves")
    assert "r/checkpoint-3/trainer_state.json" in before
    done = pipeline("train", recipe, "--dry-run", "resume_from_checkpoint=latest", "max_steps=4", cwd=workdir, env=env)
    check_report(done.stdout.replace("whole run: 4 steps", "whole run: 3 steps"))
    assert "resuming from" in done.stderr and "at step 3" in done.stderr
    assert files_under(workdir / "saves") == before
    assert leftovers(workdir / "tmp") == []


def test_a_broken_recipe_fails_the_dry_run_like_the_run(dry):
    workdir, recipe, env = dry
    done = pipeline("train", recipe, "--dry-run", "lora_target=[nope]", cwd=workdir, env=env, expect=2)
    assert "Traceback" not in done.stderr and "nope" in done.stderr
    assert not (workdir / "saves").exists()


@pytest.mark.slow
def test_make_dry_run_on_two_ranks(tmp_path, hf_checkpoint):
    root = scratch_repo(tmp_path / "repo")
    write_data(root / "datasets")
    (root / "recipes").mkdir()
    write_recipe(root / "recipes" / "two.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="datasets",
                 output_dir="saves/two", zero_stage=2)
    (root / "tmp").mkdir()
    env = cli_env(TMPDIR=str(root / "tmp"), MAKEFLAGS="", MAKELEVEL="")
    # `make train ARGS=--dry-run` before the data is built: build and validate run without --dry-run (train's option
    # alone; build refused it), then the dry run; nothing written under saves/, and train is not marked done.
    # `make -n` first: it lists those commands and writes nothing.
    raw = files_under(root / "datasets")
    planned = make("-n", "train", "RECIPE=recipes/two.yaml", "ARGS=--dry-run", f"VENV={root / 'venv'}", cwd=root,
                   env=env)
    commands = [line.split(" -m pipeline ")[1].strip() for line in planned.stdout.splitlines() if " -m pipeline " in line]
    assert commands == ["build recipes/two.yaml", "validate recipes/two.yaml",
                        "train recipes/two.yaml --retrain-finished --dry-run"], planned.stdout
    assert files_under(root / "datasets") == raw and not (root / ".stamps").exists()
    done = make("train", "RECIPE=recipes/two.yaml", "ARGS=--dry-run", f"VENV={root / 'venv'}", cwd=root, env=env)
    assert "dry run: ok" in done.stdout
    assert (root / ".stamps/recipes/two/validate").exists()
    assert not (root / "saves").exists() and not (root / ".stamps/recipes/two/train").exists()
    # the same through `make dry-run` on two ranks
    done = make("dry-run", "RECIPE=recipes/two.yaml", "NPROC=2", f"VENV={root / 'venv'}", cwd=root, env=env)
    check_report(done.stdout.replace("whole run: 2 steps", "whole run: 3 steps"))
    assert "2 rank(s)" in done.stderr
    assert not (root / "saves").exists() and not (root / ".stamps/recipes/two/train").exists()
    assert leftovers(root / "tmp") == []


def test_bf16_on_a_cpu_without_it_gets_a_notice_in_plan_dry_run_and_train(dry):
    """A CPU without avx512_bf16/AMX is played through PIPELINE_CPUINFO (this machine may have them)."""
    workdir, recipe, env = dry
    (workdir / "cpuinfo").write_text("flags\t\t: fpu sse sse2 avx avx2 avx512f\n", encoding="utf-8")
    env = {**env, "PIPELINE_CPUINFO": str(workdir / "cpuinfo"), "CUDA_VISIBLE_DEVICES": ""}
    plan = pipeline("plan", recipe, "bf16=true", cwd=workdir, env=env)
    assert "notice: command line override bf16=true: bf16 is true" in plan.stderr and "lacks avx512_bf16 and amx_bf16" in plan.stderr
    assert "bf16: false" in plan.stderr
    done = pipeline("train", recipe, "--dry-run", "bf16=true", cwd=workdir, env=env)
    assert "notice: command line override bf16=true: bf16 is true" in done.stderr and "measured here just now" in done.stderr
    assert "dry run: ok" in done.stdout
    quiet = pipeline("plan", recipe, "bf16=false", cwd=workdir, env=env)
    assert "notice" not in quiet.stderr
