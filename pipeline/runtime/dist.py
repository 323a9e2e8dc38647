"""The few distributed facts the trainer needs: launch environment, rank, barriers, sums over ranks.

Under the deepspeed launcher every rank gets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT;
a plain `python -m pipeline train` is one rank, so the same variables are filled in (with a free port)
before DeepSpeed initialises torch.distributed. On a machine without GPUs DeepSpeed's CPU accelerator
is used with the gloo backend.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import socket
import sys
import threading
from typing import Any, Callable, NoReturn, Sequence

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
    deepspeed_compat.quiet_deprecated_collectives()  # DeepSpeed's calls, not the user's: see there
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    deepspeed_compat.guard()
    if get_accelerator().device_name() == "cpu":
        share_cores()
        if os.environ.get("PIPELINE_DS_SHM_COMM") != "1":
            deepspeed_compat.skip_shm_build()  # gloo does the same reductions, without a JIT build
    deepspeed_compat.eager_muon()  # no torch.compile of DeepSpeed's (unused) Muon in every rank: see there
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


def initialized() -> bool:
    """torch.distributed is set up in this process (asked without importing torch: validate and plan never do)."""
    tdist = sys.modules.get("torch.distributed")
    return tdist is not None and tdist.is_available() and tdist.is_initialized()


def end_process(command: Callable[[], int]) -> NoReturn:
    """Run the command line (`command` returns the exit code) and end the process with its code.

    A process that never set up torch.distributed exits the usual way. One that did leaves without the
    interpreter's finalization: after a run that ended well, every rank meets at a barrier and the process groups
    are destroyed (`shutdown`); then, whatever the code, the interpreter's own exit steps run (non-daemon threads
    joined, atexit handlers, standard streams flushed) and os._exit ends the process with the code.

    Why: a gloo worker thread (pt_gloo_runloop) frees a finished collective's tensors after the rank that waited
    for it has moved on; a tensor that Python created needs the GIL to be freed, and a thread that asks for the GIL
    once the interpreter is finalizing is ended by pthread_exit inside that C++ destructor: std::terminate
    ("terminate called without an active exception"), SIGABRT, the rank's exit code lost (seen at the end of a
    two-rank ZeRO-3 run with both cores busy). Destroying the groups does not stop those threads while anything
    still holds a group, and DeepSpeed keeps a ZeRO-3 engine, its parameters and their groups for the life of the
    process (its forward-module stack, caches); without finalization there is no window left.

    A failing rank (an error message, a stop, a traceback) skips the barrier, which its peers may never reach, and
    leaves at once with its own code (1 after a traceback, as Python's).
    """
    try:
        code = int(command() or 0)
    except Exception:
        if not initialized():
            raise
        sys.excepthook(*sys.exc_info())
        code = 1
    if not initialized():
        sys.exit(code)
    if code == 0:
        shutdown()
    _leave(code)


def shutdown() -> None:
    """Every rank done, then the process groups destroyed: torch's (destroy_process_group) and DeepSpeed's
    references to them. The barrier keeps rank 0, which serves the store, from leaving while a peer still needs it.

    A peer that ended meanwhile (its own error, reported by it) fails the barrier: this rank's work is done, so
    that is a note, and the process still leaves with its own code.
    """
    try:
        barrier()
    except RuntimeError as err:  # torch.distributed.DistError is one
        print(f"note: rank {rank()}: a peer rank ended before the end-of-run barrier "
              f"({str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__})",
              file=sys.stderr)
        return
    deepspeed_compat.destroy_process_groups()


def _leave(code: int) -> NoReturn:
    """The interpreter's exit steps before finalization (threads, atexit, Python's and C's streams), then
    os._exit(code)."""
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # logging's flush, temporary directories, reporters: what an ordinary exit runs
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    _flush_c_streams()
    os._exit(code)


def _flush_c_streams() -> None:
    """C's stdio buffers, which exit() flushes and os._exit does not: what C / C++ code printed (NCCL_DEBUG's
    lines, an extension's printf) into stdout redirected to a file or a pipe, block-buffered there, was lost."""
    import ctypes

    with contextlib.suppress(Exception):  # a libc without fflush: nothing of C's to flush the usual way either
        ctypes.CDLL(None).fflush(None)


def rank() -> int:
    """This process's rank: torch.distributed's once the ranks have met, before that the launcher's RANK (0 for a
    plain process), so that what rank 0 alone says before init (train's retrain note) is said once, not per rank."""
    import torch.distributed as tdist

    return tdist.get_rank() if tdist.is_initialized() else int(os.environ.get("RANK") or 0)


def world_size() -> int:
    """The job's number of ranks: torch.distributed's once the ranks have met, before that the launcher's WORLD_SIZE
    (1 for a plain process), as rank() answers: before, it said 1 on every rank of a launched job until init, beside
    a rank() of 1 (a rank 1 of 1)."""
    import torch.distributed as tdist

    return tdist.get_world_size() if tdist.is_initialized() else int(os.environ.get("WORLD_SIZE") or 1)


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
    import torch.distributed as tdist

    if not (tdist.is_initialized() and tdist.get_world_size() > 1):
        return [float(v) for v in values]
    return all_sum_unread(values).tolist()


def all_sum_unread(values: Sequence[Any]) -> Any:
    """all_sum's collective (the same all-reduce of one float64 vector) on floats and 0-dim device tensors, left
    unread: a float64 tensor on the device. Why: a per-micro-batch number every rank must agree on (kto's KL
    estimate, the BCO baseline) then costs no host read (each stops the host until the device has drained); the
    values widen to float64 exactly, so the sums are all_sum's to the bit."""
    import torch
    import torch.distributed as tdist

    multi = tdist.is_initialized() and tdist.get_world_size() > 1
    # the collective's device with several ranks; alone, where the values already are (the CPU for plain floats:
    # no accelerator set up for numbers read right after)
    where = device() if multi else next((v.device for v in values if isinstance(v, torch.Tensor)), "cpu")
    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=where).reshape(()) for v in values])
    if multi:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on one (a signal seen by one rank stops all at the same step)."""
    return all_sum([1.0 if flag else 0.0])[0] > 0
