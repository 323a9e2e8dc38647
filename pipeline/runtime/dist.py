"""The few distributed facts the trainer needs: launch environment, rank, barriers, sums over ranks.

Under the deepspeed launcher every rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
a plain `python -m pipeline train` is one rank, so the same variables are filled in (with a free port)
before DeepSpeed initialises torch.distributed. On a machine without GPUs DeepSpeed's CPU accelerator
is used with the gloo backend.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Sequence

from pipeline.runtime import deepspeed_compat


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_launch_env() -> None:
    """Give a single plain process the environment the deepspeed launcher would have set. An empty variable
    counts as unset: make passes its empty MASTER_ADDR / MASTER_PORT defaults through the environment."""
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        if not os.environ.get(name):
            os.environ[name] = value
    if not os.environ.get("MASTER_PORT"):
        os.environ["MASTER_PORT"] = str(free_port())
        _CHOSEN_PORT.append(os.environ["MASTER_PORT"])


# The port ensure_launch_env picked (a free port is free only until someone else binds it): init() may replace it.
_CHOSEN_PORT: list[str] = []


def _port_taken(err: BaseException) -> bool:
    text = str(err).lower()
    return "address already in use" in text or "eaddrinuse" in text


def share_cores() -> int | None:
    """CPU ranks started side by side on one machine split its cores between them; returns each one's threads.

    Why: each rank's torch would otherwise run as many threads as the machine has cores, so N ranks put N
    threads on every core; every op's parallel region then waits for threads the scheduler has parked, which
    costs most where ops are many and small (measured: tiny copies 100x slower). torchrun does the same by
    default (OMP_NUM_THREADS=1 per rank); DeepSpeed's launcher only with --bind_cores_to_rank. An
    OMP_NUM_THREADS the user set is kept, and so is one rank per machine."""
    local = int(os.environ.get("LOCAL_SIZE") or 1)  # ranks of this node, set by the deepspeed launcher
    if local <= 1 or os.environ.get("OMP_NUM_THREADS"):
        return None
    import torch

    threads = max(1, len(os.sched_getaffinity(0)) // local)
    torch.set_num_threads(threads)
    return threads


def init(timeout_s: int | None = None) -> None:
    """torch.distributed through DeepSpeed, with the accelerator's backend (nccl on CUDA, gloo on CPU).

    `timeout_s` (the recipe's ddp_timeout) bounds how long a rank waits in a collective; None: torch's default.
    """
    ensure_launch_env()
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed_compat.guard()
    if get_accelerator().device_name() == "cpu":
        share_cores()
        if os.environ.get("PIPELINE_DS_SHM_COMM") != "1":
            deepspeed_compat.skip_shm_build()  # gloo does the same reductions, without a JIT build
    extra: dict[str, Any] = {}
    if timeout_s is not None:
        import datetime

        extra["timeout"] = datetime.timedelta(seconds=timeout_s)
    for attempt in range(5):
        try:
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(), verbose=False,
                                       **extra)
            return
        except Exception as err:
            if not _port_taken(err):
                raise
            if attempt == 4 or os.environ["MASTER_PORT"] not in _CHOSEN_PORT:
                # the user's port (the launcher checked it was free; someone took it since): a mistake to fix by
                # choosing another, not a bug
                from pipeline.errors import UserError
                from pipeline.runtime.ports import port_in_use

                raise UserError(port_in_use(os.environ["MASTER_PORT"])) from None
            # a port we picked ourselves (one plain process) was taken between the pick and the bind: pick again
            os.environ["MASTER_PORT"] = str(free_port())
            _CHOSEN_PORT.append(os.environ["MASTER_PORT"])


def rank() -> int:
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_initialized() else 0


def world_size() -> int:
    import torch.distributed as tdist

    return tdist.get_world_size() if tdist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    import torch.distributed as tdist

    if tdist.is_initialized() and tdist.get_world_size() > 1:
        tdist.barrier()


def device() -> Any:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().current_device_name()


def all_sum(values: Sequence[float]) -> list[float]:
    """Element-wise sum over ranks (float64, so token counts stay exact)."""
    import torch
    import torch.distributed as tdist

    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return [float(v) for v in values]
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device())
    tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor.tolist()


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a signal seen by one rank stops all at the same step)."""
    return all_sum([1.0 if flag else 0.0])[0] > 0
