"""Review h199: units for what make all says once (notices.AFTER_VALIDATE)."""
from __future__ import annotations

import json
import os

from pipeline.recipe import notices


def _recipe(model: str) -> dict:
    return {"model_name_or_path": model, "task": None}


def test_train_after_validate_says_the_notices_of_a_model_validate_could_not_read(tmp_path, monkeypatch):
    """make runs a recipe's validate before its upstream's training (and before a hub model is downloaded), so
    validate reads no config.json and says none of the notices that need it; train, which then has the model, says
    them. A model validate had read is not said again."""
    stamp = tmp_path / "validate"
    stamp.write_text("")
    os.utime(stamp, ns=(10**18, 10**18))
    model = tmp_path / "merged"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    monkeypatch.setenv(notices.AFTER_VALIDATE, str(stamp))
    os.utime(model / "config.json", ns=(2 * 10**18, 2 * 10**18))  # written by the upstream after validate ran
    assert notices.says_recipe_notices(_recipe(str(model)), "train")
    os.utime(model / "config.json", ns=(10**17, 10**17))  # there when validate ran
    assert not notices.says_recipe_notices(_recipe(str(model)), "train")
    assert notices.says_recipe_notices(_recipe(str(model)), "validate")


def test_a_stamp_that_is_not_there_leaves_the_notices_to_train(tmp_path, monkeypatch):
    monkeypatch.setenv(notices.AFTER_VALIDATE, str(tmp_path / "no-stamp"))
    assert notices.says_recipe_notices(_recipe("qwen3-tiny"), "train")
    monkeypatch.delenv(notices.AFTER_VALIDATE)
    assert notices.says_recipe_notices(_recipe("qwen3-tiny"), "train")


def test_an_eval_recipes_eval_says_the_notices_where_no_validate_did(tmp_path, monkeypatch):
    """An eval recipe (do_train: false: LLaMA-Factory's nlg_eval predict recipe) has no train: `python -m pipeline
    eval` typed alone is its only stage and says the recipe's notices (failed before: none, as for eval after a
    train); after make's validate (PIPELINE_AFTER_VALIDATE, the Makefile sets it for eval under NO_TRAIN) it does
    not say them again. eval of a trained recipe follows train, which said them."""
    stamp, model = tmp_path / "validate", tmp_path / "merged"
    stamp.write_text("")
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    os.utime(model / "config.json", ns=(10**17, 10**17))
    os.utime(stamp, ns=(10**18, 10**18))
    eval_recipe = {**_recipe(str(model)), "do_train": False}
    assert notices.says_recipe_notices(eval_recipe, "eval")
    monkeypatch.setenv(notices.AFTER_VALIDATE, str(stamp))
    assert not notices.says_recipe_notices(eval_recipe, "eval")
    monkeypatch.delenv(notices.AFTER_VALIDATE)
    assert not notices.says_recipe_notices({**eval_recipe, "do_train": True}, "eval")


def test_the_dry_run_goal_is_told_as_a_dry_run(tmp_path):
    """`make dry-run` runs `train RECIPE --dry-run` (Makefile): the command beside it must not be a real training.
    The make form is given where make reads the pipeline's Makefile (here a link to it, as in a checkout's root);
    elsewhere (recipes/, a folder outside the checkout) the python -m form alone, which means the same run there."""
    from pipeline.rerun import run_this
    from tests.acceptance.harness import link_makefile

    assert run_this("dry-run", "t.yaml", ("max_steps=3",)) == "`python -m pipeline train t.yaml --dry-run max_steps=3`"
    assert run_this("data", None) == "`python -m pipeline build RECIPE`"
    link_makefile(tmp_path)  # the recipe tests' working folder
    assert run_this("dry-run", "recipes/t.yaml", ("max_steps=3",)) == (
        "`make dry-run RECIPE=recipes/t.yaml ARGS=max_steps=3` (python -m pipeline train recipes/t.yaml --dry-run "
        "max_steps=3)")
    assert run_this("dry-run", None) == "`make dry-run` (python -m pipeline train RECIPE --dry-run)"
    assert run_this("data", "r.yaml") == "`make data RECIPE=r.yaml` (python -m pipeline build r.yaml)"


def test_an_interrupted_runs_checkpoint_is_merged_by_its_own_recipe(tmp_path, monkeypatch):
    """A run stopped before its end has checkpoint-N/ and no adapter/: merge, eval and chat then take
    adapter_name_or_path (runtime.layout.trained_weights), step N itself, so the rule's 'they use the final adapter'
    is false there; train still writes into the folder it starts from. Once adapter/ is there, merge is refused."""
    from pipeline.recipe.rules.core import Context
    from pipeline.recipe.rules.outputs import adapter_is_no_checkpoint_of_this_run

    monkeypatch.chdir(tmp_path)
    step = tmp_path / "saves/r/checkpoint-5/adapter"
    step.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (step / name).write_text("{}")

    def refused(command: str) -> bool:
        values = {"adapter_name_or_path": "saves/r/checkpoint-5", "output_dir": "saves/r"}
        return bool(adapter_is_no_checkpoint_of_this_run(Context(values, {}, "r.yaml", command)))

    assert [refused(c) for c in ("merge", "eval", "chat", "train")] == [False, False, False, True]
    final = tmp_path / "saves/r/adapter"
    final.mkdir()
    (final / "adapter_config.json").write_text("{}")
    assert [refused(c) for c in ("merge", "eval", "chat", "train")] == [True, True, True, True]


def test_a_model_written_while_validate_ran_is_not_counted_as_read(tmp_path, monkeypatch):
    """Under `make -j` an upstream may write the model while validate runs, after validate looked: the stamp then
    holds validate's start (the Makefile's validate rule touches it with -r from a file made before validate), and a
    config.json of that same time counts as unread (train says the notices). Failed before: the stamp was touched
    when validate ended, and a config.json written before that end counted as read."""
    from pathlib import Path

    rule = Path(__file__).resolve().parents[2].joinpath("Makefile").read_text().split("$(STAMPS)/validate:", 1)[1]
    commands = rule.split("\n\n", 1)[0].splitlines()[1:]
    assert [c.strip() for c in commands] == ["@touch $@.start", "$(PY) -m pipeline validate $(RECIPE) $(PREP_ARGS)",
                                             "@touch -r $@.start $@ && rm -f $@.start"]
    stamp, model = tmp_path / "validate", tmp_path / "merged"
    stamp.write_text("")
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    monkeypatch.setenv(notices.AFTER_VALIDATE, str(stamp))
    for path in (stamp, model / "config.json"):
        os.utime(path, ns=(10**18, 10**18))
    assert notices.says_recipe_notices(_recipe(str(model)), "train")
