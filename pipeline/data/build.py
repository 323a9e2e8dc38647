"""`python -m pipeline build RECIPE` (`make data`): raw sources -> <dataset_dir>/build/<name>/.

Per dataset: read every source (all problems reported together), convert to Alpaca rows (pt: text
documents), normalise (NFC, CRLF), remove blank and duplicate rows, cap (num_samples, max_samples),
shuffle with `seed` and split by `val_size`, then write train.json, val.json and manifest.json in one
atomic directory swap. A dataset whose sources, registry entry and build keys match its manifest is
left alone.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.args import DataArgs
from pipeline.data.built import built_dir, held_out, read_manifest, row_count
from pipeline.data.convert import to_rows
from pipeline.data.origins import ORIGINS, Where, origin_blob
from pipeline.data.problems import Problems
from pipeline.data.registry import TEXT_EXTS, DatasetSpec, dataset_names, resolve_datasets, unused_note
from pipeline.data.sources import Table, read_jsonl_block, read_table, read_text
from pipeline.data.model_tokenizer import available_tokenizer
from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import UserError
from pipeline.io import atomic_dir, remove_leftovers, sha256_file

SCHEMA_VERSION = 1
BUILD_VERSION = 3  # bump when the same inputs would build different files (3: origins.json, sft and dpo)
BUILD_KEYS = ("stage", "val_size", "seed", "max_samples")
SPLITS = ("train", "val")
SFT_REASONS = ("empty instruction", "empty output", "exact duplicate", "over num_samples", "over max_samples")
PT_REASONS = ("empty text", "exact duplicate", "over num_samples", "over max_samples")
DPO_REASONS = ("empty instruction", "empty chosen", "empty rejected", "identical chosen and rejected",
               "exact duplicate", "over num_samples", "over max_samples")
REASONS = {"pt": PT_REASONS, "sft": SFT_REASONS, "dpo": DPO_REASONS, "kto": SFT_REASONS}
UNITS = {"pt": "documents", "sft": "rows", "dpo": "pairs", "kto": "rows"}
PROGRESS_MIN_BYTES = 8 << 20
BLOCK_MIN_BYTES = 1 << 20  # preprocessing_num_workers: JSON Lines files this large are read in blocks


def build_keys(data: DataArgs) -> dict[str, Any]:
    """The settings a build depends on besides its sources (recorded in manifest.json)."""
    return {key: data.form if key == "stage" else getattr(data, key) for key in BUILD_KEYS}  # rm builds as dpo


def all_specs(data: DataArgs) -> list[DatasetSpec]:
    """The datasets of `dataset` then `eval_dataset`, each once."""
    seen: dict[str, DatasetSpec] = {}
    for spec in resolve_datasets(data, "dataset") + resolve_datasets(data, "eval_dataset"):
        seen.setdefault(spec.name, spec)
    return list(seen.values())


def source_files(data: DataArgs) -> dict[str, Path]:
    """Every raw file the recipe's datasets read, keyed by how a message names it: what a command that empties a
    folder must never delete (the registry's files may sit in a subfolder of dataset_dir, such as raw/)."""
    return {f"the data file {shown} of dataset '{spec.name}'": path
            for spec in all_specs(data) for path, shown in zip(spec.files, spec.shown)}


def source_name(path: Path, dataset_dir: Path) -> str:
    """How a source is recorded in the manifest: relative to dataset_dir (stable across cwd), else absolute."""
    try:
        return path.resolve().relative_to(dataset_dir.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def up_to_date(manifest: dict[str, Any] | None, directory: Path, wanted: dict[str, Any]) -> bool:
    """Same code version, registry entry, build keys and source hashes, and the outputs intact."""
    if not manifest:
        return False
    for key in ("schema_version", "build_version", "entry", "build_keys"):
        if manifest.get(key) != wanted[key]:
            return False
    if [(s.get("path"), s.get("sha256")) for s in manifest.get("sources", [])] != wanted["sources"]:
        return False
    for file, info in manifest.get("files", {}).items():
        path = directory / file
        if not path.is_file() or path.stat().st_size != info.get("bytes") or sha256_file(path) != info.get("sha256"):
            return False
    return set(manifest.get("files", {})) == set(written_files(str(manifest.get("stage"))))


def written_files(stage: str) -> tuple[str, ...]:
    """The files a build of `stage` writes besides manifest.json: the splits, and for sft and dpo (whose rows
    tokenize-time messages name) each row's origin in the raw files (pipeline.data.origins)."""
    return (*(f"{s}.json" for s in SPLITS), *(() if stage == "pt" else (ORIGINS,)))


def usable_cores() -> int:
    """CPU cores this process may run on: more build workers than that only add process overhead."""
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def text_lines(text: str | None) -> Table:
    """A .txt file read as LLaMA-Factory reads it for alpaca entries: one row {"text": line} per non-blank line."""
    table = Table(header=["text"])
    for number, line in enumerate((text or "").split("\n"), start=1):
        if line.strip():
            table.records.append({"text": line.rstrip("\r")})
            table.where.append(number)
    return table


def build(data: DataArgs) -> list[str]:
    """Build what is stale; returns the summary lines. Raises UserError (writing nothing) on bad data."""
    dataset_dir = Path(data.dataset_dir)
    stale: list[tuple[DatasetSpec, dict[str, Any]]] = []
    note = unused_note(data)
    lines: list[str] = [note] if note else []
    for spec in all_specs(data):
        directory = built_dir(dataset_dir, spec.name)
        sources = [(source_name(p, dataset_dir), sha256_file(p)) for p in spec.files]
        wanted = {"schema_version": SCHEMA_VERSION, "build_version": BUILD_VERSION, "entry": spec.entry,
                  "build_keys": build_keys(data), "sources": sources}
        manifest = read_manifest(directory)
        splits = (manifest or {}).get("splits")
        # built as an eval_dataset only (its train split may be empty: see _prepare), now trained on: check it again
        trained = spec.name in dataset_names(data, "dataset")
        trains_nothing = trained and not (isinstance(splits, dict) and splits.get("train"))
        if up_to_date(manifest, directory, wanted) and not trains_nothing:
            remove_leftovers(directory)  # of a build killed after its rename: the result is whole, the old one aside
            lines.append(f"{spec.name}: up to date ({directory}/manifest.json)")
        else:
            stale.append((spec, wanted))
    problems = Problems()
    workers = min(int(data.preprocessing_num_workers or 1), usable_cores())
    loaded = [(spec, wanted, _read_dataset(spec, data.form, problems, workers)) for spec, wanted in stale]
    problems.raise_if_any()
    prepared, errors = [], []
    for spec, wanted, (rows, per_source) in loaded:
        try:
            prepared.append((spec, *_prepare(spec, wanted, rows, per_source, data)))
        except UserError as err:
            errors += err.messages
    if errors:  # every dataset is checked before any is written
        raise UserError(errors)
    for spec, manifest, blobs in prepared:
        _write(built_dir(dataset_dir, spec.name), manifest, blobs)
        lines.extend(summary(manifest, built_dir(dataset_dir, spec.name)))
    return lines


def _read_source(spec: DatasetSpec, stage: str, path: Path, shown: str, problems: Problems
                 ) -> tuple[list[dict], list[Where]]:
    """The rows of one source file and where each was in it (problems go to `problems`)."""
    if spec.formatting == "text" and path.suffix.lower() in TEXT_EXTS:
        text = read_text(path, shown, problems)
        table = Table(records=[{spec.columns["text"]: text}] if text is not None else [], where=[1])
    elif path.suffix.lower() in TEXT_EXTS:  # LLaMA-Factory's way: each line a row of column 'text'
        table = text_lines(read_text(path, shown, problems))
    else:
        table = read_table(path, shown, problems)
    return to_rows(table, spec, stage, shown, problems)


def _read_source_apart(spec: DatasetSpec, stage: str, source: int, path: Path, shown: str,
                       block: tuple[int, int, int] | None) -> tuple["Rows", Problems] | None:
    """_read_source in a worker process (preprocessing_num_workers), rows already in their written form
    (`as_rows`): what comes back pickled is strings, not dicts, and the parent only concatenates.

    `block` = (start byte, end byte, first line) of a JSON Lines file; None (for a block) when it has bad
    UTF-8, so that the whole file is read serially and the message names exact byte offsets.
    """
    problems = Problems()
    if block is None:
        return as_rows(_read_source(spec, stage, path, shown, problems), stage, source), problems
    table = read_jsonl_block(path, *block, shown, problems)
    if table is None:
        return None
    return as_rows(to_rows(table, spec, stage, shown, problems), stage, source), problems


def jsonl_blocks(path: Path, n: int) -> list[tuple[int, int, int]]:
    """(start, end, first line) of about n blocks of a file, each ending after a newline."""
    data = path.read_bytes()
    cuts, line = [0], 1
    lines = [1]
    for k in range(1, n):
        at = data.find(b"\n", max(cuts[-1], len(data) * k // n))
        if at < 0 or at + 1 >= len(data):
            break
        line += data.count(b"\n", cuts[-1], at + 1)
        cuts.append(at + 1)
        lines.append(line)
    cuts.append(len(data))
    return [(cuts[i], cuts[i + 1], lines[i]) for i in range(len(cuts) - 1)]


def _tasks(spec: DatasetSpec, workers: int) -> list[tuple[int, Path, str, tuple[int, int, int] | None]]:
    """(source index, path, shown, block): JSON Lines files of BLOCK_MIN_BYTES or more split into blocks."""
    tasks: list[tuple[int, Path, str, tuple[int, int, int] | None]] = []
    for i, (path, shown) in enumerate(zip(spec.files, spec.shown)):
        size = path.stat().st_size
        if path.suffix.lower() == ".jsonl" and size >= BLOCK_MIN_BYTES:
            blocks = jsonl_blocks(path, min(workers * 2, max(1, size // BLOCK_MIN_BYTES)))
            tasks.extend((i, path, shown, block) for block in blocks)
        else:
            tasks.append((i, path, shown, None))
    return tasks


def _read_dataset(spec: DatasetSpec, stage: str, problems: Problems, workers: int = 1
                  ) -> tuple["Rows", list[int]]:
    """All rows of a dataset's sources (in file order, as `as_rows` keeps them) and the row count per source.

    With workers > 1 (preprocessing_num_workers) the files, and blocks of large JSON Lines files, are read,
    converted and serialised in worker processes; rows keep the file order and every problem keeps its
    file:line, so the build is the same as a serial one, byte for byte.
    """
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in spec.files)
    bar = tqdm(total=total, desc=f"build {spec.name}", unit="B", unit_scale=True, file=sys.stderr,
               disable=True if total < PROGRESS_MIN_BYTES else None)
    rows = Rows(stage)
    per_source = [0] * len(spec.files)
    tasks = _tasks(spec, workers) if workers > 1 else []
    if len(tasks) > 1:
        from concurrent.futures import ProcessPoolExecutor

        # this process is one of the workers: every workers-th task runs here while the pool runs the others,
        # so no core waits and a third of the rows (with 2 workers: half) are never pickled
        here = set(range(0, len(tasks), workers))
        with ProcessPoolExecutor(max_workers=min(workers - 1, len(tasks) - len(here))) as pool:
            futures = {k: pool.submit(_read_source_apart, spec, stage, i, path, shown, block)
                       for k, (i, path, shown, block) in enumerate(tasks) if k not in here}
            results = [_read_source_apart(spec, stage, i, path, shown, block) if k in here else None
                       for k, (i, path, shown, block) in enumerate(tasks)]
            for k, future in futures.items():
                results[k] = future.result()
        serial = {i for (i, *_), result in zip(tasks, results) if result is None}
        for (i, path, shown, block), result in zip(tasks, results):
            if i in serial:
                if block is None or block[0] == 0:  # once per file, at its first block
                    converted = as_rows(_read_source(spec, stage, path, shown, problems), stage, i)
                    rows.extend(converted)
                    per_source[i] += len(converted)
                continue
            converted, found = result
            problems.extend(found)
            rows.extend(converted)
            per_source[i] += len(converted)
        bar.update(total)
    else:
        for i, (path, shown) in enumerate(zip(spec.files, spec.shown)):
            converted = as_rows(_read_source(spec, stage, path, shown, problems), stage, i)
            rows.extend(converted)
            per_source[i] = len(converted)
            bar.update(path.stat().st_size)
    bar.close()
    if not len(rows) and not problems:
        problems.add(spec.shown[0] if len(spec.shown) == 1 else spec.registry, None,
                     f"dataset '{spec.name}' has no rows")
    return rows, per_source


class Rows:
    """A dataset's rows between reading and writing. pt keeps the documents (split_documents may cut one, and
    the token counts read them); sft and dpo keep, per row, why `clean` drops it (or None), the row's JSON
    text as train.json/val.json hold it and its origin, (source index, where in that file): all that cleaning,
    splitting and writing need, and cheap to send from a worker process (strings and ints, not dicts)."""

    def __init__(self, stage: str, docs: list[dict] | None = None, reasons: list[str | None] | None = None,
                 lines: list[str] | None = None, origins: list[tuple[int, Where]] | None = None):
        self.stage = stage
        self.docs = docs if docs is not None else []
        self.reasons = reasons if reasons is not None else []
        self.lines = lines if lines is not None else []
        self.origins = origins if origins is not None else []

    def __len__(self) -> int:
        return len(self.docs) if self.stage == "pt" else len(self.lines)

    def extend(self, other: "Rows") -> None:
        self.docs.extend(other.docs)
        self.reasons.extend(other.reasons)
        self.lines.extend(other.lines)
        self.origins.extend(other.origins)


def as_rows(converted: tuple[list[dict], list[Where]], stage: str, source: int) -> Rows:
    """The rows `to_rows` converted from source file number `source` of the dataset, in Rows' form."""
    rows, wheres = converted
    if stage == "pt":
        return Rows(stage, docs=rows)
    return Rows(stage, reasons=[drop_reason(row, stage) for row in rows], lines=list(map(row_line, rows)),
                origins=[(source, where) for where in wheres])


def drop_reason(row: dict, stage: str) -> str | None:
    """Why `clean` removes the row before de-duplication (blank fields, a pair without a preference), or None."""
    if stage == "pt":
        key = row["text"]
        return "empty text" if not key or key.isspace() else None
    reason = _blank(row, ("instruction", "chosen", "rejected") if stage == "dpo" else ("instruction", "output"))
    if reason is None and stage == "dpo" and row["chosen"] == row["rejected"]:  # no preference: zero gradient
        return "identical chosen and rejected"
    return reason


def clean(rows: list[dict], stage: str, num_samples: int | None, max_samples: int | None
          ) -> tuple[list[dict], dict[str, int]]:
    """Remove blank rows, exact duplicates (first kept) and rows over the caps; count each reason."""
    return _clean(rows, [drop_reason(row, stage) for row in rows], list(map(row_line, rows)), stage,
                  num_samples, max_samples)


def _clean(items: list, reasons: list[str | None], keys: list[str], stage: str, num_samples: int | None,
           max_samples: int | None) -> tuple[list, dict[str, int]]:
    """clean() on any per-row items, given each row's drop reason and its JSON text: two rows are duplicates
    when their JSON is the same (every field equal: rows of one dataset are built with the same field order)."""
    removed: Counter[str] = Counter()
    kept: list = []
    seen: set[str] = set()
    for item, reason, key in zip(items, reasons, keys):
        if reason:
            removed[reason] += 1
            continue
        if key in seen:
            removed["exact duplicate"] += 1
            continue
        seen.add(key)
        kept.append(item)
    for reason, cap in (("over num_samples", num_samples), ("over max_samples", max_samples)):
        if cap is not None and len(kept) > cap:
            removed[reason] += len(kept) - cap
            kept = kept[:cap]
    return kept, {reason: removed[reason] for reason in REASONS[stage]}


def _blank(row: dict, fields: tuple[str, ...]) -> str | None:
    """'empty <field>' for the first empty or whitespace-only field, else None."""
    for name in fields:
        text = row[name]
        if not text or text.isspace():
            return f"empty {name}"
    return None


def split_rows(rows: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle with `seed`, hold out held_out(val_size, rows) for validation."""
    n = len(rows)
    n_val = held_out(val_size, n)
    order = np.random.default_rng(seed).permutation(n)
    return [rows[i] for i in order[n_val:]], [rows[i] for i in order[:n_val]]


def split_text(text: str, fraction: float) -> tuple[str, str]:
    """Cut at `fraction` of the characters, moved forward (else back) to whitespace; head + tail == text."""
    k = int(fraction * len(text))
    forward = next((i for i in range(k, len(text)) if text[i].isspace()), None)
    if forward is None:
        forward = next((i for i in range(k - 1, 0, -1) if text[i].isspace()), k)
    return text[:forward], text[forward:]


def split_documents(docs: list[dict], val_size: float, seed: int) -> tuple[list[dict], list[dict], str]:
    """Whole documents when there are enough (floor(val_size x docs) >= 1), else each one cut at 1 - val_size.

    An integer val_size counts whole documents and 0 holds out none: neither is a fraction to cut a document at."""
    count = row_count(val_size)
    n_val = math.floor(val_size * len(docs) + 1e-9) if count is None else count
    if n_val >= 1 or val_size == 0:
        train, val = split_rows(docs, int(n_val), seed)  # an int: a count
        return train, val, "documents"
    train, val = [], []
    for doc in docs:
        head, tail = split_text(doc["text"], 1 - val_size)
        if head.strip():
            train.append({"text": head})
        if tail.strip():
            val.append({"text": tail})
    return train, val, "within documents"


@functools.lru_cache(maxsize=1)
def _encoder() -> Any:
    """One reusable C JSON encoder (separators ", " and ": ", no ASCII escaping) instead of one per row."""
    from json.encoder import c_make_encoder, encode_basestring

    if c_make_encoder is None:  # pragma: no cover - CPython always has the C encoder
        return json.JSONEncoder(ensure_ascii=False, allow_nan=False).encode
    encoder = c_make_encoder(None, None, encode_basestring, None, ": ", ", ", False, False, False)
    return lambda row: "".join(encoder(row, 0))


def row_line(row: dict) -> str:
    """A row's JSON text as train.json/val.json hold it (one line; the build's hottest function)."""
    if len(row) == 3 and "instruction" in row and "input" in row and "output" in row:
        from json.encoder import encode_basestring as quote

        return (f'{{"instruction": {quote(row["instruction"])}, "input": {quote(row["input"])}, '
                f'"output": {quote(row["output"])}}}')
    return _encoder()(row)


def _join(lines: list[str]) -> bytes:
    """A JSON array with row i (1-based) on line i, so `file:row` is also `file:line`."""
    if not lines:
        return b"[]\n"
    return ("[" + ",\n".join(lines) + "]\n").encode("utf-8")


def _dump_rows(rows: list[dict]) -> bytes:
    return _join(list(map(row_line, rows)))


def count_tokens(docs: list[dict], tokenizer: Tokenizer) -> int:
    """Tokens of a pt split as the loader streams it: documents joined by one EOS."""
    if not docs:
        return 0
    return sum(map(len, tokenizer.encode_batch([d["text"] for d in docs]))) + len(docs) - 1


def counts_tokens(form: str) -> bool:
    """Whether the build of data of this form (DataArgs.form) reads the model's tokenizer: a pt corpus's manifest
    records its token counts (the windows it gives), rows of the other forms are tokenized by the commands that
    read them. The rule that refuses a preset without a tokenizer asks it for `build`."""
    return form == "pt"


def _prepare(spec: DatasetSpec, wanted: dict[str, Any], rows: Rows, per_source: list[int],
             data: DataArgs) -> tuple[dict[str, Any], dict[str, bytes]]:
    """Clean, split and serialise one dataset: (manifest, file name -> bytes); UserError if a split is empty."""
    stage = data.form
    if stage == "pt":
        kept, removed = clean(rows.docs, stage, spec.num_samples, data.max_samples)
    else:  # row numbers: the kept rows' JSON text and origins both follow them through the split
        kept, removed = _clean(list(range(len(rows))), rows.reasons, rows.lines, stage, spec.num_samples,
                               data.max_samples)
    manifest: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "build_version": BUILD_VERSION, "name": spec.name, "stage": stage,
        "formatting": spec.formatting, "registry": spec.registry, "entry": spec.entry,
        "build_keys": wanted["build_keys"],
        "sources": [{"path": path, "sha256": sha, "rows": n} for (path, sha), n in zip(wanted["sources"], per_source)],
        "rows_read": len(rows), "rows_kept": len(kept), "removed": removed,
    }
    if stage == "pt":
        train, val, mode = split_documents(kept, data.val_size, data.seed)
        manifest["split_mode"] = mode
    else:
        train, val = split_rows(kept, data.val_size, data.seed)
    # val_size 0: no validation split, by request. A dataset only in eval_dataset is evaluated whole and never
    # trained (pipeline.data.load.split_files): any split of its rows will do
    eval_only = spec.name not in dataset_names(data, "dataset")
    if (not train or (not val and data.val_size != 0)) and not (eval_only and kept):
        gone = ", ".join(f"{k} {v:,}" for k, v in removed.items() if v) or "none"
        need = "both need at least one" if data.val_size != 0 else "training needs at least one"
        raise UserError(f"dataset '{spec.name}' ({spec.registry}:{spec.line}): {len(kept):,} "
                        f"{UNITS[stage]} remain after cleaning (read {len(rows):,}; "
                        f"removed: {gone}); val_size {data.val_size} leaves {len(train):,} for training and "
                        f"{len(val):,} for validation, and {need}. Add data or change val_size")
    manifest["splits"] = {"train": len(train), "val": len(val)}
    if counts_tokens(stage):
        tokenizer = available_tokenizer(data)
        if tokenizer is not None:  # a hub model not downloaded yet: no token counts (see available_tokenizer)
            manifest["tokens"] = {"train": count_tokens(train, tokenizer), "val": count_tokens(val, tokenizer)}
            manifest["tokenizer"] = tokenizer.name
    if stage == "pt":
        blobs = {"train.json": _dump_rows(train), "val.json": _dump_rows(val)}
    else:  # already JSON text
        splits = {"train": train, "val": val}
        blobs = {f"{split}.json": _join([rows.lines[i] for i in kept]) for split, kept in splits.items()}
        blobs[ORIGINS] = origin_blob({split: [rows.origins[i] for i in kept] for split, kept in splits.items()})
    manifest["files"] = {f: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for f, b in blobs.items()}
    manifest["built_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return manifest, blobs


def _write(directory: Path, manifest: dict[str, Any], blobs: dict[str, bytes]) -> None:
    """train.json, val.json and manifest.json appear together or not at all (one directory rename)."""
    with atomic_dir(directory) as tmp:
        for file, blob in blobs.items():
            (tmp / file).write_bytes(blob)
        with open(tmp / "manifest.json", "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, ensure_ascii=False)
            handle.write("\n")


def summary(manifest: dict[str, Any], directory: Path) -> list[str]:
    unit = UNITS.get(manifest["stage"], "rows")
    removed = ", ".join(f"{k} {v:,}" for k, v in manifest["removed"].items() if v) or "none"
    splits = manifest["splits"]
    lines = [f"{manifest['name']}: built {directory} ({manifest['stage']}, {len(manifest['sources'])} source"
             f"{'s' if len(manifest['sources']) != 1 else ''})",
             f"  {unit} read {manifest['rows_read']:,} · kept {manifest['rows_kept']:,} · removed: {removed}",
             f"  train {splits['train']:,} · val {splits['val']:,}"
             + (f" {unit} ({manifest['split_mode']})" if "split_mode" in manifest else "")]
    if "tokens" in manifest:
        lines.append(f"  tokens: train {manifest['tokens']['train']:,} · val {manifest['tokens']['val']:,}")
    return lines
