"""What every rank of a launched job would say alike is said once, by rank 0, also before the ranks meet.

pipeline.runtime.dist.rank() answered 0 on every rank until torch.distributed was initialised, so rank 0's lines
said before that (train's "holds a finished run ... training it again", the model loader's "model: preset ...")
came once per rank: `python -m pipeline.launch --num_gpus 2 --module pipeline train r.yaml --retrain-finished` showed
each twice (measured before the change). Golden: the lines as written by hand, counted in the launched job's stderr.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.launched import first_rank
from pipeline.model.weights import note
from pipeline.runtime import dist
from tests.acceptance.harness import PYTHON, cli_env, pipeline, write_recipe
from tests.ports import run_on_free_port


def test_rank_before_the_ranks_meet_is_the_launchers(monkeypatch: pytest.MonkeyPatch, capsys):
    import torch.distributed

    # before the ranks meet (an earlier in-process run of this test worker may have left a group of one set up)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    # rank 1 of 2, the launcher's, as torch.distributed will say (world_size said 1 before init: rank 1 of 1)
    assert (dist.rank(), dist.world_size(), dist.is_main(), first_rank()) == (1, 2, False, False)
    note("model: said by rank 0 alone")
    monkeypatch.delenv("RANK")  # a plain process: rank 0 of one
    monkeypatch.delenv("WORLD_SIZE")
    assert (dist.rank(), dist.world_size(), dist.is_main(), first_rank()) == (0, 1, True, True)
    note("model: said by rank 0 alone")
    assert capsys.readouterr().err == "model: said by rank 0 alone\n"


@pytest.mark.slow
@pytest.mark.multirank
def test_two_ranks_retraining_a_finished_run_say_each_note_once(workdir: Path):
    write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                 max_steps=1)
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    pipeline("train", "r.yaml", cwd=workdir)
    proc = run_on_free_port(lambda port: [
        PYTHON, "-m", "pipeline.launch", "--master_port", port, "--num_gpus", "2", "--module", "pipeline", "train", "r.yaml",
        "--retrain-finished"], cwd=workdir, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    assert lines.count("note: saves/r holds a finished run of r.yaml that is out of date; training it again from "
                       "scratch") == 1, proc.stderr[-3000:]
    assert lines.count("model: preset 'tiny' = random weights (seed 7); for trained weights set model_name_or_path "
                       "to a directory with config.json + model.safetensors") == 1, proc.stderr[-3000:]
