"""The item counts of a built split (sft examples or packs, pt windows, pairs) once the length policy ran, kept
next to the build so that plan and validate need not tokenize the whole split again on every call.

plan and validate count the optimizer steps exactly, by tokenizing the train split as train does (pipeline.recipe
.exact): 17 s for 100k sft rows and 6 s for 50 MB of pt text on a 2-core machine, in every call, each a new
process. The per-process cache of pipeline.data.tokenize cannot help across processes, so the count itself is kept:
`<dataset_dir>/build/<the split's first dataset>/counts/<digest>.json`, one small JSON file per split and setting,
written atomically (pipeline.io) by whoever tokenized the split (count_examples, and every loader make_loader builds,
train's and eval's included), and read back only when its key is the one the recipe gives now. Beside the count, the
rows the length policy dropped (validate's note says them, as train does). The key is
everything the count depends on:
- the split's built files: the manifest's sha256 of each (a rebuild) and its size, mtime and inode (an edit after
  the build, which the tokenizing path refuses: a changed file misses, and the refusal comes from there);
- the tokenizer: its name, the sha256 of every file it was read from (tokenizer_files.READ_FILES), its added
  tokens and its EOS / PAD / BOS ids (pt_separator);
- every DataArgs key but those that only order or batch the items (ORDER_ONLY): cutoff_len, template,
  default_system, overlength_policy, packing and neat_packing, pt_stride, stage, train_on_prompt, mask_history,
  enable_thinking, the mix, the added tokens, ...;
- the code that counts: the sha256 of pipeline/data's sources, so an upgrade that tokenizes differently misses.
A miss is the old path, never an error; so is a file that cannot be read or written (a read-only dataset folder):
the cache is an optimization only, and holds counts, never code or objects (JSON, no pickle).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from pipeline.data.args import NOT_A_KEY, DataArgs
from pipeline.data.built import built_dir, read_manifest
from pipeline.errors import UserError
from pipeline.launched import first_rank
from pipeline.io import sha256_file, write_json

FORMAT = 1
FOLDER = "counts"
# DataArgs keys that decide how the items are ordered, batched or loaded, never how many there are: a plan with
# another batch size still finds the count. Everything else is in the key, so a new key misses rather than lies.
ORDER_ONLY = frozenset({"per_device_train_batch_size", "per_device_eval_batch_size", "group_by_length",
                        "disable_shuffling", "dataloader_num_workers", "preprocessing_num_workers"})


@lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 of the data library's sources (templates, tokenizers, length policy, packing, windows)."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def tokenizer_identity(tokenizer: Any) -> list[Any]:
    """What the token ids of a text depend on: Tokenizer.cache_key, the ids placed by id, and the contents of every
    file it was read from (read_from: a top-level tokenizer.model too, which Tokenizer.files, what exports copy, lacks).
    The same in every process: cache_key's added tokens are a frozenset, whose order (and repr) follows the
    process's string hash seed, so they are sorted (a repr missed in every next command, and wrote a file each)."""
    name, new_tokens, added = tokenizer.cache_key
    files = [[Path(f).name, sha256_file(f)] for f in tokenizer.read_from if Path(f).is_file()]
    return [str(name), list(new_tokens), sorted(added), tokenizer.eos_id, tokenizer.pad_id, tokenizer.bos_id,
            bool(tokenizer.split_special_tokens), files]


def _built_files(data: DataArgs, split: str) -> list[list[Any]]:
    from pipeline.data.load import split_parts

    found = []
    for name, path in split_parts(data, split):  # build_problem: an unusable build raises here, as the loaders do
        info = path.stat()
        recorded = ((read_manifest(path.parent) or {}).get("files") or {}).get(path.name) or {}
        found.append([name, path.name, recorded.get("sha256"), info.st_size, info.st_mtime_ns, info.st_ino])
    return found


def count_key(data: DataArgs, split: str) -> dict[str, Any]:
    """Everything the item count of `split` depends on (see the module's docstring), as plain JSON."""
    from pipeline.data.load import mix_key
    from pipeline.data.model_tokenizer import recipe_tokenizer

    keys = {f.name: getattr(data, f.name) for f in dataclasses.fields(data)
            if not f.metadata.get(NOT_A_KEY) and f.name not in ORDER_ONLY}
    return {"format": FORMAT, "split": split, "code": code_digest(), "files": _built_files(data, split),
            "mix": repr(mix_key(data, split)), "tokenizer": tokenizer_identity(recipe_tokenizer(data)),
            "data": json.loads(json.dumps(keys, default=repr))}


def count_file(data: DataArgs, key: dict[str, Any]) -> Path:
    """Where the count of `key` is kept: in the build folder of the split's first dataset (a rebuild replaces the
    folder, and its counts with it), named by the key's digest."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    first = key["files"][0][0]
    return built_dir(data.dataset_dir, first) / FOLDER / f"{key['split']}-{digest}.json"


def cached_tally(data: DataArgs, split: str) -> dict[str, Any] | None:
    """The kept tally of `split` (pipeline.data.loaders.tally: its items, and but for pt its rows and the rows the
    length policy dropped, by reason) under the recipe's settings now; None when none is kept for them."""
    try:
        key = count_key(data, split)
        with open(count_file(data, key), encoding="utf-8") as handle:
            kept = json.load(handle)
    except (OSError, ValueError, IndexError, UserError):  # no build, a stale one: the tokenizing path says why
        return None
    if not isinstance(kept, dict) or kept.get("key") != key:
        return None
    tally = {name: kept.get(name) for name in ("items", "rows", "dropped") if name in kept}
    return tally if _well_formed(tally, pt=data.stage == "pt") else None


def _well_formed(tally: dict[str, Any], pt: bool) -> bool:
    def count(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    dropped = tally.get("dropped")
    return count(tally.get("items")) and (pt or count(tally.get("rows")) and isinstance(dropped, dict) and
                                          all(isinstance(k, str) and count(v) for k, v in dropped.items()))


def cached_count(data: DataArgs, split: str) -> int | None:
    """The kept item count of `split` under the recipe's settings now; None when none is kept for them."""
    tally = cached_tally(data, split)
    return None if tally is None else tally["items"]


_keeping = True  # off inside nothing_kept()


@contextlib.contextmanager
def nothing_kept() -> Iterator[None]:
    """No tally is kept in the block: `train --dry-run` writes only to its scratch folder, the build included."""
    global _keeping
    before, _keeping = _keeping, False
    try:
        yield
    finally:
        _keeping = before


def keep_tally(data: DataArgs, split: str, tally: dict[str, Any]) -> None:
    """Keep `split`'s tally, as just counted by tokenizing it, for later plan and validate calls. Rank 0 only
    (the other ranks count the same), never inside nothing_kept(); a folder that cannot be written keeps nothing,
    silently."""
    if not first_rank() or not _keeping:
        return
    with contextlib.suppress(OSError, ValueError, IndexError, UserError):
        key = count_key(data, split)
        write_json(count_file(data, key), {**tally, "key": key})
