"""One writer per output: an exclusive lock on a directory that a command writes (train's output_dir, a
dataset's build, merge's merged/), held for the command's lifetime.

The lock is `.<name>.lock` beside the directory, locked with flock(2): the kernel releases it on any exit,
a SIGKILL and an out-of-memory kill included, so a lock whose owner died is stale by construction and the
next run simply takes it. The file names its holder (pid, host, command, start time) so that a second run
can say which run holds it. It is removed on release; a killed holder leaves it behind, harmless (the next
holder takes it over). Beside, not inside, the directory: a run whose recipe turns out to be wrong has then
written nothing into output_dir, and `overwrite_output_dir` never deletes a live lock.

flock is advisory and per host on network file systems that do not forward it; the pipeline itself always
takes the lock, so two of its runs on one host never write the same directory.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from pipeline.errors import UserError


def lock_path(target: str | Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.lock"


def _holder(path: Path) -> str:
    """Who holds the lock, in words, from what the holder wrote into the lock file."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return (f"`{info['command']}` (pid {info['pid']} on host {info['host']}, started {info['started']})")
    except (OSError, ValueError, KeyError, TypeError):
        return "another run (it has not written its name yet)"


def _missing_parents(path: Path) -> list[Path]:
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        missing.append(parent)
    return missing[::-1]


def _in_the_way(path: Path) -> tuple[Path, str] | None:
    """(the path, what it is) of the first of `path` and its parents that exists but is no directory: a file, or a
    link to nothing, where a directory must go (`output_dir: notes.txt/run`); None when nothing is in the way."""
    for parent in [*reversed(path.parents), path]:
        if parent.is_symlink() and not parent.exists():
            return parent, "a symbolic link to nothing"
        if parent.exists() and not parent.is_dir():
            return parent, "a file"
    return None


def _try_lock(fd: int) -> bool:
    """flock without waiting: False when another open file holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        return False
    return True


# How long a run retries a lock it finds held before it calls it in use (_lock_within): longer than in_use's probe
# holds its shared lock (an open, a flock, a close), far shorter than a real holder's whole command.
PROBE_PATIENCE = 0.2  # seconds
_RETRY_EVERY = 0.01


def _lock_within(fd: int, seconds: float) -> bool:
    """_try_lock, tried again for up to `seconds`: a dry run's in_use probes a stale lock file with a shared lock for
    an instant, and a real run starting at that instant took the probe for a live holder and refused to start. A
    real holder keeps the lock for its command's lifetime: the retry only delays that refusal by `seconds`."""
    deadline = time.monotonic() + seconds
    while not _try_lock(fd):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_RETRY_EVERY)
    return True


def _cannot_write(target: Path, at: str | None, err: OSError) -> UserError:
    """The refusal of an output directory this user may not write (no write permission, a read-only or full disk,
    /proc), one message whether it is still to be created (its lock file, beside it, could not be) or already there
    and takes no new file (_probe): said before the model loads, not as a traceback from the first mkdir or as
    'resolved.yaml: cannot be written here' after the load."""
    where = f"{at}: " if at else ""
    verb = "written" if target.is_dir() else "created"
    return UserError(f"{where}{target} cannot be {verb}: {err.strerror} ({err.filename}); choose a directory this "
                     "user may write, or make that one writable")


def _blocked(target: Path, at: str | None, blocker: tuple[Path, str]) -> UserError:
    """The refusal of an output directory that cannot be created because a file (or a link to nothing) is where it
    or one of its parents must go (_in_the_way)."""
    where = f"{at}: " if at else ""
    return UserError(f"{where}{target} cannot be created: {blocker[0]} is {blocker[1]}, not a directory; move it away "
                     "or choose another directory")


def unwritable(target: str | Path, at: str | None = None) -> UserError | None:
    """The refusal `exclusive(target, ..., writes=True)` would give this user, found while leaving no trace: for
    `train --dry-run`, which writes only to a temporary folder and so must not create the lock beside output_dir (nor
    output_dir's missing parents, to hold it), yet can tell the user what the real run would meet. An existing
    `target` is only asked (os.access, and whether its file system is mounted read-only): a probe file would change
    the folder's mtime, which a dry run promises to leave alone; a missing one is probed where it would be created,
    the nearest existing parent, by a file without a name (_probe_unseen: a named one, as _probe makes, changed that
    folder's mtime, which make reads for the folders it watches; os.access alone says yes to root on /proc-like file
    systems that refuse new files). None: nothing stands in the way."""
    target = Path(target)
    blocker = _in_the_way(target)
    if blocker is not None:
        return _blocked(target, at, blocker)
    try:
        if target.is_dir():
            _may_write(target)
        else:
            _probe_unseen(next(p for p in target.absolute().parents if p.exists()))
    except OSError as err:
        return _cannot_write(target, at, err)
    return None


def _may_write(folder: Path) -> None:
    """OSError unless this user may write into the existing `folder` as far as its mode and mount say: EROFS ("Read-only
    file system") on a read-only mount, EACCES ("Permission denied") for a folder this user lacks write permission
    on. The mount is asked first: os.access answers a plain no on a read-only mount (access(2) fails with EROFS),
    which was reported as permission denied, sending the user to chmod a folder no chmod makes writable."""
    if os.statvfs(folder).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))


def _probe(folder: Path) -> None:
    """OSError unless this user may create files in the existing `folder`: _may_write, then a real file created and
    removed at once, since os.access says yes to anyone on /proc-like file systems that refuse new files."""
    _may_write(folder)
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=folder)
    except OSError as err:  # named by the folder, not by the probe's random name
        raise OSError(err.errno, err.strerror, str(folder)) from None
    os.close(fd)
    os.unlink(name)


def _in_use(target: Path, at: str | None, path: Path) -> str:
    """The refusal of `target`, whose lock file `path` another live run holds."""
    where = f"{at}: " if at else ""
    return (f"{where}{target} is in use by {_holder(path)}; two runs writing it would corrupt each other. Wait for "
            f"that run to finish (or stop it), or choose another directory. The lock is {path}")


def in_use(target: str | Path, at: str | None = None, job: str | None = None) -> str | None:
    """The refusal `exclusive(target)` would give because another live run holds the lock, found without taking it:
    for `train --dry-run`, which must not block the real run (pipeline.train.dryrun.real_run_problem), and for every
    rank's look before overwrite_cache's build (pipeline.__main__.refuse_before_build). No lock file: nobody holds it
    (a holder removes it on release). One there is a live holder's or one a killed run left: a shared lock asked for
    without waiting tells which, and is let go at once; the file is opened read-only, never created. A real run that
    tries the lock in that instant tries again (exclusive: _lock_within), so the probe never makes it refuse to start.
    `job`: this process's job (pipeline.launched.job_of); a holder that wrote the same is its own rank 0, which took
    the lock first, not another run. None: free, or this job's."""
    path = lock_path(target)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None if job is not None and _holder_job(path) == job else _in_use(Path(target), at, path)
        return None
    finally:
        os.close(fd)  # closing lets go of the shared lock, when it was granted
    return None


def _holder_job(path: Path) -> str | None:
    """The job the holder of the lock file `path` wrote (exclusive's `job`), read again for up to PROBE_PATIENCE
    while the holder has locked it but not yet written its name; None: none."""
    deadline = time.monotonic() + PROBE_PATIENCE
    while True:
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            return info.get("job") if isinstance(info, dict) else None
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return None
            time.sleep(_RETRY_EVERY)


def _probe_unseen(folder: Path) -> None:
    """_probe that leaves the folder as it was, mtime included: a file without a name (O_TMPFILE, Linux: ext4, xfs,
    btrfs, tmpfs) adds no entry to it. Where the file system (or platform) makes none, _probe, and the folder's
    times put back after it."""
    _may_write(folder)
    unnamed = getattr(os, "O_TMPFILE", None)
    if unnamed is not None:
        try:
            os.close(os.open(folder, unnamed | os.O_WRONLY, 0o600))
            return
        except OSError as err:  # EOPNOTSUPP (or EISDIR / EINVAL on older kernels): no unnamed files here
            if err.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise OSError(err.errno, err.strerror, str(folder)) from None
    times = folder.stat()
    try:
        _probe(folder)
    finally:
        with contextlib.suppress(OSError):
            os.utime(folder, ns=(times.st_atime_ns, times.st_mtime_ns))


def _is_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is the file at `path` now (not one its holder removed since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _remove_made(created: list[Path]) -> None:
    """The folders made only to hold a lock (`created`, outermost first), deepest first, if nothing else went there."""
    for parent in reversed(created):
        with contextlib.suppress(OSError):
            parent.rmdir()


def _release(fd: int, path: Path, created: list[Path]) -> None:
    """Let go of the lock `fd` holds on `path`: the file removed before the unlock (so that nobody locks a file that
    is about to go), then the folders made only to hold it (`created`), if nothing else went there."""
    with contextlib.suppress(OSError):
        os.unlink(path)
    os.close(fd)
    _remove_made(created)


def _never_taken(fd: int | None, path: Path, created: list[Path]) -> None:
    """Leave no trace of a lock this run gave up on (another run holds it, or Ctrl-C while retrying or waiting for
    it): the file at `path` is removed only when nobody holds it (taken here without waiting, then released as a
    holder does; a live holder's stays), and the folders made only to hold it (`created`) go when empty. A Ctrl-C in
    _lock_within's retry left those folders, and the lock file in them, behind."""
    if fd is None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDWR)
    try:
        free = fd is not None and _try_lock(fd) and _is_at(fd, path)
    except OSError:  # _try_lock closed it
        fd, free = None, False
    if free:
        _release(fd, path, created)
        return
    if fd is not None:
        os.close(fd)
    _remove_made(created)


@contextlib.contextmanager
def exclusive(target: str | Path, what: str, at: str | None = None, wait: bool = False,
              writes: bool = False, job: str | None = None) -> Iterator[Path]:
    """Hold the lock on `target` (a directory, existing or not) for the block; UserError when another live run
    holds it. `what` is the command in words (`train recipes/x.yaml`), written for whoever comes second;
    `at` says where `target` came from (`recipes/x.yaml:7: output_dir`). wait=True waits for the holder instead
    (saying so once): for work that is the same whoever does it, such as a rebuild that the other ranks of a job
    or a `make data` in another terminal may be doing already. writes=True: the command writes into `target`
    (train's output_dir, merge's and export's folders), so an existing one this user may not write is refused
    here too; a build may only read an up-to-date dataset in a read-only place. job: the job this process is a rank
    of (pipeline.launched.job_of), written beside its name so that the job's other ranks know the lock for their own
    (in_use)."""
    target = Path(target)
    path = lock_path(target)
    if writes and target.is_dir():
        try:
            _probe(target)
        except OSError as err:
            raise _cannot_write(target, at, err) from None
    created = _missing_parents(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
    except OSError as err:
        blocker = _in_the_way(path.parent)
        if blocker is not None:
            raise _blocked(target, at, blocker) from None
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not target.is_dir():
            # nowhere to write the directory itself either (a folder without write permission, a read-only disk,
            # a full one, /proc)
            raise _cannot_write(target, at, err) from None
        # an existing directory in a read-only place: a shared, already built dataset folder, which a run that
        # only reads needs no guard for, or (writes, probed above) an output folder this user may write inside a
        # folder they may not, where the lock has no place: the run goes on without it
        yield path
        return
    said, fd = False, None
    try:
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _lock_within(fd, PROBE_PATIENCE):
                if not wait:
                    raise UserError(_in_use(target, at, path))
                if not said:
                    print(f"{target}: waiting for {_holder(path)} to finish", file=sys.stderr, flush=True)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            # The previous holder may have removed the file between our open and our flock: then we locked an
            # orphan inode, and a third run could lock the new file. Only a lock on the file at `path` counts.
            if _is_at(fd, path):
                break
            os.close(fd)
            fd = None
    except BaseException:  # in use, or Ctrl-C while retrying or waiting: no trace of a lock never taken
        _never_taken(fd, path, created)
        raise
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": what,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **({"job": job} if job else {})}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode("utf-8"))
        yield path
    finally:
        _release(fd, path, created)



@contextlib.contextmanager
def holding(targets: Iterable[tuple[Path, str]], what: str, wait: bool = False, writes: bool = False,
            job: str | None = None) -> Iterator[None]:
    """The locks on every (directory, where its name came from) of `targets`, for the duration of the block
    (`pipeline.__main__.written_dirs` says which directories each command writes); wait, writes, job: see
    exclusive."""
    with contextlib.ExitStack() as stack:
        for target, at in sorted(set(targets)):
            stack.enter_context(exclusive(target, what, at, wait, writes, job))
        yield
