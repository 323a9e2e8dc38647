"""Built splits as rows: what train, eval and inspect read (never the raw sources).

train = the train.json of every `dataset`, one after another, or with an interleave mix_strategy interleaved
(pipeline.data.mix: a dataset's rows are its train.json, then its val.json when that trains too); val = their
val.json, one after another, or with `eval_dataset` the rows of
those datasets (all of them; only val.json for a name that is also in `dataset`, so nothing trained
on is evaluated), interleaved as the training rows are when there are several. A missing or stale build is a
UserError that says to run `make data` (or to set overwrite_cache: true: train and eval then build first, see
pipeline.__main__.steps).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence, TypeVar

from pipeline.data.args import DataArgs, rebuild
from pipeline.data.build import SPLITS, build_keys, built_dir, read_manifest, sha256_file
from pipeline.data.built import file_stamp, training_splits
from pipeline.data.mix import mixed, parse_probs
from pipeline.data.origins import Origin, built_origins
from pipeline.data.registry import dataset_names
from pipeline.errors import UserError

T = TypeVar("T")
_read: dict[tuple, tuple[list[Any], str]] | None = None  # read_once's rows and digests, while one is open


def make_data(data: DataArgs | None = None, several: bool = False) -> str:
    """What to do about data that is not the recipe's build: rebuild(data), or let train and eval build it."""
    return f"run {rebuild(data)}, or set overwrite_cache: true so that train and eval rebuild {'them' if several else 'it'} themselves"


def not_built(data: DataArgs, names: list[str]) -> str:
    """One message for the recipe's datasets that were never built: a train typed before `make data` is one mistake
    with one fix, said once (not once per dataset); it names the first one's folder and every name."""
    first = built_dir(data.dataset_dir, names[0])
    others = f", and neither are {', '.join(repr(n) for n in names[1:])}" if names[1:] else ""
    return f"{first}: dataset '{names[0]}' is not built{others}; {make_data(data, several=bool(others))}"


def build_problems(data: DataArgs, names: Iterable[str]) -> list[str]:
    """Why the builds of `names` cannot be used with this recipe, one line per dataset (build_problem), except that
    the datasets not built at all share one line (not_built)."""
    names = list(dict.fromkeys(names))
    unbuilt = [n for n in names if not (built_dir(data.dataset_dir, n) / "manifest.json").is_file()]
    problems = [p for n in names if n not in unbuilt and (p := build_problem(data, n))]
    return ([not_built(data, unbuilt)] if unbuilt else []) + problems


def build_problem(data: DataArgs, name: str) -> str | None:
    """Why the build of `name` cannot be used with this recipe, or None."""
    directory = built_dir(data.dataset_dir, name)
    manifest = read_manifest(directory)
    fix = make_data(data)
    if manifest is None or not all(isinstance(manifest.get(k), dict) for k in ("build_keys", "splits")):
        if (directory / "manifest.json").is_file():
            return f"{directory}/manifest.json: damaged (not a JSON object as the build writes it); {fix}"
        return not_built(data, [name])
    wanted = build_keys(data)
    changed = [f"{k} {manifest.get('build_keys', {}).get(k)!r} -> {v!r}" for k, v in wanted.items()
               if manifest.get("build_keys", {}).get(k) != v]
    if changed:
        return (f"{directory}: built with other settings than the recipe's ({'; '.join(changed)}); {fix}")
    missing = [f"{s}.json" for s in SPLITS if not (directory / f"{s}.json").is_file()]
    if missing:
        return f"{directory}: {', '.join(missing)} missing; {fix}"
    return sources_changed(data, name, manifest)


def _file_version(path: Path) -> tuple:
    """A file as it is now: its resolved path and built.file_stamp (a rewrite changes one of them)."""
    return str(path.resolve()), *file_stamp(path.stat())


def sha256_once(path: Path, _memo: dict[tuple, str] = {}) -> str:  # noqa: B006 - a per-process cache
    """sha256 of a file (a raw source, a tokenizer's file), hashed once per process while its file_stamp stays the
    same: a command asks the same file's digest several times (pipeline.data.kept's keys)."""
    key = _file_version(path)
    if key not in _memo:
        _memo[key] = sha256_file(path)
    return _memo[key]


def sources_changed(data: DataArgs, name: str, manifest: Mapping[str, Any]) -> str | None:
    """Why the build of `name` is stale because its raw sources or its registry entry changed since (None: they
    did not). train and eval check this too, so that a raw file edited after `make data` is never silently
    ignored outside make."""
    from pipeline.data.build import all_specs, source_name

    spec = next((s for s in all_specs(data) if s.name == name), None)
    if spec is None:
        return None
    dataset_dir = Path(data.dataset_dir)
    then = {s.get("path"): s.get("sha256") for s in manifest.get("sources", []) if isinstance(s, dict)}
    now = {source_name(p, dataset_dir): p for p in spec.files}
    changed = [f"{dataset_dir / rel} {'is new' if rel not in then else 'was edited'}" for rel, path in now.items()
               if then.get(rel) != sha256_once(path)]
    changed += [f"{dataset_dir / rel} is gone" for rel in then if rel not in now]
    if manifest.get("entry") != spec.entry:
        changed.append(f"the entry of '{name}' in the dataset registry changed")
    if not changed:
        return None
    return (f"{built_dir(dataset_dir, name)}: built from other sources than the recipe's now ({'; '.join(changed)} since "
            f"the build); {make_data(data)}")


def split_files(data: DataArgs, split: str) -> list[Path]:
    """The built JSON files that make up `split` ("train" or "val"), in recipe order."""
    return [path for _, path in split_parts(data, split)]


def split_parts(data: DataArgs, split: str) -> list[tuple[str, Path]]:
    """(the dataset's name as the recipe gives it, one of its built JSON files) for each file of `split`, in recipe
    order: split_files with the name each file is of, for what names a dataset to the user (validate's table)
    without reading it back off the build folder."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")
    train_names = dataset_names(data, "dataset")
    eval_names = dataset_names(data, "eval_dataset")
    if split == "train":
        parts = [(name, s) for name in train_names for s in training_splits(name, eval_names)]
    elif eval_names:
        parts = [(name, s) for name in eval_names for s in (("val",) if name in train_names else SPLITS)]
    else:
        parts = [(name, "val") for name in train_names]
    problems = build_problems(data, (name for name, _ in parts))
    if problems:
        raise UserError(problems)
    return [(name, built_dir(data.dataset_dir, name) / f"{s}.json") for name, s in parts]


def edited(path: Path, digest: str | None = None, data: DataArgs | None = None) -> str | None:
    """Why a built file cannot be trusted: its sha256 is not the one manifest.json recorded (None: it is); `data`:
    the recipe's, whose rebuild the message names (make_data)."""
    files = (read_manifest(Path(path).parent) or {}).get("files")
    recorded = files.get(Path(path).name) if isinstance(files, dict) else None
    if not isinstance(recorded, dict) or recorded.get("sha256") is None:
        return None
    if recorded["sha256"] == (digest or sha256_file(Path(path))):
        return None
    return (f"{path}: changed after it was built (its sha256 differs from manifest.json); edit the raw sources "
            f"instead and {make_data(data)}")


def read_rows(path: Path, data: DataArgs | None, verify: bool = True) -> list[Any]:
    """A built JSON array; a damaged file is a UserError naming its line, an edited one (verify: the sha256 that
    manifest.json recorded differs) a UserError too: the raw sources are the truth, the rebuild of `data`'s recipe
    (make_data; None: no recipe at hand) rebuilds."""
    rows, digest = read_rows_hashed(path, data)
    problem = edited(path, digest, data) if verify else None
    if problem:
        raise UserError(problem)
    return rows


@contextlib.contextmanager
def read_once() -> Iterator[None]:
    """Within: each built file is read and parsed once (while its file_stamp stays the same), and every
    later reader gets the same rows, which readers never modify. For `inspect`, whose samples, length-policy counts,
    pt document lengths and markup warnings all read the same splits. Outside, nothing is kept: train holds its
    tokenized splits, and the rows beside them would double its host memory for a large dataset."""
    global _read
    outer = _read
    _read = {} if outer is None else outer
    try:
        yield
    finally:
        _read = outer


def read_rows_hashed(path: Path, data: DataArgs | None) -> tuple[list[Any], str]:
    """A built JSON array and the sha256 of the bytes it was parsed from, from one read of the file (inside
    read_once, the first read's): for a caller that compares the digest with manifest.json (`edited`) later, as
    check_built does once the rows are valid. A damaged file is a UserError naming its line and the rebuild of
    `data`'s recipe (make_data)."""
    if _read is None:
        return _parsed(path, data)
    key = _file_version(Path(path))
    if key not in _read:
        _read[key] = _parsed(path, data)
    return _read[key]


def _parsed(path: Path, data: DataArgs | None) -> tuple[list[Any], str]:
    try:
        raw = Path(path).read_bytes()
        digest = hashlib.sha256(raw).hexdigest()
        text = raw.decode("utf-8")
        del raw  # large splits: the bytes and the text need not live together with the rows
        rows = json.loads(text)
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not valid UTF-8 ({err.reason} at byte offset {err.start}); "
                        f"{make_data(data)}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: invalid JSON at column {err.colno}: {err.msg}; "
                        f"{make_data(data)}") from None
    if not isinstance(rows, list):
        raise UserError(f"{path}:1: expected a JSON array of rows; {make_data(data)}")
    return rows, digest


def source_names(data: DataArgs, name: str) -> tuple[str, ...]:
    """How the build's messages name the raw files of dataset `name`, in the order of its manifest's sources (the
    registry entry's: a changed entry makes the build stale, see sources_changed)."""
    from pipeline.data.build import all_specs

    return next((spec.shown for spec in all_specs(data) if spec.name == name), ())


def interleaved(data: DataArgs, split: str) -> bool:
    """Whether `split` interleaves its datasets rather than concatenating them: with a mix_strategy other than
    concat, the training rows of several `dataset`s, and the rows of several `eval_dataset`s, which LLaMA-Factory
    mixes alike (its loader merges eval_dataset with merge_dataset, interleave_probs included). The val splits of
    the training datasets are not: LLaMA-Factory splits its val rows off the mix, here each dataset's are held out
    at build time (docs/datasets.md)."""
    names = dataset_names(data, "dataset" if split == "train" else "eval_dataset")
    return data.mix_strategy != "concat" and len(names) > 1


def mix_key(data: DataArgs, split: str) -> tuple:
    """What, besides the built files, decides the order and multiplicity of a split's rows: for the caches."""
    return (data.mix_strategy, str(data.interleave_probs), data.seed) if interleaved(data, split) else ()


def combine(data: DataArgs, split: str, paths: Sequence[Path], parts: Sequence[Sequence[T]]) -> list[T]:
    """What was read from each of a split's `paths` (rows, or their origins) as the split holds it: one file after
    another, or for an interleaved split each dataset's items (its files' in order) interleaved."""
    if not interleaved(data, split):
        return [item for part in parts for item in part]
    per_dataset: dict[str, list[T]] = {}
    for path, part in zip(paths, parts):
        per_dataset.setdefault(Path(path).parent.name, []).extend(part)
    return mixed(list(per_dataset.values()), parse_probs(data.interleave_probs), data.seed, data.mix_strategy)


def read_split_rows(data: DataArgs, split: str, paths: list[Path]) -> tuple[list[Any], list[Origin]]:
    """The rows of a split's built files (as `combine` orders them) and each row's origin: the raw file and line
    (or row) it was built from, for messages that name a row (pipeline.data.origins)."""
    rows: list[list[Any]] = []
    origins: list[list[Origin]] = []
    names: dict[str, tuple[str, ...]] = {}
    for path in paths:
        part = read_rows(path, data)
        dataset = Path(path).parent.name
        if dataset not in names:
            names[dataset] = source_names(data, dataset)
        rows.append(part)
        origins.append(built_origins(path, len(part), names[dataset]))
    return combine(data, split, paths, rows), combine(data, split, paths, origins)


def load_split(data: DataArgs, split: str) -> list[dict]:
    """Alpaca rows (pt: {"text"} documents) of the recipe's `split`, datasets concatenated in order (the training
    rows, and eval_dataset's, of an interleave mix_strategy interleaved)."""
    paths = split_files(data, split)
    return combine(data, split, paths, [read_rows(path, data) for path in paths])
