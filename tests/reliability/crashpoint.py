"""`python -m tests.reliability.crashpoint N OPS_FILE ARGS...`: run `python -m pipeline ARGS...` and SIGKILL the
process right before its N-th file-system mutation inside the current directory (N = 0: never). With
CRASHPOINT_PAUSE=<marker> it creates the marker there and waits to be killed from outside instead; with
CRASHPOINT_PAUSE_AFTER_LOG=<marker> a training run pauses after its first log record until the marker is removed
(a signal sent meanwhile lands at that phase).

A crash can only be observed between two file-system operations, so killing the process before each of
them in turn is a systematic way to hit every intermediate state a real `kill -9`, OOM kill or power loss
can leave: half-written temp files, a renamed-away old directory, a checkpoint without its manifest.
The operations of the run (index, operation, path) are written to OPS_FILE as JSON when it ends normally,
so a test can pick N among all of them or among those of one phase (e.g. a checkpoint save).
"""
from __future__ import annotations

import atexit
import builtins
import io
import json
import os
import runpy
import signal
import sys
import time

_ROOT = os.getcwd()
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _ours(path: object) -> bool:
    """Only the project's files count (not torch's or DeepSpeed's caches elsewhere)."""
    if isinstance(path, int) or path is None:
        return True  # an fd or dir_fd-relative operation: one of ours (rmtree, fsync)
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    return not os.path.isabs(text) or os.path.abspath(text).startswith(_ROOT + os.sep)


def pause(marker: str, until_removed: bool) -> None:
    """Create `marker` (the test's sign that the phase is reached) and wait: until the test removes it, or
    forever (the test kills the process). No timing: the test acts at the phase on any machine speed."""
    fd = os.open(marker + ".part", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    os.replace(marker + ".part", marker)
    while not until_removed or os.path.exists(marker):
        time.sleep(0.005)


def pause_after_log_record(marker: str) -> None:
    """Pause a training run right after its first trainer_log.jsonl record (optimizer step 1 done, before the
    run checks for a stop request) until the test removes `marker`: a signal sent meanwhile stops it at step 1."""
    from pipeline.runtime.log import TrainLog

    original = TrainLog.write

    def write(self, record):
        original(self, record)
        if not os.path.exists(marker + ".done"):
            open(marker + ".done", "w").close()
            pause(marker, until_removed=True)
    TrainLog.write = write


def install(target: int) -> list[tuple[int, str, str]]:
    """Count this process's file-system mutations inside the current directory from now on; SIGKILL it right
    before the `target`-th (0: never). Returns the list the operations are recorded in."""
    ops: list[tuple[int, str, str]] = []

    def tick(name: str, path: object) -> None:
        if not _ours(path):
            return
        ops.append((len(ops) + 1, name, os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else ""))
        if len(ops) == target:
            if os.environ.get("CRASHPOINT_PAUSE"):  # stop here and let the test kill from outside
                pause(os.environ["CRASHPOINT_PAUSE"], until_removed=False)
            os.kill(os.getpid(), signal.SIGKILL)

    def wrap(module: object, name: str, is_write=lambda *a, **k: True, at=lambda *a, **k: a[0] if a else
             k.get("path") or k.get("file")) -> None:
        original = getattr(module, name)

        def wrapped(*args, **kwargs):
            if is_write(*args, **kwargs):
                tick(name, at(*args, **kwargs))
            return original(*args, **kwargs)
        setattr(module, name, wrapped)

    for name in ("replace", "rename", "unlink", "remove", "mkdir", "rmdir", "fsync", "truncate"):
        wrap(os, name)
    wrap(os, "open", lambda path, flags, *a, **k: bool(flags & _WRITE_FLAGS))
    opened = lambda file, mode="r", *a, **k: any(c in mode for c in "wax+")  # noqa: E731
    wrap(builtins, "open", opened)
    io.open = builtins.open  # pathlib and os.fdopen go through io.open
    import pipeline.io

    wrap(pipeline.io, "_exchange", at=lambda a, b: b)  # the atomic swap of two directories (renameat2)
    return ops


def main() -> None:
    target = int(sys.argv[1])
    ops_file = sys.argv[2]
    sys.argv = ["pipeline", *sys.argv[3:]]
    ops = install(target)
    if os.environ.get("CRASHPOINT_PAUSE_AFTER_LOG"):
        pause_after_log_record(os.environ["CRASHPOINT_PAUSE_AFTER_LOG"])

    def save() -> None:
        with open(ops_file + ".part", "w", encoding="utf-8") as handle:
            json.dump(ops, handle)
        os.replace(ops_file + ".part", ops_file)

    if ops_file != "-":
        atexit.register(save)
    runpy.run_module("pipeline", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
