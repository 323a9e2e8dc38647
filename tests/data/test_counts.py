"""The item counts kept beside a build (pipeline.data.counts): read back only under the same key, never stale."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.data import tokenize
from pipeline.data.build import build
from pipeline.data.built import built_dir
from pipeline.data.counts import cached_count, count_key, keep_tally
from pipeline.data.kept import FOLDER
from pipeline.data.loaders import count_items
from pipeline.data.tokenizer import Tokenizer
from pipeline.recipe.args import data_args
from tests.helpers.tiktoken_vocab import tiktoken_model

TEXT = "a" + " a" * 99  # 100 GPT-2 tokens: "a", then 99 x " a"


def kept_files(data) -> list[Path]:
    folder = built_dir(data.dataset_dir, "book") / FOLDER
    return sorted(folder.iterdir()) if folder.is_dir() else []


@pytest.fixture
def book(make_recipe):
    r = make_recipe({"book": {"file_name": "raw/book.txt", "formatting": "text"}}, files={"raw/book.txt": TEXT},
                    stage="pt", cutoff_len=8, val_size=0, per_device_train_batch_size=1)
    build(data_args(r))
    return r


@pytest.fixture
def encodes(monkeypatch):
    """The texts the tokenizer encodes from now on (the per-process cache of tokenized splits emptied)."""
    seen: list[str] = []
    encode = Tokenizer.encode

    def counted(self, text):
        seen.append(text)
        return encode(self, text)

    monkeypatch.setattr(Tokenizer, "encode", counted)
    tokenize._cache.clear()
    return seen


def test_a_second_count_tokenizes_nothing_and_another_cutoff_len_counts_anew(book, encodes):
    data = data_args(book)
    assert count_items(data, "train") == 12  # window starts range(0, 100 - 8, 8): 0, 8, ..., 88
    assert encodes == [TEXT]
    (kept,) = kept_files(data)
    assert json.loads(kept.read_text(encoding="utf-8"))["items"] == 12

    encodes.clear()
    tokenize._cache.clear()
    assert count_items(data, "train") == 12 and encodes == []  # read back

    wider = data_args(dict(book, cutoff_len=10))
    assert count_items(wider, "train") == 9 and encodes == [TEXT]  # range(0, 90, 10): another key, counted
    assert count_items(data_args(dict(book, per_device_train_batch_size=4)), "train") == 12  # batching: same key
    assert encodes == [TEXT]


def test_an_edited_build_or_another_tokenizer_misses(book, encodes):
    data = data_args(book)
    count_items(data, "train")
    assert cached_count(data, "train") == 12
    assert cached_count(data_args(dict(book, add_tokens="<x>")), "train") is None  # the tokenizer's identity
    assert cached_count(data_args(dict(book, pt_stride=4)), "train") is None
    train = built_dir(data.dataset_dir, "book") / "train.json"
    info = os.stat(train)
    os.utime(train, ns=(info.st_atime_ns, info.st_mtime_ns + 1))  # edited after the build: train refuses it
    assert cached_count(data, "train") is None


def test_a_count_is_kept_under_the_files_it_read_not_those_a_build_swapped_in_meanwhile(book, monkeypatch):
    """The key a count is kept under is made before the split is tokenized: made after (as it was), it held the files
    a `make data` in another terminal wrote meanwhile, so the old files' count was read back for the new ones (a
    wrong exact step count). Here the build's train.json is written again while the split is counted (its stamp
    moves on); the count kept must not answer for the file as it is now."""
    from pipeline.data import loaders

    data = data_args(book)
    train = built_dir(data.dataset_dir, "book") / "train.json"
    counted = loaders.tokenized_tally

    def rebuilt_meanwhile(data, split):
        found = counted(data, split)
        train.write_bytes(train.read_bytes())  # the same rows, written again: a new ctime and mtime
        return found

    monkeypatch.setattr(loaders, "tokenized_tally", rebuilt_meanwhile)
    assert loaders.tally(data, "train")["items"] == 12
    assert len(kept_files(data)) == 1 and cached_count(data, "train") is None


def test_a_kept_count_of_another_key_or_rank_is_never_read(book, monkeypatch):
    data = data_args(book)
    monkeypatch.setenv("RANK", "1")
    keep_tally(data, "train", {"items": 12}, count_key(data, "train"))  # the other ranks count the same: only rank 0 writes
    assert kept_files(data) == []
    monkeypatch.setenv("RANK", "0")
    keep_tally(data, "train", {"items": 12}, count_key(data, "train"))
    (path,) = kept_files(data)
    kept = json.loads(path.read_text(encoding="utf-8"))
    assert kept == {"items": 12, "key": count_key(data, "train")}
    kept["key"]["data"]["cutoff_len"] = 9  # a file whose key is not the recipe's, under its name
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(kept, handle)
    assert cached_count(data, "train") is None
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("not json")
    assert cached_count(data, "train") is None


def test_train_and_eval_loaders_keep_their_count(book, encodes):
    """make_loader (train's and eval's loaders) keeps what it counted: a plan after train tokenizes nothing."""
    from pipeline.data.loaders import make_loader

    data = data_args(book)
    assert make_loader(data, "train", say_workers=False).num_examples == 12 and encodes == [TEXT]
    tokenize._cache.clear()
    assert count_items(data, "train") == 12 and encodes == [TEXT]


def test_validate_s_dropped_note_comes_from_the_kept_tally(make_recipe, encodes):
    """validate says the rows the length policy left out (loaders.dropped_note): from the kept tally too."""
    from data_helpers import jsonl
    from pipeline.data.loaders import dropped_note

    rows = [{"instruction": f"Say a, {i}.", "input": "", "output": "a" + " a" * (300 if i % 3 == 0 else 0)} for i in range(8)]
    r = make_recipe({"d": {"file_name": "raw/d.jsonl", "formatting": "alpaca"}}, files={"raw/d.jsonl": jsonl(rows)},
                    template="alpaca", cutoff_len=64, val_size=0)
    build(data_args(r))
    data = data_args(r)
    note = dropped_note(data)  # rows 0, 3, 6: 301 answer tokens, over 64; the others fit (alpaca's ~40 and 2)
    assert note.startswith("note: 3 of the 8 training rows are longer than cutoff_len 64") and encodes
    encodes.clear()
    tokenize._cache.clear()
    assert dropped_note(data) == note and count_items(data, "train") == 5 and encodes == []


def test_a_changed_top_level_tokenizer_model_misses(make_recipe, tmp_path, encodes):
    """A tokenizer read from a top-level tokenizer.model (tokenizer_files.READ_FILES), replaced by another vocabulary
    of the same size (same name, same special ids): the kept count is not the new tokenizer's. Failed before: the
    identity hashed Tokenizer.files, what exports copy, which lacks it."""
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.model").write_text(tiktoken_model(b"xy"), encoding="utf-8")
    r = make_recipe({"book": {"file_name": "raw/book.txt", "formatting": "text"}}, files={"raw/book.txt": "ab" * 50},
                    stage="pt", cutoff_len=8, val_size=0, per_device_train_batch_size=1, model_name_or_path=str(tok))
    build(data_args(r))
    assert count_items(data_args(r), "train") == 12  # 100 byte tokens: window starts range(0, 92, 8)
    (tok / "tokenizer.model").write_text(tiktoken_model(b"ab"), encoding="utf-8")  # "ab" one token: 50 tokens
    tokenize._cache.clear()
    assert cached_count(data_args(r), "train") is None
    assert count_items(data_args(r), "train") == 6  # range(0, 42, 8)


def test_keeping_a_count_removes_those_of_an_older_build_and_keeps_the_most_recent(book, monkeypatch):
    """counts/ holds one file per setting tried: those whose built files changed since (they can never be read again)
    go when the next count is kept, and of the rest the CAP most recently kept stay; a removal that fails (another
    process removed the file first, a folder not ours) fails nothing. Failed before: every file stayed."""
    from pipeline.data import kept

    data = data_args(book)
    count_items(data, "train")
    (older,) = kept_files(data)
    train = built_dir(data.dataset_dir, "book") / "train.json"
    info = os.stat(train)
    os.utime(train, ns=(info.st_atime_ns, info.st_mtime_ns + 1))  # touched after the build: that count never hits
    count_items(data, "train")
    (current,) = kept_files(data)
    assert current != older and json.loads(current.read_text(encoding="utf-8"))["items"] == 12

    monkeypatch.setattr(kept, "CAP", 2)
    seen = {current}
    os.utime(current, ns=(0, info.st_mtime_ns))
    for i, cutoff_len in enumerate((10, 11)):  # two more settings, each kept later (mtimes set: a clock tick is coarse)
        count_items(data_args(dict(book, cutoff_len=cutoff_len)), "train")
        (new,) = set(kept_files(data)) - seen
        os.utime(new, ns=(0, info.st_mtime_ns + 10 ** 9 * (i + 1)))
        seen.add(new)
    assert len(kept_files(data)) == 2 and current not in kept_files(data)  # the oldest of three went
    # range(0, 90, 10) and range(0, 89, 11): 9 windows each
    assert [json.loads(p.read_text(encoding="utf-8"))["items"] for p in kept_files(data)] == [9, 9]

    def refused(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "unlink", refused)
    assert count_items(data_args(dict(book, cutoff_len=12)), "train") == 8  # range(0, 88, 12): kept, none removed
    assert len(kept_files(data)) == 3


def test_a_loader_over_a_read_only_dataset_folder_keeps_nothing_and_says_nothing(book, monkeypatch, capsys):
    """train's loaders (make_loader) over a dataset folder mounted read-only: the run goes on as without the cache."""
    import errno

    from pipeline import io
    from pipeline.data.loaders import make_loader

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(io, "atomic_write", read_only)
    assert make_loader(data_args(book), "train", say_workers=False).num_examples == 12
    assert kept_files(data_args(book)) == [] and capsys.readouterr() == ("", "")
