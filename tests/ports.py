"""Launching several ranks on a free port without flaking: a port found free can be taken by another process
before the launcher binds it, so a launch that failed with "address already in use" is retried on a new port
(the clash is seen at start-up, before any work, so a retry changes nothing else).

A launch that runs past its timeout (ranks waiting on each other's collectives forever) ends as a failed
CompletedProcess holding every rank's stderr, each rank's Python stack where it hung first: subprocess.run's own
timeout kills only the launcher and raises TimeoutExpired without the output, leaving the ranks (its grandchildren)
running."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Callable

from pipeline.runtime.dist import free_port

ATTEMPTS = 4
STACKS_S = 15  # after the timeout: how long the ranks get to print their stacks (faulthandler) before SIGKILL


def port_taken(output: str) -> bool:
    text = output.lower()
    # the last: the launch's own check (pipeline.runtime.dist) found the port taken before torch tried to bind it
    return "address already in use" in text or "eaddrinuse" in text or "is already in use on this machine" in text


def run_to_end(command: list[str], timeout: float | None = None, env: dict[str, str] | None = None,
               **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True, timeout=...) for a job of several processes: the job
    runs in a session of its own; past `timeout` each of its processes gets SIGABRT (with faulthandler on, a
    Python process prints its stack to stderr), then SIGKILL, and the result is a CompletedProcess whose returncode
    is the signal's (negative) and whose stderr ends with a line saying so."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env, **kwargs)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = _stopped(proc)
        err = f"{err}\n[ports.run_to_end: timed out after {timeout} s; every process of the job was killed]\n"
        return subprocess.CompletedProcess(command, proc.returncode or -signal.SIGKILL, out, err)
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _stopped(proc: subprocess.Popen) -> tuple[str, str]:
    """Every process of `proc`'s session signalled, SIGABRT (stacks) then SIGKILL; what they wrote."""
    for sig, wait in ((signal.SIGABRT, STACKS_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            return proc.communicate(timeout=wait)
    raise AssertionError("unreachable: communicate without a timeout returns")


def run_on_free_port(command: Callable[[str], list[str]], **kwargs) -> subprocess.CompletedProcess:
    """run_to_end(command(port), **kwargs), retried on a port clash."""
    for attempt in range(ATTEMPTS):
        proc = run_to_end(command(str(free_port())), **kwargs)
        if proc.returncode == 0 or attempt == ATTEMPTS - 1 or not port_taken(proc.stdout + proc.stderr):
            return proc
    raise AssertionError("unreachable")
