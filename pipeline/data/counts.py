"""The item counts of a built split (sft examples or packs, pt windows, pairs) once the length policy ran, kept
next to the build so that plan and validate need not tokenize the whole split again on every call.

plan and validate count the optimizer steps exactly, by tokenizing the train split as train does (pipeline.recipe
.exact): 17 s for 100k sft rows and 6 s for 50 MB of pt text on a 2-core machine, in every call, each a new
process. The per-process cache of pipeline.data.tokenize cannot help across processes, so the count itself is kept:
`<dataset_dir>/build/<the split's first dataset>/counts/<split>-<digest>.json`, one small JSON file per split and setting,
written atomically by whoever tokenized the split (count_examples, and every loader make_loader builds,
train's and eval's included), and read back only when its key is the one the recipe gives now. Beside the count, the
rows the length policy dropped (validate's note says them, as train does). The key is
everything the count depends on:
- the split's built files: the manifest's sha256 of each (a rebuild) and its built.file_stamp (an edit after
  the build, which the tokenizing path refuses: a changed file misses, and the refusal comes from there);
- the tokenizer: its name, the sha256 of every file it was read from (tokenizer_files.READ_FILES), its added
  tokens and its EOS / PAD / BOS ids (pt_separator);
- every DataArgs key but those that only order or batch the items (ORDER_ONLY): cutoff_len, template,
  default_system, overlength_policy, packing and neat_packing, pt_stride, stage, train_on_prompt, mask_history,
  enable_thinking, the mix, the added tokens, ...;
- the code that counts: pipeline.data.kept's code digest (SOURCES: the data library and what it imports, the
  tokenizing libraries' versions), so an upgrade that tokenizes differently misses.
A miss is the old path, never an error; so is a file that cannot be read or written (a read-only dataset folder):
the cache is an optimization only, and holds counts, never code or objects (JSON, no pickle). A command hashes each
tokenizer file once and writes a count once (pipeline.data.kept.keep); what is kept, where, and when it is removed:
pipeline.data.kept.
"""
from __future__ import annotations

from typing import Any

from pipeline.data.args import DataArgs
from pipeline.data.kept import FORMAT, Key, code_digest, file_entry, keep, made_key, read, settings, tokenizer_identity
from pipeline.data.built import read_manifest


def _built_files(data: DataArgs, split: str) -> list[list[Any]]:
    from pipeline.data.load import split_parts

    found = []
    for name, path in split_parts(data, split):  # build_problem: an unusable build raises here, as the loaders do
        recorded = ((read_manifest(path.parent) or {}).get("files") or {}).get(path.name) or {}
        found.append(file_entry(name, path, recorded.get("sha256")))
    return found


def count_key(data: DataArgs, split: str) -> dict[str, Any]:
    """Everything the item count of `split` depends on (see the module's docstring), as plain JSON."""
    from pipeline.data.load import mix_key
    from pipeline.data.model_tokenizer import recipe_tokenizer

    return {"format": FORMAT, "split": split, "code": code_digest(), "files": _built_files(data, split),
            "mix": repr(mix_key(data, split)), "tokenizer": tokenizer_identity(recipe_tokenizer(data)),
            "data": settings(data)}


def key_before_reading(data: DataArgs, split: str) -> dict[str, Any] | None:
    """count_key, made before the split is read and tokenized, to keep the count under: a key made after (as it was)
    holds the files a `build` in another process may have swapped in meanwhile, and would file the old files' count
    under the new ones. None when it cannot be made (no build, a stale one: the loader says why)."""
    return made_key(lambda: count_key(data, split))


def cached_tally(data: DataArgs, split: str, key: Key | None = None) -> dict[str, Any] | None:
    """The kept tally of `split` (pipeline.data.loaders.tally: its items, and but for pt its rows and the rows the
    length policy dropped, by reason) under the recipe's settings now; None when none is kept for them. `key`: the
    count_key when the caller made it already (key_before_reading)."""
    kept = read(data.dataset_dir, split, key if key is not None else lambda: count_key(data, split))
    if kept is None:
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


def keep_tally(data: DataArgs, split: str, tally: dict[str, Any], key: dict[str, Any] | None) -> None:
    """Keep `split`'s tally, as just counted by tokenizing it, under `key`, the count_key made before the split was
    read (key_before_reading; None: nothing is kept), for later plan and validate calls (pipeline.data.kept.keep:
    rank 0 only, once per command, never inside nothing_kept(); a folder that cannot be written keeps nothing,
    silently)."""
    if key is not None:
        keep(data.dataset_dir, split, key, tally)
