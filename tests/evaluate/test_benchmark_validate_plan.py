"""validate, plan and make of LLaMA-Factory's eval recipe (`task: mmlu_test`, no dataset), and the one rule for task
names that deps and eval share.

validate checks the recipe and the task folder as eval reads it (its messages, exit 2) without loading a model; plan
says how eval will run (the keys it reads with their provenance, the model, the task's subjects and question counts,
the template); make validate builds no data. A task inherited through `extends` works for all of them, and for make
eval, where the Makefile's BENCHMARK_GOAL grep (a top-level `task:`) does not see it. The task folder is the
LLaMA-Factory-format MMLU folder tests/evaluate/test_choice_benchmarks.py writes.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from tests.acceptance.harness import (make, make_stages, pipeline, refused, refused_before_any_stage, scratch_repo,
                                      write_hf_checkpoint)
from tests.evaluate.test_choice_benchmarks import RECIPE, SUBJECTS, _csv, write_mmlu

COUNTS = {key: (len(info[2]["test"]), len(info[2]["dev"])) for key, info in SUBJECTS.items()}  # questions, dev rows


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A scratch repository with a tiny Qwen2 checkpoint (transformers' save_pretrained), the MMLU task folder, an
    eval recipe and one that extends it (its task inherited, not on a line of its own)."""
    root = scratch_repo(tmp_path_factory.mktemp("bench") / "repo")
    write_hf_checkpoint(root / "qwen", "qwen2", small_vocab=True, max_position_embeddings=1024, noise=0.5)
    write_mmlu(root / "evaluation")
    (root / "lf_eval.yaml").write_text(RECIPE.format(model="qwen", batch=4, save="saves/base"))
    (root / "child.yaml").write_text("extends: lf_eval.yaml\nsave_dir: saves/child\n")
    return root


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_make_validate_plan_and_eval_of_a_recipe_that_inherits_its_task(repo):
    """make validate: no build (a benchmark has no data), the task folder checked; make plan: how eval runs, nothing
    of training; make eval: the benchmark alone; deps failing (two recipes write the adapter): one message, validate's
    (BENCHMARK_GOAL's grep does not see an inherited task, so validate runs first and says it)."""
    done = make("validate", "RECIPE=child.yaml", cwd=repo)
    assert make_stages(done) == [("validate", "child.yaml")]
    questions, dev = sum(q for q, _ in COUNTS.values()), sum(d for _, d in COUNTS.values())
    assert f"task: OK (evaluation/mmlu (MMLU layout), split test: 3 subjects, {questions} questions; 2 shots per " \
           f"question, drawn from the subjects' dev rows ({dev} in all))" in done.stdout
    assert "recipe: OK (child.yaml, lf_eval.yaml; eval with task mmlu_test, model qwen, template qwen)" in done.stdout
    assert make_stages(make("validate", "RECIPE=child.yaml", cwd=repo)) == []  # up to date

    plan = make("plan", "RECIPE=child.yaml", cwd=repo).stdout
    rows = {line.split()[0]: line.split()[1:] for line in plan.splitlines() if line.strip()}
    assert rows["task"] == ['"mmlu_test"', "lf_eval.yaml:3"] and rows["n_shot"] == ["2", "lf_eval.yaml:5"]
    assert rows["save_dir"] == ['"saves/child"', "child.yaml:2"] and rows["template"] == ['"qwen"', "lf_eval.yaml:2"]
    for key, (name, category, _) in SUBJECTS.items():  # the subject table: key, name, category, questions, dev rows
        assert rows[key] == [*name.split(), category, *map(str, COUNTS[key])]
    assert "model: qwen, unless output_dir saves/child holds tuned weights" in plan
    assert "`make eval RECIPE=child.yaml` (python -m pipeline eval child.yaml)" in plan
    assert "[memory per rank" not in plan and "[deepspeed]" not in plan

    done = make("eval", "RECIPE=child.yaml", cwd=repo)
    assert make_stages(done) == [("eval", "child.yaml")]
    results = json.loads((repo / "saves" / "child" / "results.json").read_text())
    assert {key: len(letters) for key, letters in results.items()} == {k: q for k, (q, _) in COUNTS.items()}

    for name in ("a", "b"):
        (repo / f"{name}.yaml").write_text("model_name_or_path: qwen\ndataset: x\noutput_dir: saves/sft\n")
    (repo / "ambiguous.yaml").write_text("extends: lf_eval.yaml\nadapter_name_or_path: saves/sft\n")
    ours = refused_before_any_stage(make("eval", "RECIPE=ambiguous.yaml", cwd=repo, expect=2))
    assert len(ours) == 1 and "adapter_name_or_path: saves/sft is written by 2 recipes" in ours[0], ours


def test_validate_and_plan_refuse_a_broken_task_folder_with_evals_message(repo, tmp_path):
    """A missing folder, mapping.json or subject file, or n_shot past a subject's dev rows: exit 2, no traceback, one
    message naming the path (or the task line), the same eval gives, before a model is loaded."""
    (tmp_path / "qwen").symlink_to(repo / "qwen")
    write_mmlu(tmp_path / "evaluation")
    (tmp_path / "r.yaml").write_text(RECIPE.format(model="qwen", batch=4, save="saves/x"))
    archive = Path("evaluation", "mmlu", "mmlu.zip")  # as the recipe names it: task_dir evaluation

    def same_refusal(*overrides: str, as_typed: bool = False) -> str:  # validate as typed once, then in process
        said = {command: errors(refused(command, "r.yaml", *overrides, cwd=tmp_path,
                                        as_typed=as_typed and command == "validate"))
                for command in ("validate", "plan", "eval")}
        assert said["validate"] == said["plan"] == said["eval"] and len(said["eval"]) == 1, said
        return said["eval"][0]

    assert same_refusal("task_dir=nowhere", as_typed=True).startswith(
        "error: r.yaml:3:7: task: mmlu_test: no folder nowhere/mmlu")
    assert f"{archive}:data/dev/law_dev.csv: n_shot is 3 but subject 'law' has 2 dev rows" in same_refusal("n_shot=3")
    with zipfile.ZipFile(tmp_path / archive, "w") as z:  # algebra's test file left out
        z.writestr("data/dev/algebra_dev.csv", _csv(SUBJECTS["algebra"][2]["dev"]))
    assert same_refusal() == f"error: {archive}:data/test/algebra_test.csv: not found: mapping.json lists subject " \
                             "'algebra', and MMLU's test split of it is this file"
    (tmp_path / archive.parent / "mapping.json").unlink()
    assert same_refusal().startswith(f"error: {archive.parent / 'mapping.json'}: not found")
    assert not (tmp_path / "saves").exists()


def test_a_task_name_means_one_thing_to_deps_and_eval(repo):
    """parse_task is the one rule: a subject part with an underscore (LLaMA-Factory's split('_') would read the folder
    'high' and the split 'school') or a split datasets does not have is one message at the task key from deps, eval,
    validate and plan alike; a good name gives deps the files of the folder eval reads."""
    for task in ("high_school_test", "mmlu_dev"):
        said = {command: errors(refused(command, "lf_eval.yaml", f"task={task}", cwd=repo, as_typed=False))
                for command in ("deps", "eval", "validate", "plan")}
        assert len({tuple(messages) for messages in said.values()}) == 1 and len(said["eval"]) == 1, said
        assert said["deps"][0].startswith(f"error: command line override task={task}: task: given '{task}', "
                                          "expected <folder>_<split> with split one of test, validation, train")
    deps = pipeline("deps", "lf_eval.yaml", cwd=repo, as_typed=False).stdout.splitlines()
    assert "BENCHMARK=mmlu_test" in deps
    assert "BENCHMARK_FILES=evaluation/mmlu/mapping.json evaluation/mmlu/mmlu.zip" in deps
