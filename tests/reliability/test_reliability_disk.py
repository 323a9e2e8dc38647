"""A full disk: one clear message (exit 2, 'no space left on device', the path), the previous file, build or
checkpoint intact, no temp files. The disk fills up in a simulation: pipeline.io's fsync of a temp file (where
a full disk shows up at the latest) raises ENOSPC, or a write inside DeepSpeed's checkpoint save does.

Also the other promises of pipeline.io: leftovers of killed writers are removed by the next write of the same
target (a live writer's are not), and written files get the permissions a plain open() would give."""
from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest

from pipeline import io as pio
from pipeline.errors import UserError
from tests.reliability.conftest import Reference
from tests.reliability.rel_helpers import assert_user_error, diff, jsonl, run_main, snapshot


def full_disk(monkeypatch: pytest.MonkeyPatch, when=lambda path: True) -> list[str]:
    """pipeline.io's fsync raises ENOSPC for temp files of targets where `when(target)`; returns those targets."""
    hit: list[str] = []
    original = pio._sync

    def sync(handle, path):
        if when(str(path)):
            hit.append(str(path))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        original(handle, path)
    monkeypatch.setattr(pio, "_sync", sync)
    return hit


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_write_json_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    pio.write_json(target, {"v": 1})
    full_disk(monkeypatch)
    with pytest.raises(UserError) as err:
        pio.write_json(target, {"v": 2})
    message = err.value.messages[0]
    assert message.startswith(f"{target}: no space left on device") and "unchanged" in message
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_atomic_dir_on_a_full_disk_keeps_the_old_folder(tmp_path):
    target = tmp_path / "model"
    with pio.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(UserError) as err, pio.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("new, half")
        # what safetensors raises when the disk fills up under it
        raise RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                           '"No space left on device" })')
    assert err.value.messages[0].startswith(f"{target}: no space left on device")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(PermissionError), pio.atomic_write(tmp_path / "x.txt") as handle:
        handle.write("x")
        raise PermissionError(errno.EACCES, "denied")
    assert list(tmp_path.iterdir()) == []


def test_build_on_a_full_disk_exit_2_and_the_previous_build_intact(trained: Reference, tmp_path, monkeypatch):
    root = trained.copy(tmp_path / "proj")
    with open(root / "data" / "raw" / "a.jsonl", "a", encoding="utf-8") as handle:
        handle.write(jsonl([{"instruction": "new", "input": "", "output": "row"}]))
    before = snapshot(root)
    hit = full_disk(monkeypatch)
    result = run_main(["build", "r.yaml"], root)
    assert hit, "the simulation never fired"
    assert_user_error(result, "data/build/a: no space left on device", "unchanged")
    assert not diff(before, snapshot(root)), diff(before, snapshot(root))


@pytest.fixture
def one_rank() -> None:
    from pipeline.runtime import dist

    dist.ensure_launch_env()


def test_training_on_a_full_disk_keeps_the_previous_checkpoint(trained: Reference, tmp_path, monkeypatch, one_rank):
    from pipeline.train import checkpoint

    root = trained.copy(tmp_path / "proj")
    with monkeypatch.context() as patch:
        hit = full_disk(patch, lambda path: "checkpoint-2" in path)
        result = run_main(["train", "r.yaml"], root)
    assert hit
    assert_user_error(result, "out/.checkpoint-2.tmp-", "no space left on device", strict_lines=False)
    out = root / "out"
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1"]
    assert checkpoint.problems_with(out / "checkpoint-1") == []
    assert not (out / "adapter").exists()
    # space freed: the run continues from checkpoint-1 and cleans up the half-written checkpoint-2
    result = run_main(["train", "r.yaml", "resume_from_checkpoint=latest"], root)
    assert result.code == 0, result.err[-3000:]
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in out.rglob(".*")) == []


def test_a_full_disk_inside_deepspeeds_save_is_exit_2(trained: Reference, tmp_path, monkeypatch, one_rank):
    """DeepSpeed's own files go through pipeline.train.safestate, not pipeline.io: the CLI still says it clearly."""
    from pipeline.train import checkpoint, safestate

    root = trained.copy(tmp_path / "proj")
    original = safestate.save_state

    def save_state(obj, path):
        if "checkpoint-2" in str(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        original(obj, path)
    monkeypatch.setattr(safestate, "save_state", save_state)
    result = run_main(["train", "r.yaml"], root)
    assert_user_error(result, "out/.checkpoint-2.tmp-",
                      "/deepspeed/mp_rank_00_model_states.pt: no space left on device", strict_lines=False)
    assert [p.name for p in checkpoint.list_checkpoints(root / "out")] == ["checkpoint-1"]
    assert checkpoint.problems_with(root / "out" / "checkpoint-1") == []


def test_a_full_disk_as_safetensors_reports_it_names_the_checkpoint_and_leaves_no_temp(trained: Reference, tmp_path,
                                                                                     monkeypatch, one_rank):
    """safetensors' own error ("Error while serializing: I/O error: No space left on device (os error 28)") names
    no file: the message said "error: a file: no space left on device", and the half-written checkpoint stayed,
    holding the space the user was told to free (measured on a real 200 kB tmpfs)."""
    from safetensors import SafetensorError

    from pipeline.train import checkpoint, safestate

    root = trained.copy(tmp_path / "proj")
    original = safestate.save_state

    def save_state(obj, path):
        if "checkpoint-2" in str(path):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        original(obj, path)
    monkeypatch.setattr(safestate, "save_state", save_state)
    result = run_main(["train", "r.yaml"], root)
    assert_user_error(result, "out/.checkpoint-2.tmp-", "no space left on device", strict_lines=False)
    assert "a file:" not in result.err
    assert [p.name for p in checkpoint.list_checkpoints(root / "out")] == ["checkpoint-1"]
    assert sorted(p.name for p in (root / "out").glob(".checkpoint-*")) == []


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    host, dead, live = pio._HOST, dead_pid(), os.getppid()
    stale_file = tmp_path / f".r.json.{host}.{dead}.abc123.tmp"
    live_file = tmp_path / f".r.json.{host}.{live}.abc123.tmp"
    stale_dir = tmp_path / f".m.tmp-{host}-{dead}-abc123"
    stale_old = tmp_path / f".m.old-{host}-{dead}"
    nested = tmp_path / f"..m.tmp-{host}-{dead}-abc123.old-{host}-{dead}"
    live_dir = tmp_path / f".m.tmp-{host}-{live}-abc123"
    other_host = tmp_path / f".m.tmp-elsewhere-{dead}-abc123"  # another machine's writer on a shared disk
    for path in (stale_file, live_file):
        path.write_text("partial")
    for path in (stale_dir, stale_old, nested, live_dir, other_host):
        path.mkdir()
        (path / "w").write_text("partial")
    pio.write_json(tmp_path / "r.json", {})
    with pio.atomic_dir(tmp_path / "m") as tmp:
        (tmp / "w").write_text("done")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["r.json", "m", live_file.name, live_dir.name, other_host.name])


def test_written_files_have_the_permissions_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    (tmp_path / "plaindir").mkdir()
    pio.write_text(tmp_path / "atomic.txt", "x")
    with pio.atomic_dir(tmp_path / "atomicdir") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "atomic.txt").stat().st_mode == plain.stat().st_mode
    assert (tmp_path / "atomicdir").stat().st_mode == (tmp_path / "plaindir").stat().st_mode


def test_files_a_library_writes_privately_get_the_permissions_of_a_plain_open(tmp_path):
    """safetensors' save_file (0.8) creates its file 0600: merged/, adapter/ and model/ weights were unreadable to
    anyone but their owner (a teammate, a server running as another user), while their config.json was not."""
    import torch
    from safetensors.torch import save_file

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    with pio.atomic_dir(tmp_path / "merged") as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp / "model.safetensors"))
        (tmp / "sub").mkdir()
        save_file({"w": torch.zeros(2)}, str(tmp / "sub" / "shard.safetensors"))
    for path in (tmp_path / "merged" / "model.safetensors", tmp_path / "merged" / "sub" / "shard.safetensors"):
        assert oct(path.stat().st_mode) == oct(plain.stat().st_mode), path


@pytest.mark.parametrize("inner", ["dir", "file"])
def test_a_full_disk_inside_a_nested_write_names_the_target(tmp_path, monkeypatch, inner):
    """merge/export write the model with save_hf (an atomic_dir) and config files (write_json) inside export()'s own
    atomic_dir: on a full disk the message named the temp folder (`.merged.tmp-host-pid-xyz: no space left ...; the
    previous .merged.tmp-host-pid-xyz, if any, is unchanged`), not the export_dir the user asked for."""
    target = tmp_path / "merged"
    with pio.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("old")
    full_disk(monkeypatch, when=lambda path: "new" in path)
    with pytest.raises(UserError) as err, pio.atomic_dir(target) as tmp:
        if inner == "dir":
            with pio.atomic_dir(tmp) as nested:
                (nested / "new").write_text("x")
        else:
            pio.write_json(tmp / "new.json", {})
    (message,) = err.value.messages
    assert message.startswith(f"{target}: no space left on device") and "previous merged, if any" in message, message
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_place_that_cannot_be_written_is_one_message(tmp_path, monkeypatch, code):
    """merge/export into a read-only file system (or a folder the user may not write) ended in a traceback
    (`OSError: [Errno 30] Read-only file system: 'ro/.m.tmp-...'` from mkdtemp): now a UserError naming the target."""
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code), str(tmp_path / ".m.tmp-x"))
    monkeypatch.setattr(pio.tempfile, "mkdtemp", refuse)
    monkeypatch.setattr(pio.tempfile, "mkstemp", refuse)
    for write in (lambda: pio.atomic_dir(tmp_path / "m").__enter__(), lambda: pio.write_json(tmp_path / "m.json", {})):
        with pytest.raises(UserError) as err:
            write()
        (message,) = err.value.messages
        assert message.startswith(f"{tmp_path / 'm'}") and os.strerror(code) in message and "choose" in message, message
