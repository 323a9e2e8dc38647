"""pipeline.lock.unwritable: the refusal the output_dir lock would give, found without leaving anything on disk (for
`train --dry-run`, which takes no lock: tests/acceptance/test_papercuts_day_one.py drives it through the CLI)."""
from __future__ import annotations

import errno
import os

import pytest

from pipeline.errors import UserError
from pipeline.lock import exclusive, unwritable


def listing(root) -> list:
    return sorted(p.relative_to(root) for p in root.rglob("*"))


def test_a_writable_place_is_no_problem_and_nothing_is_made(tmp_path):
    (tmp_path / "runs").mkdir()
    before = listing(tmp_path)
    assert unwritable(tmp_path / "runs") is None  # existing
    assert unwritable(tmp_path / "a" / "b" / "out", "r.yaml:3: output_dir") is None  # to be created, with parents
    assert listing(tmp_path) == before


def test_a_file_in_the_way_is_the_message_the_lock_gives(tmp_path):
    (tmp_path / "notes.txt").write_text("mine\n")
    target = tmp_path / "notes.txt" / "run"
    said = unwritable(target, "r.yaml:3: output_dir").messages
    with pytest.raises(UserError) as refusal, exclusive(target, "train r.yaml", "r.yaml:3: output_dir", writes=True):
        pass
    assert refusal.value.messages == said
    assert said == [f"r.yaml:3: output_dir: {target} cannot be created: {tmp_path / 'notes.txt'} is a file, not a "
                    "directory; move it away or choose another directory"]


def test_an_existing_folder_is_asked_not_probed(tmp_path, monkeypatch):
    """A folder without write permission (os.access says no) or on a read-only mount (statvfs's ST_RDONLY): said
    without a probe file, which would change the folder's mtime."""
    out = tmp_path / "out"
    out.mkdir()
    mtime = out.stat().st_mtime_ns
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    assert unwritable(out).messages == [f"{out} cannot be written: {os.strerror(errno.EACCES)} ({out}); choose a "
                                        "directory this user may write, or make that one writable"]
    monkeypatch.undo()

    class ReadOnly:
        f_flag = os.ST_RDONLY
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly())
    assert f"{out} cannot be written: {os.strerror(errno.EROFS)} ({out})" in unwritable(out).messages[0]
    assert out.stat().st_mtime_ns == mtime


def test_a_dry_run_locks_nothing(write, manifest):
    from pipeline.__main__ import lock_targets
    from pipeline.recipe import resolve

    manifest("d", train=8)
    write("r.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 3\noutput_dir: saves/r\n")
    r = resolve("r.yaml", command="train")
    assert [str(p) for p, _ in lock_targets("train", r)] == ["saves/r"]
    assert lock_targets("train", r, dry_run=True) == []
