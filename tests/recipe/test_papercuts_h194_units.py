"""pipeline.lock.unwritable's probe of a missing output_dir leaves its nearest parent as it was (entries and mtime),
with a file without a name (O_TMPFILE) or, where there is none, a named probe and the folder's times put back; the
CLI case is tests/acceptance/test_papercuts_h194.py."""
from __future__ import annotations

import os

from pipeline.lock import unwritable


def state(folder) -> tuple[list[str], int]:
    return sorted(p.name for p in folder.iterdir()), folder.stat().st_mtime_ns


def test_the_probe_of_a_missing_folder_leaves_its_parent_as_it_was(tmp_path, monkeypatch):
    os.utime(tmp_path, ns=(1_000_000_000, 1_000_000_000))  # a time the probe could not keep by chance
    before = state(tmp_path)
    assert unwritable(tmp_path / "a" / "run", "r.yaml:3: output_dir") is None
    assert state(tmp_path) == before
    monkeypatch.delattr(os, "O_TMPFILE", raising=False)  # a platform without unnamed files: the named probe
    assert unwritable(tmp_path / "a" / "run", "r.yaml:3: output_dir") is None
    assert state(tmp_path) == before
