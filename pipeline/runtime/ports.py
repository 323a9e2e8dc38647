"""Whether a TCP port is free for a job's master, and the message when it is not.

Shared by the launcher (pipeline/nodes.py checks before any rank starts) and the ranks (pipeline/runtime/dist.py
turns torch's EADDRINUSE into the same message when the port was taken after that check)."""
from __future__ import annotations

import socket


def bindable(port: int) -> bool:
    """Whether this machine's master could listen on `port`. Every address, as torch's store binds; with
    SO_REUSEADDR, as it does, so a finished run's connections (TIME_WAIT) do not count as in use."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def port_in_use(port: int | str) -> str:
    """The message for a master port someone else holds, with a free one to use instead."""
    start = int(port)
    free = next((p for p in range(start + 1, min(start + 100, 65536)) if bindable(p)), None)
    example = f", e.g. MASTER_PORT={free}" if free else ""
    return (f"MASTER_PORT {port} is already in use on this machine (another job's master?); set MASTER_PORT "
            f"(--master_port) to a free port{example}")
