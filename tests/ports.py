"""Launching several ranks on a free port without flaking: a port found free can be taken by another process
before the launcher binds it, so a launch that failed with "address already in use" is retried on a new port
(the clash is seen at start-up, before any work, so a retry changes nothing else).

A launch that runs past its timeout (ranks waiting on each other's collectives forever) ends as a failed
CompletedProcess holding every rank's stderr, each rank's Python stack where it hung first: subprocess.run's own
timeout kills only the launcher and raises TimeoutExpired without the output, leaving the ranks (its grandchildren)
running. Every launch of ranks in the tests (make NPROC>1, python -m pipeline.launch, the deepspeed launcher) runs
through here: run_to_end, or start_job + end_job for jobs that run side by side, stop_job for a Popen's overrun."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from typing import Callable

import psutil

from pipeline.runtime.dist import free_port

ATTEMPTS = 4
GONE_S = 10  # after the output ends: how long the job's processes get to be gone
STACKS_S = 15  # after the timeout: how long the ranks get to print their stacks (faulthandler) before SIGKILL


def port_taken(output: str) -> bool:
    text = output.lower()
    # the last: the launch's own check (pipeline.runtime.dist) found the port taken before torch tried to bind it
    return "address already in use" in text or "eaddrinuse" in text or "is already in use on this machine" in text


def start_job(command: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """subprocess.Popen(command, ...) for a job of several processes: in a session of its own, faulthandler on (a
    Python process that gets SIGABRT prints its stack to stderr), stdout and stderr captured as text (kwargs may
    redirect them, e.g. stderr=subprocess.STDOUT, or add stdin=subprocess.PIPE); end it with end_job."""
    env = {**(os.environ if env is None else env), "PYTHONFAULTHANDLER": "1"}
    kwargs = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kwargs}
    return subprocess.Popen(command, text=True, start_new_session=True, env=env, **kwargs)


def end_job(proc: subprocess.Popen, timeout: float | None = None,
            input: str | None = None) -> subprocess.CompletedProcess:
    """What the job of start_job wrote and its exit code, as subprocess.run gives them; past `timeout` every process
    of the job is stopped (stop_job) and the result's returncode is the signal's (negative), its stderr ending with a
    line that says so."""
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        out, err = stop_job(proc)
        err = f"{err or ''}\n[ports.run_to_end: timed out after {timeout} s; every process of the job was killed]\n"
        return subprocess.CompletedProcess(proc.args, proc.returncode or -signal.SIGKILL, out, err)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_to_end(command: list[str], timeout: float | None = None, env: dict[str, str] | None = None,
               input: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True, timeout=..., input=...) for a job of several
    processes: start_job, then end_job."""
    if input is not None:
        kwargs["stdin"] = subprocess.PIPE
    return end_job(start_job(command, env, **kwargs), timeout, input)


def stop_job(proc: subprocess.Popen) -> tuple[str, str]:
    """Every process of `proc`'s job signalled, SIGABRT (stacks) then SIGKILL; what they wrote. The job is `proc`,
    its session and every process below it, taken when the stop begins: a launcher may start its runner in a
    session of its own (pipeline.launch does, to relay signals), which a signal to `proc`'s session alone misses;
    its ranks would run on, holding the output pipes open."""
    members = _job(proc)  # before any dies: an orphan is no longer found below `proc`
    for sig, wait in ((signal.SIGABRT, STACKS_S), (signal.SIGKILL, None)):
        for member in members:
            with contextlib.suppress(psutil.Error):
                member.send_signal(sig)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            out = proc.communicate(timeout=wait)
            # the pipes close as a process exits, a moment before it is gone: wait for that (a busy machine
            # stretches the moment), so that nothing of the job runs once the result is back
            _, alive = psutil.wait_procs(members, timeout=GONE_S)
            for member in alive:  # one that outlived SIGABRT without holding the pipes
                with contextlib.suppress(psutil.Error):
                    member.kill()
            psutil.wait_procs(alive, timeout=GONE_S)
            return out
    raise AssertionError("unreachable: communicate without a timeout returns")


def _job(proc: subprocess.Popen) -> list[psutil.Process]:
    """`proc`'s descendants, deepest first (the ranks before the launchers that would notice them die)."""
    try:
        return list(reversed(psutil.Process(proc.pid).children(recursive=True)))
    except psutil.Error:
        return []


def run_on_free_port(command: Callable[[str], list[str]], port_env: str | None = None,
                     env: dict[str, str] | None = None, **kwargs) -> subprocess.CompletedProcess:
    """run_to_end(command(port), **kwargs), retried on a port clash; with `port_env`, the port is also that
    environment variable (make reads MASTER_PORT from its environment)."""
    for attempt in range(ATTEMPTS):
        port = str(free_port())
        run_env = env if port_env is None else {**(os.environ if env is None else env), port_env: port}
        proc = run_to_end(command(port), env=run_env, **kwargs)
        if proc.returncode == 0 or attempt == ATTEMPTS - 1 or not port_taken(proc.stdout + proc.stderr):
            return proc
    raise AssertionError("unreachable")
