"""`python -m pipeline.launch [deepspeed launcher options] --module pipeline <command> RECIPE ...`

DeepSpeed's runner forwards signals only to multi-node (pdsh) jobs: on one node, a SIGTERM sent to it
alone (`kill PID`, `timeout`, a container stop) kills the runner and leaves the ranks training as
orphans that never save. This wrapper starts the runner in its own process group, passes SIGINT/SIGTERM
straight to the ranks (each saves a checkpoint and exits; see pipeline.train), and returns only when
every process of the job is gone. With a hostfile the runner itself is signalled: it relays to the nodes.
`--nnodes N --node_rank R` runs this node's part of a job without ssh (pipeline.nodes).
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _runner() -> list[str]:
    script = Path(sys.executable).with_name("deepspeed")
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def _targets(runner: subprocess.Popen, multi_node: bool) -> list[int]:
    """The ranks (the runner's grandchildren, below deepspeed.launcher.launch), or the runner for pdsh."""
    if multi_node:
        return [runner.pid]
    import psutil

    with contextlib.suppress(psutil.Error):
        return [rank.pid for child in psutil.Process(runner.pid).children() for rank in child.children()]
    return []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import UserError
    from pipeline.nodes import expand

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv, hostfile = expand(argv)  # --nnodes N --node_rank R: this node's part of a no-ssh job
    except UserError as err:
        for message in err.messages:
            print(f"error: {message}", file=sys.stderr)
        return 2
    try:
        return _run(argv)
    finally:
        if hostfile is not None:
            hostfile.unlink(missing_ok=True)


def _run(argv: list[str]) -> int:
    runner = subprocess.Popen([*_runner(), *argv], start_new_session=True)
    received: list[int] = []
    # With --no_ssh every node runs its own ranks below the runner, as on one node.
    remote = ("--hostfile" in argv or "-H" in argv) and "--no_ssh" not in argv

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        for pid in _targets(runner, remote):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    code = runner.wait()
    while _group_alive(runner.pid):  # ranks may still be saving after the runner returned
        time.sleep(0.2)
    if received:
        return 128 + received[0]
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
