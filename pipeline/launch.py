"""`python -m pipeline.launch [deepspeed launcher options] --module pipeline <command> RECIPE ...`

DeepSpeed's runner forwards signals only to multi-node (pdsh) jobs: on one node, a SIGTERM sent to it
alone (`kill PID`, `timeout`, a container stop) kills the runner and leaves the ranks training as
orphans that never save. This wrapper starts the runner in its own process group, passes SIGINT/SIGTERM
straight to the ranks (each saves a checkpoint and exits; see pipeline.train), and returns only when
every process of the job is gone. With a hostfile the runner itself is signalled: it relays to the nodes.
`--nnodes N --node_rank R` runs this node's part of a job without ssh (pipeline.nodes).

Signals come in pairs (`timeout ... make train` signals make's group, then make signals its child; a
scheduler plus make do the same), so the handler must survive being re-entered: psutil is imported before
any handler is installed (an import interrupted by a second signal leaves a half-initialised module), and
the handler never raises. Whatever goes wrong, the job's process group is signalled and waited for: a
launcher that died first would leave the ranks (in their own session) training with nobody to stop them.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil  # here, not in the signal handler: see the module docstring


def _runner() -> list[str]:
    script = Path(sys.executable).with_name("deepspeed")
    return [str(script)] if script.exists() else [sys.executable, "-m", "deepspeed.launcher.runner"]


def _targets(runner: subprocess.Popen, multi_node: bool) -> list[int]:
    """The ranks (the runner's grandchildren, below deepspeed.launcher.launch), or the runner for pdsh."""
    if multi_node:
        return [runner.pid]
    with contextlib.suppress(psutil.Error):
        return [rank.pid for child in psutil.Process(runner.pid).children() for rank in child.children()]
    return []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _wait_for_group(pgid: int) -> None:
    """Until every process of the job is gone: ranks may still be saving after the runner returned."""
    while _group_alive(pgid):
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> int:
    from pipeline.errors import REPORTED_ENV, UserError, print_errors
    from pipeline.launched import LAUNCH_ENV, encode
    from pipeline.nodes import expand

    argv = list(sys.argv[1:] if argv is None else argv)
    # the ranks inherit how they were launched (every node's: see pipeline.launched), for the commands messages give
    os.environ[LAUNCH_ENV] = encode(launcher_options(argv))
    try:
        argv, hostfile = expand(argv)  # --nnodes N --node_rank R: this node's part of a no-ssh job
    except UserError as err:
        print_errors(err)
        return 2
    with tempfile.TemporaryDirectory(prefix="pipeline-errors-") as reported:
        os.environ[REPORTED_ENV] = reported  # the ranks inherit it: an error every rank finds is printed once
        try:
            return _run(argv)
        finally:
            if hostfile is not None:
                hostfile.unlink(missing_ok=True)


def launcher_options(argv: list[str]) -> list[str]:
    """The options before `--module` (the launcher's, as given: --nnodes / --hostfile, not what nodes.expand makes
    of them); all of argv when there is no --module."""
    return argv[:argv.index("--module")] if "--module" in argv else list(argv)


def _run(argv: list[str]) -> int:
    runner = subprocess.Popen([*_runner(), *argv], start_new_session=True)
    received: list[int] = []
    # With --no_ssh every node runs its own ranks below the runner, as on one node.
    remote = ("--hostfile" in argv or "-H" in argv) and "--no_ssh" not in argv

    def forward(signum: int, _frame: object) -> None:
        """Never raises (the launcher must outlive the ranks); without ranks to reach (still starting, or
        psutil failed) the runner's whole group gets the signal, so no signal is lost."""
        received.append(signum)
        try:
            targets = _targets(runner, remote)
            for pid in targets:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
            if targets:
                return
        except Exception as err:  # os.write: print() may be re-entered by the next signal and raise
            with contextlib.suppress(OSError):
                os.write(2, f"launcher: could not find the ranks ({err}); signalling the job's process group\n"
                         .encode())
        with contextlib.suppress(OSError):
            os.killpg(runner.pid, signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    try:
        code = runner.wait()
    except BaseException:  # a bug here must not orphan the job: stop it (the ranks save) and wait for it
        with contextlib.suppress(OSError):
            os.killpg(runner.pid, signal.SIGTERM)
        _wait_for_group(runner.pid)
        raise
    _wait_for_group(runner.pid)
    if received:
        return 128 + received[0]
    return code if code >= 0 else 128 - code


if __name__ == "__main__":
    sys.exit(main())
