"""The command a message gives for a run on several nodes launches the job the user launched (pipeline.launched):
its hostfile, or its nodes as node 0 types them, with the other nodes' NODE_RANK; and where that launch is unknown, no
single-node command but "as you launched this run". Driven as typed under the environment each launch gives the
ranks (WORLD_SIZE, DeepSpeed's LOCAL_SIZE and the variable pipeline.launch exports, set here by hand: no second host
is needed), from the pt recipe whose held-out document gives no window at cutoff_len (validate says train's
refusal, whose fix is `train ... val_size=0`; `make plan` gives plan the same variable:
tests/acceptance/test_make_variables.py). Failed before, each: `make train NPROC=2 RECIPE=pt.yaml
ARGS=val_size=0` (python -m pipeline build ... && python -m pipeline.launch --num_gpus 2 --module pipeline train
...), two ranks on one machine."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.launch import main
from tests.acceptance.harness import cli_env, link_makefile, pipeline, write_recipe
from tests.acceptance.test_pt_cli import _c4_like

BUILD = "python -m pipeline build pt.yaml val_size=0 && "


@pytest.fixture
def pt_recipe(workdir):
    """pt.yaml: 11 short documents to train on and 1 held out, which gives no window of cutoff_len + 1 tokens
    (tests/acceptance/test_pt_cli.py, on the tiny preset's GPT-2 vocabulary); no key asks for an evaluation, so
    holding out nothing is the fix."""
    link_makefile(workdir)
    _c4_like(workdir / "data", 12)
    write_recipe(workdir / "pt.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/pt",
                 stage="pt", dataset="c4_demo", template=None, cutoff_len=16, val_size=1)
    pipeline("build", "pt.yaml", cwd=workdir, as_typed=False)
    return workdir


@pytest.mark.parametrize("launch, command", [
    # make train NPROC=1 NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29501, on the second node: the
    # command as node 0 types it, the other node's NODE_RANK in words (it was this node's NODE_RANK=1, then "on every
    # node, with its NODE_RANK (0 on MASTER_ADDR)": right on this node alone)
    ("--nnodes%202%20--node_rank%201%20--master_addr%2010.0.0.1%20--master_port%2029501%20--num_gpus%201",
     "`make train NPROC=1 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29501 RECIPE=pt.yaml "
     f"ARGS=val_size=0` ({BUILD}python -m pipeline.launch --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 "
     "--master_port 29501 --num_gpus 1 --module pipeline train pt.yaml val_size=0) on node 0 (MASTER_ADDR 10.0.0.1), "
     "and the same with NODE_RANK=1 (--node_rank 1) on the other node"),
    # make train NPROC=1 HOSTFILE=hosts (two hosts over ssh)
    ("--hostfile%20hosts%20--num_gpus%201",
     "`make train NPROC=1 HOSTFILE=hosts RECIPE=pt.yaml ARGS=val_size=0` "
     f"({BUILD}python -m pipeline.launch --hostfile hosts --num_gpus 1 --module pipeline train pt.yaml val_size=0)"),
    # DeepSpeed's or torchrun's launcher typed directly on two nodes: the launch is not known
    (None, f"`{BUILD}python -m pipeline train pt.yaml val_size=0`, launched on 2 ranks as you launched this run "
           "(its nodes, its launcher)"),
])
def test_validate_on_two_nodes_names_the_launch_the_user_made(pt_recipe, launch, command):
    env = cli_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", LOCAL_SIZE="1",
                  **({} if launch is None else {"PYTHON_PIPELINE_LAUNCH": launch}))
    err = pipeline("validate", "pt.yaml", cwd=pt_recipe, expect=2, as_typed=False, env=env).stderr
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].endswith(f"which evaluates nothing: {command}"), err


@pytest.mark.parametrize("environ, command", [
    # one process, in a shell that exported the variable (copied from a rank's environment): no launcher gave this
    # process a WORLD_SIZE, so no launch is its
    ({"PYTHON_PIPELINE_LAUNCH": "--hostfile%20hosts%20--num_gpus%202"},
     f"`make train RECIPE=pt.yaml ARGS=val_size=0` ({BUILD}python -m pipeline train pt.yaml val_size=0)"),
    # torchrun's 2 ranks on one node in that shell: the variable's 4 ranks are another launch's
    ({"PYTHON_PIPELINE_LAUNCH": "--num_gpus%204", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0",
      "LOCAL_WORLD_SIZE": "2"},
     f"`make train NPROC=2 RECIPE=pt.yaml ARGS=val_size=0` ({BUILD}python -m pipeline.launch --num_gpus 2 --module "
     "pipeline train pt.yaml val_size=0)"),
])
def test_a_launch_left_in_the_environment_is_not_this_runs(pt_recipe, environ, command):
    """The variable names the launch of the process pipeline.launch started and of its ranks alone; found in another
    process's environment it is not that process's launch (failed before: `make train NPROC=2 HOSTFILE=hosts ...`
    for a one-process validate, `make train NPROC=4 ...` for a run of 2 ranks)."""
    err = pipeline("validate", "pt.yaml", cwd=pt_recipe, expect=2, as_typed=False, env=cli_env(**environ)).stderr
    said = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(said) == 1 and said[0].endswith(f"which evaluates nothing: {command}"), err


def test_launch_exports_the_options_it_was_given_to_the_ranks_of_a_no_ssh_node(monkeypatch):
    """pipeline.launch sets the variable to its options as given (not the --no_ssh form nodes.expand makes of them)
    before it starts DeepSpeed's runner, which passes its environment to the ranks it starts."""
    import pipeline.launch as launch
    import pipeline.nodes as nodes

    monkeypatch.setenv("PYTHON_PIPELINE_LAUNCH", "")  # put back after the test
    monkeypatch.setattr(nodes, "check_master", lambda *args: None)  # no node 0 to reach
    started = []
    monkeypatch.setattr(launch, "_run", lambda argv: started.append((argv, dict(launch.os.environ))) or 0)
    assert main(["--nnodes", "2", "--node_rank", "1", "--master_addr", "10.0.0.1", "--num_gpus", "4",
                 "--module", "pipeline", "train", "r.yaml"]) == 0
    (argv, environ), = started
    assert "--no_ssh" in argv
    assert environ["PYTHON_PIPELINE_LAUNCH"] == ("--nnodes%202%20--node_rank%201%20--master_addr%2010.0.0.1"
                                                 "%20--num_gpus%204")


def test_eval_of_an_empty_val_split_names_the_eval_on_the_runs_ranks(workdir):
    """eval's "the val split is empty" on 2 ranks (WORLD_SIZE=2, as `make eval NPROC=2` gives every rank; the split
    and its manifest emptied by hand: the build refuses an empty split and the rules a val_size that holds none out) names the eval on 2 ranks, built first
    in its python -m form as every val_size fix is, and says so before the ranks meet (failed before: `make eval
    RECIPE=r.yaml ARGS=val_size=0.1` (python -m pipeline eval r.yaml val_size=0.1), one rank, no build)."""
    link_makefile(workdir)
    write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    built = workdir / "data" / "build" / "tiny_sft"
    (built / "val.json").write_text("[]", encoding="utf-8")
    manifest = json.loads((built / "manifest.json").read_text(encoding="utf-8"))  # as if the build had made it
    manifest["splits"]["val"] = 0
    manifest["files"]["val.json"] = {"sha256": hashlib.sha256(b"[]").hexdigest(), "bytes": 2}
    (built / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    adapter = workdir / "saves" / "r" / "adapter"  # eval says "no trained adapter" first; never loaded here
    adapter.mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (adapter / name).write_text("{}", encoding="utf-8")
    err = pipeline("eval", "r.yaml", cwd=workdir, expect=2, env=cli_env(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"),
                   timeout=60).stderr
    assert err.splitlines() == [
        "error: the val split is empty: nothing to evaluate; set val_size > 0, e.g. `make eval NPROC=2 RECIPE=r.yaml "
        "ARGS=val_size=0.1` (python -m pipeline build r.yaml val_size=0.1 && python -m pipeline.launch --num_gpus 2 "
        "--module pipeline eval r.yaml val_size=0.1), or name an eval_dataset"], err


NO_SSH_2X2 = "--nnodes%202%20--node_rank%201%20--master_addr%2010.0.0.1%20--num_gpus%202"  # on its second node


@pytest.mark.parametrize("launch, local, resume", [
    # 2 nodes x 2 ranks, the checkpoint of 2 ranks: 1 a node, typed as node 0 does (it said `make train NPROC=2`,
    # two ranks on one machine, "or NPROC x NNODES = 2")
    (NO_SSH_2X2, "2", "`make train NPROC=1 NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 RECIPE=r.yaml` (python -m "
                      "pipeline.launch --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --num_gpus 1 --module pipeline "
                      "train r.yaml) on node 0 (MASTER_ADDR 10.0.0.1), and the same with NODE_RANK=1 (--node_rank 1) "
                      "on the other node"),
    # the hostfile's 2 hosts x 2 ranks
    ("--hostfile%20hosts%20--num_gpus%202", "2", "`make train NPROC=1 HOSTFILE=hosts RECIPE=r.yaml` (python -m "
                                                 "pipeline.launch --hostfile hosts --num_gpus 1 --module pipeline train "
                                                 "r.yaml)"),
    # launched without pipeline.launch: the count, and the launch as the user makes it
    (None, "2", "`python -m pipeline train r.yaml`, launched on 2 ranks as you launched this run (its nodes, its "
                "launcher)"),
    # one node of 4 ranks: NPROC=2 there, or on several nodes
    ("--num_gpus%204", "4", "`make train NPROC=2 RECIPE=r.yaml` (python -m pipeline.launch --num_gpus 2 --module "
                            "pipeline train r.yaml), or NPROC x NNODES = 2"),
])
def test_a_checkpoint_of_another_rank_count_is_resumed_on_this_runs_nodes(workdir, monkeypatch, launch, local,
                                                                            resume):
    """A job of 4 ranks resuming a checkpoint written by 2 (its global batch changed, so refused: world_change) is
    told the resume on 2 ranks launched as this job was, in the environment a rank of each launch has."""
    from pipeline.recipe import resolve
    from pipeline.train.world_change import problems, world_change

    link_makefile(workdir)
    write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                 per_device_train_batch_size=1, gradient_accumulation_steps=1)
    monkeypatch.chdir(workdir)
    environ = {"WORLD_SIZE": "4", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_SIZE": local,
               **({} if launch is None else {"PYTHON_PIPELINE_LAUNCH": launch})}
    for name in ("PYTHON_PIPELINE_LAUNCH", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    r = resolve("r.yaml", command="train")
    change = world_change({"world_size": 2, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 1},
                          (4, 1, 1), r)
    [said] = problems(change, Path("saves/r/checkpoint-2"), 0, stage="sft", asft=False, group_by_length=False,
                      offload_optimizer="none")
    assert said.endswith(f"or resume with 2 rank(s) ({resume}), or start a new run from saves/r/checkpoint-2/adapter "
                         "or saves/r/checkpoint-2/model"), said
