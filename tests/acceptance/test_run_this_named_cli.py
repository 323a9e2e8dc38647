"""Messages that tell the user what to run name the recipe as they named it and the overrides they typed
(pipeline.rerun.run_this), the key the fix changes set to the value it suggests (rerun.with_values): a bare `make
data` builds the Makefile's default recipe, and one without the overrides another dataset than the run reads.
Driven as typed (`python -m pipeline ...`) with a recipe path and a command-line override in a scratch folder that
links the pipeline's Makefile (a checkout's root: the make form is given where make reads it, rerun.make_runs_here).

Failed before, each: the val_size 0 refusal said "set val_size ... and run `make data`"; the ZeRO-0 optimizers'
"the memory plan: `make plan`"; a dpo pair edited to prefer nothing "`make data` removes such pairs"; plan's count
of training examples before a build "unknown until `make data`"; a benchmark key in a training recipe "a benchmark is
run by `python -m pipeline eval RECIPE`".
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.harness import DPO, link_makefile, pipeline, refused, write_ranking_data, write_recipe


@pytest.fixture(autouse=True)
def checkout_root(workdir: Path) -> Path:
    """The scratch folder as a checkout's root (the Makefile linked), where users type `make`."""
    return link_makefile(workdir)


@pytest.fixture
def recipe(workdir: Path) -> Path:
    """r.yaml: the tiny preset's LoRA sft on data/ (val_size 0.1)."""
    return write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")


def test_val_size_zero_names_the_command_again_with_val_size_set(workdir: Path, recipe: Path):
    """eval of a recipe given val_size=0 on the command line: the fix is the same command with val_size=0.1 in
    place of val_size=0 (make rebuilds the data when ARGS change) and the other override kept; its python -m form
    builds first, as it does where make reads no Makefile (tests/acceptance/test_val_size_zero_fix_cli.py: the
    command alone refuses the data built with val_size 0). Failed before: the python -m form was the command alone."""
    err = refused("eval", "r.yaml", "val_size=0", "output_dir=saves/x", cwd=workdir)
    assert ("set val_size (a fraction such as 0.1, or a number of rows), e.g. `make eval RECIPE=r.yaml "
            "ARGS='val_size=0.1 output_dir=saves/x'` (python -m pipeline build r.yaml val_size=0.1 output_dir=saves/x "
            "&& python -m pipeline eval r.yaml val_size=0.1 output_dir=saves/x), or name an eval_dataset") in err, err


def test_the_memory_plan_of_a_zero0_optimizer_is_this_runs_at_zero_stage_0(workdir: Path, recipe: Path):
    err = refused("validate", "r.yaml", "zero_stage=2", "use_muon=true", cwd=workdir, as_typed=False)
    assert ("set zero_stage: 0 (data parallel; the memory plan: `make plan RECIPE=r.yaml ARGS='zero_stage=0 "
            "use_muon=true'` (python -m pipeline plan r.yaml zero_stage=0 use_muon=true)), or remove use_muon") in err, err


def test_plan_before_the_build_names_this_recipes_build(workdir: Path, recipe: Path):
    out = pipeline("plan", "r.yaml", "val_size=0.2", cwd=workdir, as_typed=False).stdout
    assert ("unknown until `make data RECIPE=r.yaml ARGS=val_size=0.2` (python -m pipeline build r.yaml "
            "val_size=0.2)") in out, out


def test_a_benchmark_key_in_a_training_recipe_names_its_eval(workdir: Path, recipe: Path):
    err = refused("train", "r.yaml", "output_dir=saves/x", "task=mmlu_test", cwd=workdir, as_typed=False)
    assert ("task: set to 'mmlu_test': a benchmark is run by `make eval RECIPE=r.yaml ARGS='output_dir=saves/x "
            "task=mmlu_test'` (python -m pipeline eval r.yaml output_dir=saves/x task=mmlu_test) (LLaMA-Factory's"
            ) in err, err


def test_a_built_pair_edited_to_prefer_nothing_names_this_recipes_rebuild(workdir: Path):
    """validate of a dpo build whose first pair was edited so that rejected equals chosen: the build (of this recipe,
    with its val_size=0.5) removes such pairs."""
    write_ranking_data(workdir / "data")
    write_recipe(workdir / "d.yaml", DPO, model_name_or_path="tiny", dataset_dir="data", dataset="prefs_alpaca",
                 output_dir="saves/d")
    pipeline("build", "d.yaml", "val_size=0.5", cwd=workdir, as_typed=False)
    built = workdir / "data" / "build" / "prefs_alpaca" / "train.json"
    rows = json.loads(built.read_text(encoding="utf-8"))
    rows[0]["rejected"] = rows[0]["chosen"]
    built.write_text(json.dumps(rows), encoding="utf-8")
    err = refused("validate", "d.yaml", "val_size=0.5", cwd=workdir, as_typed=False)
    assert ("train.json:1:rejected: equals chosen: the pair states no preference; `make data RECIPE=d.yaml "
            "ARGS=val_size=0.5` (python -m pipeline build d.yaml val_size=0.5) removes such pairs") in err, err


def test_the_overrides_with_a_key_set_and_the_launcher_form():
    """rerun.with_values: the typed key replaced where it was typed, a key not typed added last; run_this(ranks=)
    the Makefile's NPROC form and the launcher it runs; env= both forms' variables; finished= train's
    --retrain-finished in the python -m form alone."""
    from pipeline.rerun import run_this, with_values

    assert with_values(("val_size=0", "max_steps=3"), val_size="0.1") == ("val_size=0.1", "max_steps=3")
    assert with_values(("max_steps=3",), zero_stage="0") == ("max_steps=3", "zero_stage=0")
    assert run_this("train", "r.yaml", ("max_steps=3",), ranks=2) == (
        "`make train NPROC=2 RECIPE=r.yaml ARGS=max_steps=3` (python -m pipeline.launch --num_gpus 2 --module pipeline "
        "train r.yaml max_steps=3)")
    # a finished run of the recipe is there: the python -m form trains it again as make's does (make's is the same)
    assert run_this("train", "r.yaml", ("max_steps=3",), finished=True) == (
        "`make train RECIPE=r.yaml ARGS=max_steps=3` (python -m pipeline train r.yaml --retrain-finished max_steps=3)")
    assert run_this("data", None, env=("HF_HUB_OFFLINE=0",)) == (
        "`HF_HUB_OFFLINE=0 make data` (HF_HUB_OFFLINE=0 python -m pipeline build RECIPE)")


def test_the_one_rank_zero3_notice_names_this_runs_plan_at_zero_stage_2(workdir: Path, recipe: Path, monkeypatch):
    """The notice train says as it starts (from the resolved recipe, as train resolves it): it said `make plan`."""
    from pipeline.recipe import resolve
    from pipeline.recipe.dsconfig import one_rank_zero3_notice

    monkeypatch.chdir(workdir)
    notice = one_rank_zero3_notice(resolve("r.yaml", ["output_dir=saves/x", "zero_stage=3"], command="plan", env={}))
    assert notice is not None and ("ZeRO 2, for which `make plan RECIPE=r.yaml ARGS='output_dir=saves/x zero_stage=2'` "
                                   "(python -m pipeline plan r.yaml output_dir=saves/x zero_stage=2) estimates the "
                                   "same memory per rank") in notice, notice
