"""The launcher's own arguments (`make train NPROC=N` / `NNODES=...` go through `python -m pipeline.launch`):
a master port that is taken or not a port, and a PIPELINE_MASTER_WAIT that is not a number, are one exit-2
message each before any rank starts, instead of a traceback from every rank."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Iterator

import pytest

from tests.ports import run_to_end
from tests.reliability.rel_helpers import BASE, PYTHON, Result, assert_user_error, clean_env, make_project, run_cli


def launch(args: list[str], cwd: Path, **env: str) -> Result:
    """`python -m pipeline.launch ARGS --module pipeline train r.yaml`, as `make train NPROC=2` runs it (a hang: the
    stacks of every process, none left running: tests/ports.run_to_end)."""
    proc = run_to_end([PYTHON, "-m", "pipeline.launch", *args, "--module", "pipeline", "train", "r.yaml"],
                      cwd=cwd, env=clean_env(**env), timeout=120)
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port someone else's job listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("0.0.0.0", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj", BASE)


@pytest.mark.parametrize("nodes", [[], ["--nnodes", "2", "--node_rank", "0", "--master_addr", "127.0.0.1"]],
                         ids=["one-node", "node-0"])
def test_a_master_port_in_use_is_one_message(project: Path, taken_port: int, nodes: list[str]):
    result = launch([*nodes, "--master_port", str(taken_port), "--num_gpus", "2"], project)
    assert_user_error(result, f"MASTER_PORT {taken_port} is already in use on this machine",
                      "set MASTER_PORT (--master_port) to a free port, e.g. MASTER_PORT=")
    assert not (project / "out").exists()


@pytest.mark.parametrize("port", ["99999", "0", "-1"])
def test_a_master_port_out_of_range_is_one_message(project: Path, port: str):
    result = launch(["--master_port", port, "--num_gpus", "2"], project)
    assert_user_error(result, f"MASTER_PORT (--master_port) is {port}; expected a TCP port 1..65535",
                      "e.g. MASTER_PORT=29500")


@pytest.mark.parametrize("wait", ["abc", "-5", "nan"])
def test_a_master_wait_that_is_not_seconds_is_one_message(project: Path, wait: str):
    result = launch(["--nnodes", "2", "--node_rank", "1", "--master_addr", "127.0.0.1", "--num_gpus", "1"],
                    project, PIPELINE_MASTER_WAIT=wait)
    assert_user_error(result, f"PIPELINE_MASTER_WAIT (environment) is '{wait}'; expected the seconds a node waits",
                      "e.g. PIPELINE_MASTER_WAIT=300")


def test_a_port_taken_after_the_launchers_check_is_one_message(project: Path, taken_port: int):
    """The rank's own bind (dist.init) is the backstop: the port may be taken between the check and the bind,
    and a plain run takes MASTER_PORT from the environment."""
    assert run_cli(["build", "r.yaml"], project).code == 0
    result = run_cli(["train", "r.yaml"], project, MASTER_PORT=str(taken_port))
    assert_user_error(result, f"MASTER_PORT {taken_port} is already in use on this machine", strict_lines=False)
    assert not (project / "out").exists()


def test_an_error_every_rank_finds_is_printed_once(tmp_path: Path):
    """Both ranks resolve the recipe and find the same problem: it was printed once per rank (8 times on 8 GPUs)."""
    project = make_project(tmp_path / "proj", BASE + "learning_rate: 0\n")
    result = launch(["--num_gpus", "2"], project)
    assert_user_error(result, "r.yaml:8:16: learning_rate: given 0, expected a number > 0 and <= 1",
                      strict_lines=False)
    assert len(result.errors) == 1, result.err[-3000:]
