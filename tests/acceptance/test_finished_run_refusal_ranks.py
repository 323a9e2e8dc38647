"""A finished run's refusal, for a run of several ranks, names the command that trains it again with as many ranks
(rerun.run_this's launcher form), where `make` reads no pipeline Makefile: the user launched
`python -m pipeline.launch --num_gpus 2 --module pipeline train r.yaml`, and the python -m form alone would train
the finished run again on one rank (another global batch: per_device_train_batch_size x world_size).

In process (a launch of two ranks, each importing torch and DeepSpeed, would be seconds): the recipe resolved as a
rank of a two-rank launch resolves it (WORLD_SIZE=2 from the launcher), then train's check_output_dir, the refusal
train asks first. Golden: the launcher command as tests/acceptance/test_run_this_named_cli.py and the Makefile's
NPROC spell it. Failed before: `python -m pipeline train r.yaml --retrain-finished logging_steps=2`, one rank."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.recipe import resolve
from pipeline.recipe.started import header
from pipeline.train.run import check_output_dir
from tests.acceptance.harness import write_recipe


def test_a_finished_run_of_two_ranks_is_trained_again_with_two(workdir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(workdir)  # no Makefile here: the python -m form alone (pipeline.rerun.make_runs_here)
    write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    run = workdir / "saves/r"
    run.mkdir(parents=True)
    (run / "resolved.yaml").write_text("\n".join(header("r.yaml")) + "\n", encoding="utf-8")  # as train writes it
    (run / "all_results.json").write_text(json.dumps({"train_loss": 1.0}), encoding="utf-8")
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    r = resolve("r.yaml", ["logging_steps=2"], command="train", env=env)
    with pytest.raises(UserError) as err:
        check_output_dir(r, None)
    [said] = err.value.messages
    again = ("`python -m pipeline.launch --num_gpus 2 --module pipeline train r.yaml --retrain-finished logging_steps=2`"
             " does so without an edit")
    assert again in said, said
