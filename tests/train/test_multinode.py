"""Two "nodes" on one machine: each starts its own launcher with its node rank (DeepSpeed's --no_ssh form,
what `make train NNODES=2 NODE_RANK=r MASTER_ADDR=host` runs), and the result equals two ranks on one node,
bitwise (CPU, gloo). Plus the exit-2 messages of a node that cannot reach its master."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.nodes import expand
from pipeline.errors import UserError
from pipeline.runtime.log import read_log
from pipeline.train.run import train
from tests.ports import end_job, run_to_end, start_job
from tests.train.helpers import BASE_PT, check_resumed_run_is_the_uninterrupted_one, check_two_ranks_follow_one_rank

REPO = Path(__file__).resolve().parents[2]
CLASH = ("address already in use", "EADDRINUSE", "errno: 98")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return env


def _launch(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline.launch", *args, "--module", "pipeline"]


def _run_with_port_retry(start, attempts: int = 4) -> list[subprocess.CompletedProcess]:
    """start(port) -> finished processes. A port another program took first (the master binds it itself:
    nothing here frees a port and hopes) makes the master fail; then the whole job is retried on another."""
    for _ in range(attempts):
        port = random.randint(20000, 60000)
        procs = start(port)
        if not any(any(c in p.stderr + p.stdout for c in CLASH) for p in procs):
            return procs
    pytest.fail(f"every port tried was in use ({attempts} attempts)")


def _communicate(procs: list[subprocess.Popen], timeout: float) -> list[subprocess.CompletedProcess]:
    """Each job's result (tests/ports: past `timeout` it fails with every process's stack, none left running)."""
    return [end_job(p, timeout) for p in procs]


@pytest.mark.multirank
def test_two_one_rank_nodes_equal_two_ranks_on_one_node_bitwise(make_recipe, workdir):
    """The one-node run is also test_multirank's check for pt at ZeRO 2 (its one launch serves both): two ranks
    follow one rank of the same global batch; pt_stride 16 gives the val split 6 windows, so no padding copies on
    2 ranks and eval sees the same examples. 4 steps of 2 micro-batches: the nodes exchange gradients in every
    update after the first sync, and step 4 writes the checkpoint compared below. The one-node run's checkpoint-2
    is then resumed on one rank, 2 x GA 4 (pipeline.train.world_change: ZeRO 2's partitions of both ranks joined),
    and its steps 3-4 are the one-node run's to fp32 rounding (failed before: exit 2, "resume with 2 rank(s)")."""
    keys = dict(max_steps=4, warmup_steps=1, gradient_accumulation_steps=2, zero_stage=2, pt_stride=16, eval_steps=2,
                save_steps=2)
    one_rank = train(make_recipe(BASE_PT, name="one_rank", per_device_train_batch_size=4, **keys))
    make_recipe(BASE_PT, name="one_node", per_device_train_batch_size=2, **keys)
    make_recipe(BASE_PT, name="two_nodes", per_device_train_batch_size=2, **keys)
    env = _env()

    def one_node(port: int):
        proc = start_job(_launch(["--num_gpus", "2", "--master_port", str(port)]) + ["train", "one_node.yaml"],
                         cwd=workdir, env=env)
        return _communicate([proc], 300)

    def two_nodes(port: int):
        procs = [start_job(_launch(["--nnodes", "2", "--node_rank", str(r), "--master_addr", "127.0.0.1",
                                    "--master_port", str(port), "--num_gpus", "1"]) + ["train", "two_nodes.yaml"],
                           cwd=workdir, env=env)
                 for r in (0, 1)]
        return _communicate(procs, 300)

    reference = _run_with_port_retry(one_node)
    for procs in (reference, _run_with_port_retry(two_nodes)):
        for p in procs:
            assert p.returncode == 0, p.stderr[-3000:] + p.stdout[-2000:]
    check_two_ranks_follow_one_rank(one_rank.output_dir, workdir / "saves/one_node", reference[0].stderr, keys)
    a = load_file(workdir / "saves/one_node/model/model.safetensors")
    b = load_file(workdir / "saves/two_nodes/model/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = read_log(workdir / "saves/one_node/trainer_log.jsonl")
    log_b = read_log(workdir / "saves/two_nodes/trainer_log.jsonl")
    assert [r["step"] for r in log_b] == [1, 2, 3, 4]
    assert [(r["loss"], r.get("eval_loss")) for r in log_a] == [(r["loss"], r.get("eval_loss")) for r in log_b]
    ckpt = workdir / "saves/two_nodes/checkpoint-4"
    assert (ckpt / "rng" / "rank-0.safetensors").is_file() and (ckpt / "rng" / "rank-1.safetensors").is_file()
    shutil.copytree(workdir / "saves/one_node/checkpoint-2", workdir / "saves/resumed/checkpoint-2")
    train(make_recipe(BASE_PT, name="resumed", **{**keys, "per_device_train_batch_size": 2,
                                                  "gradient_accumulation_steps": 4, "resume_from_checkpoint": "latest"}))
    check_resumed_run_is_the_uninterrupted_one(workdir / "saves/one_node", workdir / "saves/resumed",
                                               "model/model.safetensors")


def _second_node(workdir, port: int) -> subprocess.CompletedProcess:
    """NODE_RANK=1 of two, master 127.0.0.1:port, waiting at most 1 s for it."""
    return run_to_end(_launch(["--nnodes", "2", "--node_rank", "1", "--master_addr", "127.0.0.1",
                               "--master_port", str(port), "--num_gpus", "1"]) + ["train", "x.yaml"],
                      cwd=workdir, env={**_env(), "PIPELINE_MASTER_WAIT": "1"}, timeout=120)


def test_a_node_without_a_reachable_master_exits_2(workdir):
    with __import__("socket").socket() as sock:  # a port nobody listens on: bound here, never listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        proc = _second_node(workdir, port)
    assert proc.returncode == 2, proc.stderr
    assert f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}: NODE_RANK=1 of NNODES=2 could not reach the master within 1 s" \
        in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1


def test_a_port_that_answers_but_is_no_torch_store_is_not_taken_for_the_master(workdir):
    """Another service on MASTER_PORT (or a proxy) accepts the connection; a bare connect took it for the master
    and the rank then waited out torch's 30-minute store timeout."""
    with __import__("socket").socket() as sock:  # listens, accepts, never speaks
        sock.bind(("127.0.0.1", 0))
        sock.listen(4)
        port = sock.getsockname()[1]
        proc = _second_node(workdir, port)
    assert proc.returncode == 2, proc.stderr
    assert (f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}: NODE_RANK=1 of NNODES=2: something accepts connections there "
            "but it is not the job's master (no answer to torch's store handshake, waited 1 s)") in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("error:") == 1


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2", "--node_rank", "1"], "NNODES=2 needs MASTER_ADDR: the address of node 0"),
    (["--nnodes", "2", "--node_rank", "2", "--master_addr", "127.0.0.1"], "NODE_RANK is 2; expected 0..1"),
    (["--nnodes", "2", "--master_addr", "127.0.0.1"], "NODE_RANK is not set; expected 0..1"),
    (["--nnodes", "two"], "NNODES (--nnodes) is 'two'; expected a whole number"),
    (["--nnodes", "2", "--node_rank", "0", "--master_addr", "192.0.2.1"],
     "NODE_RANK=0 serves the master, but 192.0.2.1 is not an address of this machine"),
    (["--nnodes", "2", "--node_rank", "1", "--master_addr", "no-such-host.invalid"], "the address does not resolve"),
    (["--nnodes", "2", "--node_rank", "0", "--master_addr", "127.0.0.1", "--hostfile", "h"],
     "NNODES and HOSTFILE are two ways to start the same job"),
    (["--node_rank", "1"], "NODE_RANK is 1 but NNODES is 1"),
])
def test_node_arguments_are_checked(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        expand([*args, "--num_gpus", "1", "--module", "pipeline", "train", "r.yaml"])


def test_node_arguments_become_deepspeeds_no_ssh_form(monkeypatch):
    monkeypatch.setattr("pipeline.nodes.check_master", lambda *a: None)
    monkeypatch.setattr("pipeline.nodes.check_port_free", lambda *a: None)  # 29500 may be another job's here
    argv, hostfile = expand(["--nnodes", "3", "--node_rank", "2", "--master_addr", "10.0.0.1", "--num_gpus", "4",
                             "--module", "pipeline", "train", "r.yaml"])
    try:
        assert argv[:5] == ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", "2"]
        assert argv[5:] == ["--master_port", "29500", "--master_addr", "10.0.0.1", "--num_gpus", "4", "--module",
                            "pipeline", "train", "r.yaml"]
        assert hostfile.read_text() == "node0 slots=4\nnode1 slots=4\nnode2 slots=4\n"
    finally:
        hostfile.unlink()
    assert expand(["--num_gpus", "2", "train"]) == (["--num_gpus", "2", "train"], None)  # one node: unchanged


def test_make_passes_the_node_variables():
    """`make train NNODES=2 NODE_RANK=1 MASTER_ADDR=h MASTER_PORT=p` launches through pipeline.launch with them."""
    out = subprocess.run(["make", "-s", "--no-print-directory", "NNODES=2", "NODE_RANK=1", "MASTER_ADDR=10.0.0.1",
                          "MASTER_PORT=29600", "--eval=show-launch: ; @echo $(LAUNCH)", "show-launch"],
                         cwd=REPO, capture_output=True, text=True, timeout=60, env=_env())
    assert out.returncode == 0, out.stderr
    assert " ".join(out.stdout.split()).endswith(
        "-m pipeline.launch --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 29600 --num_gpus 1 "
        "--module pipeline")
    plain = subprocess.run(["make", "-s", "--no-print-directory", "--eval=show-launch: ; @echo $(LAUNCH)",
                            "show-launch"], cwd=REPO, capture_output=True, text=True, timeout=60, env=_env())
    assert plain.stdout.split()[-2:] == ["-m", "pipeline"]  # one node, one rank: a plain process
