"""Launching several ranks on a free port without flaking: a port found free can be taken by another process
before the launcher binds it, so a launch that failed with "address already in use" is retried on a new port
(the clash is seen at start-up, before any work, so a retry changes nothing else)."""
from __future__ import annotations

import subprocess
from typing import Callable

from pipeline.runtime.dist import free_port

ATTEMPTS = 4


def port_taken(output: str) -> bool:
    text = output.lower()
    # the last: the launch's own check (pipeline.runtime.dist) found the port taken before torch tried to bind it
    return "address already in use" in text or "eaddrinuse" in text or "is already in use on this machine" in text


def run_on_free_port(command: Callable[[str], list[str]], **kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(command(port), capture_output=True, text=True, **kwargs), retried on a port clash."""
    for attempt in range(ATTEMPTS):
        proc = subprocess.run(command(str(free_port())), capture_output=True, text=True, **kwargs)
        if proc.returncode == 0 or attempt == ATTEMPTS - 1 or not port_taken(proc.stdout + proc.stderr):
            return proc
    raise AssertionError("unreachable")
