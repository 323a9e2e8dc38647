"""Atomic file writes: a crash or a full disk never leaves a half-written file in place of a good one.

Temp files and folders live beside their target and carry the writer's host and pid in their names
(`.train.json.<host>.<pid>.XXXX.tmp`, `.a.tmp-<host>-<pid>-XXXX`), so the next write of the same target
removes what a killed writer left behind without touching a live writer's work. A full disk becomes a
UserError naming the target (the CLI prints it and exits 2); the previous file or folder is unchanged.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from pipeline.errors import UserError

_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:32] or "host"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create private (0600/0700) entries; the results get the modes a plain open()/mkdir() gives.
_MASK = _umask()
_FILE_MODE = 0o666 & ~_MASK
_DIR_MODE = 0o777 & ~_MASK


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _sync(handle: Any, path: Path) -> None:
    """Flush and fsync `handle` (a temp file for `path`): a full disk shows up here at the latest."""
    handle.flush()
    os.fsync(handle.fileno())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale(parent: Path, pattern: re.Pattern[str]) -> None:
    """Delete leftovers of dead writers on this host (`pattern` captures the pid)."""
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            match = pattern.fullmatch(entry.name)
            if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


class DiskFull(UserError):
    """disk_full_error's message: an enclosing atomic_dir (export() around save_hf and write_json) restates it for
    its own target, so the user reads the folder they asked for, not a temp name inside it."""


def disk_full(err: BaseException) -> bool:
    """A write failed because the disk (or the user's quota) is full."""
    if isinstance(err, DiskFull) or isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(err)  # safetensors reports the OS error inside its own exception type
    return "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text


def disk_full_error(path: Path) -> DiskFull:
    free = ""
    with contextlib.suppress(OSError):
        free = f" ({shutil.disk_usage(path.parent).free / 1e6:,.1f} MB free there)"
    return DiskFull(f"{path}: no space left on device while writing it{free}; nothing was replaced (the previous "
                     f"{path.name}, if any, is unchanged). Free some space or write elsewhere, then run again")


@contextlib.contextmanager
def _writable(path: Path) -> Iterator[None]:
    """Creating `path`'s temp file or folder (or its parents): a read-only file system or a folder the user may not
    write is a UserError naming `path`, not a traceback about a temp name."""
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise UserError(f"{path}: cannot be written here ({err.strerror}: {err.filename or path.parent}); nothing "
                        "was changed. Make the folder writable, or choose another output_dir / export_dir") from None


def _file_leftovers(path: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(path.name)}\.{_HOST}\.(\d+)\.[^.]+\.tmp")


def _dir_leftovers(path: Path) -> re.Pattern[str]:
    # `..x.tmp-...`: what an atomic_dir nested in this one's temp directory left beside it (merge does that)
    return re.compile(rf"\.+{re.escape(path.name)}\.(?:tmp|old)-{_HOST}-(\d+)(?:-.*)?")


def remove_leftovers(path: str | Path) -> None:
    """Remove what killed writers of `path` left beside it (for a target that is up to date, so not rewritten)."""
    path = Path(path)
    _restore_dead_writers_old(path)
    for pattern in (_file_leftovers(path), _dir_leftovers(path)):
        _remove_stale(path.parent, pattern)


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """Yield a file object for a temp file beside `path`; on success fsync and rename it over `path`."""
    path = Path(path)
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path.parent, _file_leftovers(path))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            _sync(handle, path)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if disk_full(err):
            raise disk_full_error(path) from None
        raise


def write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    with atomic_write(path) as handle:
        json.dump(obj, handle, indent=indent, ensure_ascii=False, allow_nan=False)
        handle.write("\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_write(path) as handle:
        handle.write(text)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directory entries in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # the file system cannot
        return False
    raise OSError(code, os.strerror(code), str(b))


def _libc_renameat2() -> Any:
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def replace_dir(new: str | Path, path: str | Path, aside: str | Path) -> None:
    """Put the complete directory `new` in place of `path` so that `path` is, at every instant, either its old
    or its new complete version, a SIGKILL or power loss included.

    Where the file system can swap two names atomically (Linux, renameat2 RENAME_EXCHANGE: ext4, xfs, btrfs,
    tmpfs), `new` and `path` are swapped and the old version, now under the temp name, is deleted. Elsewhere
    the old version is first renamed to `aside` (which must carry the writer's host and pid): a crash between
    the two renames leaves `path` missing and the whole old version in `aside`, and the next writer or reader
    of `path` (`restore_aside`) puts it back.
    """
    new, path, aside = Path(new), Path(path), Path(aside)
    if not path.exists():
        os.replace(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new, ignore_errors=True)  # the old version, under the temp name: a leftover if killed now
    else:
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(path, aside)
        os.replace(new, path)
        shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(path.parent)


def restore_aside(path: str | Path, aside: Iterable[Path]) -> None:
    """After a crash between the two renames of a non-atomic replace_dir: `path` is missing and its previous
    version waits whole in one of `aside` (a dead writer's): put it back."""
    path = Path(path)
    for candidate in aside:
        if path.exists() or path.is_symlink():
            return
        with contextlib.suppress(OSError):
            os.replace(candidate, path)


def _restore_dead_writers_old(path: Path) -> None:
    pattern = re.compile(rf"\.{re.escape(path.name)}\.old-{_HOST}-(\d+)")
    with contextlib.suppress(OSError):
        dead = [Path(e.path) for e in os.scandir(path.parent) if (m := pattern.fullmatch(e.name))
                and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))]
        restore_aside(path, sorted(dead))


def _plain_mode(path: Path) -> None:
    """Give `path` the mode a plain open() gives when it was created more private than that.

    safetensors' save_file (0.8) writes through a private temp file, so every weight file (merged/, adapter/,
    model/) came out 0600: unreadable to a teammate or to a server running as another user, while the
    config.json beside it was readable."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode | _FILE_MODE != mode:
        with contextlib.suppress(OSError):  # not ours to change (a hard link to another user's file)
            os.chmod(path, mode | _FILE_MODE)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside `path`; on success it replaces `path` (see replace_dir).

    A crash leaves only a `.<name>.tmp-*` folder, never a half-filled `path` (the next atomic_dir of the same
    path removes it), and `path` is always either the old or the new complete directory.
    """
    path = Path(path)
    with _writable(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        _restore_dead_writers_old(path)
        _remove_stale(path.parent, _dir_leftovers(path))
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_HOST}-{os.getpid()}-", dir=path.parent))
    try:
        os.chmod(tmp, _DIR_MODE)
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file() and not child.is_symlink():
                with open(child, "rb") as handle:
                    _sync(handle, child)
                _plain_mode(child)
        replace_dir(tmp, path, path.with_name(f".{path.name}.old-{_HOST}-{os.getpid()}"))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(err):
            raise disk_full_error(path) from None
        raise


def sha256_file(path: str | Path) -> str:
    """sha256 of a file read in 1 MiB blocks (manifests of builds and checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
