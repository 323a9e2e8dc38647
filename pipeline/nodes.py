"""Several nodes without ssh: each node starts its own launcher with its node rank (DeepSpeed's --no_ssh).

`python -m pipeline.launch --nnodes N --node_rank R --master_addr HOST [--master_port P] --num_gpus G
--module pipeline train RECIPE` (what `make train NNODES=N NODE_RANK=R MASTER_ADDR=HOST` runs) becomes
DeepSpeed's `--hostfile <generated> --no_ssh --node_rank R ...`: the generated hostfile lists N nodes of G
slots (the names are placeholders: with --no_ssh nobody connects to them; the ranks meet at
MASTER_ADDR:MASTER_PORT, where node 0's rank 0 serves torch's TCP store). Global ranks are
R * G + local rank, as in any DeepSpeed multi-node job.

Checked before anything starts, each an exit-2 message: MASTER_PORT is a port number and, where this
machine serves the master (a single-node launch, or node 0), nobody else listens on it (another job on the
default 29500 would otherwise fail every rank with torch's traceback); MASTER_ADDR is given; node 0 can bind
it (it must be an address of node 0's own machine); every other node reaches MASTER_ADDR:MASTER_PORT, and torch's
store answers there (not merely something that accepts connections), within PIPELINE_MASTER_WAIT seconds
(default 120: node 0 may be started a little later). Without that check a
node whose master never comes up would wait for torch's 30-minute store timeout.
"""
from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from pathlib import Path

from pipeline.errors import UserError
from pipeline.runtime.ports import bindable, port_in_use

DEFAULT_PORT = 29500  # DeepSpeed's default --master_port
WAIT_ENV = "PIPELINE_MASTER_WAIT"


def _take(argv: list[str], name: str) -> str | None:
    """Remove `--name V` or `--name=V` from argv; return V (None when absent)."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
            del argv[i:i + 2]
            return value
        if arg.startswith(name + "="):
            del argv[i]
            return arg.split("=", 1)[1]
    return None


def _peek(argv: list[str], name: str) -> str | None:
    copy = list(argv)
    return _take(copy, name)


def _int(value: str | None, what: str, default: int) -> int:
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{what} is {value!r}; expected a whole number") from None


def _port(argv: list[str]) -> int:
    port = _int(_peek(argv, "--master_port"), "MASTER_PORT (--master_port)", DEFAULT_PORT)
    if not 1 <= port <= 65535:
        raise UserError(f"MASTER_PORT (--master_port) is {port}; expected a TCP port 1..65535, e.g. "
                        f"MASTER_PORT={DEFAULT_PORT} (DeepSpeed's default)")
    return port


def check_port_free(port: int) -> None:
    if not bindable(port):
        raise UserError(port_in_use(port))


def _wait_s() -> float:
    text = os.environ.get(WAIT_ENV, "")
    try:
        wait = float(text) if text else 120.0
    except ValueError:
        wait = math.nan
    if not (math.isfinite(wait) and wait >= 0):
        raise UserError(f"{WAIT_ENV} (environment) is {text!r}; expected the seconds a node waits for the "
                        f"master, a number >= 0, e.g. {WAIT_ENV}=300")
    return wait


def expand(argv: list[str]) -> tuple[list[str], Path | None]:
    """DeepSpeed runner arguments for a node of a --no_ssh job (argv unchanged without --nnodes > 1), and
    the generated hostfile to delete afterwards."""
    argv = list(argv)
    nnodes = _int(_take(argv, "--nnodes"), "NNODES (--nnodes)", 1)
    node_rank_text = _take(argv, "--node_rank")
    port = _port(argv)
    if nnodes <= 1:
        if nnodes < 1:
            raise UserError(f"NNODES is {nnodes}; expected 1 or more")
        if node_rank_text not in (None, "", "0"):
            raise UserError(f"NODE_RANK is {node_rank_text} but NNODES is 1; set NNODES to the number of nodes")
        if "--hostfile" not in argv and "-H" not in argv:  # with a hostfile the master is its first host's
            check_port_free(port)
        return argv, None
    node_rank = _int(node_rank_text, "NODE_RANK (--node_rank)", -1)
    if not 0 <= node_rank < nnodes:
        raise UserError(f"NODE_RANK is {node_rank_text if node_rank_text is not None else 'not set'}; expected "
                        f"0..{nnodes - 1} for NNODES={nnodes} (0 on the node whose address is MASTER_ADDR)")
    if "--hostfile" in argv or "-H" in argv:
        raise UserError("NNODES and HOSTFILE are two ways to start the same job; give one: HOSTFILE (DeepSpeed "
                        "reaches the nodes over ssh/pdsh) or NNODES + NODE_RANK on every node (no ssh)")
    addr = _peek(argv, "--master_addr")
    if not addr:
        raise UserError(f"NNODES={nnodes} needs MASTER_ADDR: the address of node 0 (NODE_RANK=0) that every node "
                        "can reach, e.g. MASTER_ADDR=10.0.0.1")
    if _peek(argv, "--master_port") is None:
        argv = ["--master_port", str(port), *argv]
    slots = _int(_peek(argv, "--num_gpus"), "NPROC (--num_gpus)", 1)
    wait = _wait_s()
    check_master(addr, port, node_rank, nnodes, wait)
    hostfile = Path(tempfile.mkstemp(prefix="pipeline-hostfile-", suffix=".txt")[1])
    hostfile.write_text("".join(f"node{i} slots={slots}\n" for i in range(nnodes)), encoding="utf-8")
    return ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node_rank), *argv], hostfile


def check_master(addr: str, port: int, node_rank: int, nnodes: int, wait: float) -> None:
    """Node 0 must own MASTER_ADDR; the others must reach MASTER_ADDR:MASTER_PORT (waiting for node 0)."""
    where = f"MASTER_ADDR={addr} MASTER_PORT={port}"
    try:
        infos = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise UserError(f"{where}: the address does not resolve ({err.strerror}); give node 0's IP address or a "
                        "host name every node resolves") from None
    family, _, _, _, sockaddr = infos[0]
    if node_rank == 0:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((sockaddr[0], 0))  # any port: only whether the address is this machine's
            except OSError:
                raise UserError(f"{where}: NODE_RANK=0 serves the master, but {addr} is not an address of this "
                                "machine; run NODE_RANK=0 on the node MASTER_ADDR names") from None
        check_port_free(port)
        return
    deadline = time.monotonic() + wait
    answered = False  # something accepted the connection at least once
    while True:
        try:
            with socket.create_connection((sockaddr[0], port), timeout=min(5.0, max(wait, 0.1))):
                answered = True
            last = _store_answers(sockaddr[0], port, timeout=min(5.0, max(deadline - time.monotonic(), 1.0)))
            if last is None:
                return
        except OSError as err:
            last = err.strerror or type(err).__name__
        if time.monotonic() >= deadline:
            if answered:
                raise UserError(f"{where}: NODE_RANK={node_rank} of NNODES={nnodes}: something accepts connections "
                                f"there but it is not the job's master ({last}, waited {wait:g} s). Another "
                                f"service may use MASTER_PORT on {addr}, or a proxy answers for "
                                f"an address it cannot reach: choose a free MASTER_PORT on every node, check "
                                f"MASTER_ADDR; {WAIT_ENV}=<seconds> waits longer for node 0")
            raise UserError(f"{where}: NODE_RANK={node_rank} of NNODES={nnodes} could not reach the master within "
                            f"{wait:g} s ({last}). Start NODE_RANK=0 on {addr} (with the same MASTER_PORT), check "
                            f"that {addr} is reachable from this node and the port is open in the firewall; "
                            f"{WAIT_ENV}=<seconds> waits longer")
        time.sleep(0.5)


def _store_answers(host: str, port: int, timeout: float) -> str | None:
    """None when torch's TCP store (what node 0's rank 0 serves) answers at host:port, else why not.

    A bare TCP connect passes for anything that accepts it: another service on the port, or a proxy that
    accepts for addresses it cannot reach; the rank would then wait out torch's 30-minute timeout. A store
    client's handshake checks the protocol (wait_for_workers=False: it does not count as a worker). It runs in
    a child process because a client facing a silent peer blocks past its own timeout (for good) and prints C++
    traces; an interval timer armed once torch is imported ends it timeout + 1 s later (SIGALRM's default action,
    which no blocked C++ call holds off), so a probe of a silent port costs the import plus about its timeout,
    not the + 10 s the parent allows for the import on a slow machine."""
    import signal
    import subprocess
    import sys

    code = ("import signal, sys; from datetime import timedelta; from torch.distributed import TCPStore; "
            "signal.setitimer(signal.ITIMER_REAL, float(sys.argv[3]) + 1); "
            "TCPStore(sys.argv[1], int(sys.argv[2]), is_master=False, wait_for_workers=False, "
            "timeout=timedelta(seconds=float(sys.argv[3])))")
    try:
        done = subprocess.run([sys.executable, "-c", code, host, str(port), str(timeout)], capture_output=True,
                              text=True, timeout=timeout + 10, stdin=subprocess.DEVNULL)  # + torch's import
    except subprocess.TimeoutExpired:
        return "no answer to torch's store handshake"
    if done.returncode == 0:
        return None
    if done.returncode == -signal.SIGALRM:
        return "no answer to torch's store handshake"
    lines = [line for line in done.stderr.splitlines() if "Error" in line]
    return lines[-1].strip()[:200] if lines else f"torch's store handshake failed (exit {done.returncode})"
