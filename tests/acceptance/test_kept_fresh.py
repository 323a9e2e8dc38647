"""A kept validate verdict (pipeline.data.kept, kind `check`) never hides what a fresh validate reports: after each
change a user can make by hand between two validates, `python -m pipeline validate` says what it says with counts/
deleted (a fresh validate), word for word and with the same exit status."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.data import kept
from tests.acceptance.harness import pipeline, write_recipe


def _validate_twice(workdir: Path, *overrides: str) -> None:
    """validate (which may read a kept verdict) and a fresh validate (counts/ removed first) say the same."""
    args = ("validate", "r.yaml", *overrides)
    kept_run = pipeline(*args, cwd=workdir, expect=None, as_typed=False)
    shutil.rmtree(workdir / "data/build/tiny_sft" / kept.FOLDER, ignore_errors=True)
    fresh = pipeline(*args, cwd=workdir, expect=None, as_typed=False)
    assert (kept_run.returncode, kept_run.stdout, kept_run.stderr) == \
        (fresh.returncode, fresh.stdout, fresh.stderr), (kept_run.stderr, fresh.stderr)


def test_a_built_file_edited_by_hand_to_the_same_size_and_mtime_is_refused_as_a_fresh_validate_refuses_it(workdir):
    """The edit keeps the file's size, inode and (restored) mtime: only its contents and its ctime, which no user
    can set, differ. A fresh validate refuses it (its sha256 is not the manifest's); the kept verdict said "passed"
    before (its key held size, mtime and inode only)."""
    write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    assert pipeline("validate", "r.yaml", cwd=workdir, as_typed=False).returncode == 0  # keeps its verdict
    train = workdir / "data/build/tiny_sft/train.json"
    before, text = train.stat(), train.read_text("utf-8")
    first = json.loads(text)[0]["output"]
    changed = text.replace(first, first[::-1] if first[::-1] != first else first.upper(), 1)
    assert changed != text and len(changed.encode()) == len(text.encode())
    with open(train, "r+b") as handle:  # in place: the same inode
        handle.write(changed.encode())
    os.utime(train, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (train.stat().st_ino, train.stat().st_size, train.stat().st_mtime_ns) == \
        (before.st_ino, before.st_size, before.st_mtime_ns)
    _validate_twice(workdir)



def test_each_key_the_check_reads_changes_what_validate_says_as_a_fresh_validate_says_it(workdir):
    """One build, then a change at a time, as command-line overrides: the recipe keys the check's token lengths and
    warnings read (cutoff_len, template, train_on_prompt, mask_history, default_system, split_special_tokens)."""
    write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    for override in ("cutoff_len=20", "template=chatml", "train_on_prompt=true", "mask_history=true",
                     "default_system=Be brief and kind.", "split_special_tokens=true"):
        pipeline("validate", "r.yaml", cwd=workdir, as_typed=False)  # the recipe's own verdict, kept
        _validate_twice(workdir, override)
