"""Results kept beside a build, so that the next command need not compute them again: a split's item counts
(pipeline.data.counts: plan and validate would tokenize the whole split) and validate's verdict on the built rows
(pipeline.data.check: its row checks read and check every row). The storage, the parts every key shares, and the
bound on what is kept.

Each result is one small JSON file, `<dataset_dir>/build/<the first dataset>/counts/<kind>-<digest of its key>.json`
(kind: the split of a count, `check` for validate's verdict), holding its key beside it, written atomically
(pipeline.io) and read back only when its key is the one the command gives now. Every key holds:
- files: the built files the result was computed from, each as [dataset, file name, sha256 (the manifest's, or the
  file's own), size, mtime_ns, inode, ctime_ns]: a rebuild or an edit after the build misses, an edit in place to
  the same size with its mtime set back too (the ctime, which no user sets, moves on every write);
- code: the sha256 of SOURCES (every source whose change could change a result) and the versions of LIBRARIES, so
  an upgrade that tokenizes or checks differently misses.
A command writes a result once: not again when this process read or wrote the same record, or the file on disk
holds it already. Bounded: when a result is kept, the kept results whose built files are no longer those on disk
(a rebuild or an edit: they can never be read again) are removed, and of the rest only the CAP most recently kept
stay; a rebuild replaces the build folder, counts/ with it. Never an error: a miss is the old path, and a folder that
cannot be read or written (a read-only dataset folder), or a file another process removes meanwhile, keeps or removes
nothing, silently. Only counts and verdicts are kept, never code or objects (JSON, no pickle).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline.data.args import NOT_A_KEY, DataArgs
from pipeline.data.built import built_dir, file_stamp
from pipeline.errors import UserError
from pipeline.io import write_json
from pipeline.launched import first_rank

FORMAT = 3  # 3: a file's ctime in its key
FOLDER = "counts"
CAP = 64  # kept results per build folder whose built files are current (one per setting tried)
# Every source a kept result depends on, as globs under pipeline/: the data library (templates, the tokenizers and
# the files they read, the length policy, packing, pt windows, the row checks and their schemas) and every module it
# imports from outside it (tests/data/test_kept.py checks this list against the imports): pipeline.model.config's
# PRESETS decide which models use GPT-2's tokenizer, pipeline.model.hub which folder a hub id's tokenizer is read from.
SOURCES = ("data/*.py", "data/schema/*.json", "errors.py", "io.py", "launched.py", "library_warnings.py", "names.py",
           "rerun.py", "model/config.py", "model/expert_lora.py", "model/families.py", "model/hub.py",
           "model/quant_layout.py", "model/safetensors_header.py")
LIBRARIES = ("tiktoken", "tokenizers")  # what encodes text into ids: another version may encode differently
# DataArgs keys that decide how the items are ordered, batched or loaded, never how many there are: a plan with
# another batch size still finds the count. Everything else is in the key, so a new key misses rather than lies.
ORDER_ONLY = frozenset({"per_device_train_batch_size", "per_device_eval_batch_size", "group_by_length",
                        "disable_shuffling", "dataloader_num_workers", "preprocessing_num_workers"})
_NAME = re.compile(r"[a-z]+-[0-9a-f]{32}\.json")  # a kept result (a writer's temp file starts with a dot)
_ROOT = Path(__file__).resolve().parent.parent  # the pipeline package


def source_files() -> list[Path]:
    """The files SOURCES names."""
    return sorted({path for pattern in SOURCES for path in _ROOT.glob(pattern) if path.is_file()})


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of source_files and the LIBRARIES' versions."""
    digest = hashlib.sha256()
    for path in source_files():
        digest.update(path.relative_to(_ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    for library in LIBRARIES:
        with contextlib.suppress(PackageNotFoundError):
            digest.update(f"{library}=={version(library)}\0".encode())
    return digest.hexdigest()


def file_entry(dataset: str, path: Path, sha256: str | None) -> list[Any]:
    """A built file as a key holds it (see the module's docstring)."""
    info = path.stat()
    return [dataset, path.name, sha256, *file_stamp(info)]



def tokenizer_identity(tokenizer: Any) -> list[Any]:
    """What the token ids of a text depend on: Tokenizer.cache_key, the ids placed by id, and the contents of every
    file it was read from (read_from: a top-level tokenizer.model too, which Tokenizer.files, what exports copy, lacks;
    each hashed once per process: pipeline.data.load.sha256_once). The same in every process: cache_key's added
    tokens are a frozenset, whose order (and repr) follows the process's string hash seed, so they are sorted (a repr
    missed in every next command, and wrote a file each)."""
    from pipeline.data.load import sha256_once

    name, new_tokens, added = tokenizer.cache_key
    files = [[Path(f).name, sha256_once(Path(f))] for f in tokenizer.read_from if Path(f).is_file()]
    return [str(name), list(new_tokens), sorted(added), tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id,
            bool(tokenizer.split_special_tokens), files]


def settings(data: DataArgs) -> dict[str, Any]:
    """Every DataArgs key but ORDER_ONLY's, as plain JSON."""
    import dataclasses

    keys = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)
            if not f.metadata.get(NOT_A_KEY) and f.name not in ORDER_ONLY}
    return json.loads(json.dumps(keys, default=repr))


def kept_file(dataset_dir: str | Path, kind: str, key: dict[str, Any]) -> Path:
    """Where the result of `key` is kept: in the build folder of its first file's dataset (a rebuild replaces the
    folder, and what it kept with it), named by the key's digest."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return built_dir(dataset_dir, key["files"][0][0]) / FOLDER / f"{kind}-{digest}.json"


_known: dict[str, Any] = {}  # the records this process read or wrote, by file: written once
_FAILED = (OSError, ValueError, IndexError, KeyError, TypeError, UserError)  # no build, a stale one, a folder not ours


def made_key(make_key: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """The key `make_key` gives; None when it cannot be made (no build, a stale one: the path that computes the
    result says why)."""
    try:
        return make_key()
    except _FAILED:
        return None


Key = dict[str, Any] | Callable[[], dict[str, Any]]  # a key, or what makes it (made only when needed)


def read(dataset_dir: str | Path, kind: str, key: Key) -> dict[str, Any] | None:
    """The record kept under `key`; None when none is (or the key cannot be made)."""
    key = made_key(key) if callable(key) else key
    if key is None:
        return None
    try:
        path = kept_file(dataset_dir, kind, key)
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except _FAILED:
        return None
    if not isinstance(record, dict) or record.get("key") != key:
        return None
    _known[str(path)] = record
    return record


_keeping = True  # off inside nothing_kept()


@contextlib.contextmanager
def nothing_kept() -> Iterator[None]:
    """Nothing is kept in the block: `train --dry-run` writes only to its scratch folder, the build included."""
    global _keeping
    before, _keeping = _keeping, False
    try:
        yield
    finally:
        _keeping = before


def keep(dataset_dir: str | Path, kind: str, key: Key, result: dict[str, Any]) -> None:
    """Keep `result` under `key` (or the key a callable gives) for later commands, then prune the folder. Rank 0
    only (the other ranks compute the same), never inside nothing_kept(), once per record (a record this process
    read or wrote, or one on disk already, is not written again); a folder that cannot be written keeps nothing,
    silently."""
    if not first_rank() or not _keeping:
        return
    with contextlib.suppress(*_FAILED):
        key = key() if callable(key) else key
        path = kept_file(dataset_dir, kind, key)
        record = json.loads(json.dumps({**result, "key": key}))
        if _known.get(str(path)) == record or _on_disk(path) == record:
            _known[str(path)] = record
            return
        write_json(path, record)
        _known[str(path)] = record
        prune(path.parent, dataset_dir, path)


def _on_disk(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def prune(folder: Path, dataset_dir: str | Path, written: Path | None = None) -> None:
    """Remove the kept results in `folder` whose built files are no longer those on disk (or that are damaged: never
    read), then all but the CAP most recently kept (`written`, just kept, among them). Each removal may fail
    (another process removed the file first, a folder not ours): it is skipped."""
    try:
        found = [Path(e.path) for e in os.scandir(folder) if _NAME.fullmatch(e.name)]
    except OSError:
        return
    current = []
    for path in found:
        with contextlib.suppress(OSError):
            if path == written or _current(path, dataset_dir):
                current.append((path == written, path.stat().st_mtime_ns, path))
            else:
                path.unlink()
    for _, _, path in sorted(current, reverse=True)[CAP:]:
        with contextlib.suppress(OSError):
            path.unlink()


def _current(path: Path, dataset_dir: str | Path) -> bool:
    """Whether every built file of the result kept in `path` is as it was (file_stamp). OSError: cannot say."""
    with open(path, encoding="utf-8") as handle:
        try:
            files = json.load(handle)["key"]["files"]
            return all(_unchanged(dataset_dir, *entry) for entry in files)
        except (ValueError, KeyError, TypeError):
            return False


def _unchanged(dataset_dir: str | Path, dataset: str, name: str, sha256: Any, *stamp: int) -> bool:
    try:
        info = (built_dir(dataset_dir, dataset) / name).stat()
    except FileNotFoundError:
        return False
    return file_stamp(info) == stamp
