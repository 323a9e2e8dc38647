"""A recipe's relative paths, its own name included, are relative to the folder its command runs in (LLaMA-Factory's
semantics), and resolved.yaml records that folder (pipeline.recipe.started). A later command typed in another folder
must read the record from there, and the command a message gives must mean the same run where the user types it.
"""
from __future__ import annotations

import os

from tests.acceptance import harness
from tests.acceptance.harness import scratch_repo, write_data, write_recipe


def test_train_from_the_root_retrains_a_finished_run_trained_in_recipes(tmp_path, monkeypatch):
    """`cd recipes && python -m pipeline train x.yaml` recorded x.yaml; `make train RECIPE=recipes/x.yaml` from the
    root (here the command it runs, `train recipes/x.yaml --retrain-finished`) is the same recipe and the same
    output_dir (absolute), so it retrains that finished run from scratch. Failed before: x.yaml was compared from the
    root, so the run was another recipe's: exit 2, "it holds a finished run of x.yaml ... choose another output_dir"
    (and a root-level x.yaml would have been taken for it: tests/runtime/test_layout.py)."""
    from pipeline.recipe import resolve, resolved_yaml

    repo = scratch_repo(tmp_path / "repo")
    data = write_data(repo / "datasets")
    (repo / "recipes").mkdir()
    out = tmp_path / "runs" / "x"
    write_recipe(repo / "recipes" / "x.yaml", model_name_or_path="tiny", output_dir=str(out), dataset_dir=str(data),
                 max_steps=1)
    harness.pipeline("build", "recipes/x.yaml", cwd=repo, as_typed=False)
    # the finished run trained in recipes/: its resolved.yaml as train writes it there, and its results
    monkeypatch.chdir(repo / "recipes")
    out.mkdir(parents=True)
    (out / "resolved.yaml").write_text(resolved_yaml(resolve("x.yaml")), encoding="utf-8")
    (out / "all_results.json").write_text("{}", encoding="utf-8")
    monkeypatch.chdir(tmp_path)

    done = harness.pipeline("train", "recipes/x.yaml", "--retrain-finished", cwd=repo)
    assert (f"note: {out} holds a finished run of recipes/x.yaml that is out of date; training it again from "
            "scratch") in done.stderr.splitlines(), done.stderr
    assert (out / "resolved.yaml").read_text(encoding="utf-8").splitlines()[:2] == [
        "# resolved recipe: recipes/x.yaml", f"# started in: {os.path.realpath(repo)}"]
    assert (out / "adapter" / "adapter_model.safetensors").is_file() and (out / "all_results.json").is_file()


def test_a_message_typed_in_recipes_names_the_command_that_runs_there(tmp_path):
    """Typed in recipes/, the command a message gives is the python -m form alone, which trains the run the
    message is about (recipes/saves/y: output_dir is relative to the folder typed in). Failed before:
    "`make train RECIPE=y.yaml ARGS=max_steps=3`", which make can run only from the root, where y.yaml is no file
    (and RECIPE=recipes/y.yaml trains saves/y, another run). From the root both forms, as before."""
    repo = scratch_repo(tmp_path / "repo")
    write_data(repo / "datasets")
    (repo / "recipes").mkdir()
    write_recipe(repo / "recipes" / "y.yaml", model_name_or_path="tiny", dataset_dir="../datasets")
    err = harness.refused("eval", "y.yaml", "max_steps=3", cwd=repo / "recipes", as_typed=False)
    assert ("error: saves/y/adapter: no trained adapter to evaluate; `python -m pipeline train y.yaml "
            "max_steps=3` produces it") in err.splitlines(), err
    err = harness.refused("eval", "recipes/y.yaml", "max_steps=3", "dataset_dir=datasets", cwd=repo, as_typed=False)
    assert ("error: saves/y/adapter: no trained adapter to evaluate; `make train RECIPE=recipes/y.yaml "
            "ARGS='dataset_dir=datasets max_steps=3'` (python -m pipeline train recipes/y.yaml "
            "dataset_dir=datasets max_steps=3) produces it") in err.splitlines(), err
