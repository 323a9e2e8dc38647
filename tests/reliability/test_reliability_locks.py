"""Races: two runs on one output directory. A second `train` on an output_dir a live run writes, a second
`build` of a dataset being built, a second `merge` into the same merged/: one exit-2 message naming the
running one, and nothing written. A lock whose owner died (SIGKILL) is stale: the next run takes it. Temp
checkpoint folders carry their owner; start-up deletes only those of dead owners.

Every trial waits for the phase it means (a line the holder prints, a record in trainer_log.jsonl), never
for a time."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.lock import lock_path
from tests.reliability import figures
from tests.reliability.rel_helpers import PYTHON, assert_user_error, clean_env, make_project, run_cli, run_main

HOLD = ("import sys, time\n"
        "from pipeline.lock import exclusive\n"
        "with exclusive(sys.argv[1], 'python -m pipeline holder'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(600)\n")


class Holder:
    """Another process holding the lock on `target` (a run of the pipeline, as far as the lock can tell)."""

    def __init__(self, target: Path, cwd: Path):
        self.proc = subprocess.Popen([PYTHON, "-c", HOLD, str(target)], cwd=cwd, env=clean_env(),
                                     stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # the phase: the lock is held
        assert line.strip() == "locked", line

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=60)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


def test_a_build_of_a_dataset_being_built_is_refused_naming_the_running_one(project: Path):
    holder = Holder(Path("data/build/a"), project)
    try:
        result = run_cli(["build", "r.yaml"], project)
        assert_user_error(result, "data/build/a is in use by `python -m pipeline holder`",
                          f"pid {holder.proc.pid} on host", kind="race")
        assert not (project / "data" / "build" / "a").exists()
    finally:
        holder.kill()
    assert run_main(["build", "r.yaml"], project).code == 0  # the owner died: its lock is stale


def test_a_rebuild_asked_by_train_waits_for_a_build_under_way(project: Path):
    """overwrite_cache: train/eval's own build waits for the lock (another rank, a `make data`), then goes on."""
    holder = Holder(Path("data/build/a"), project)
    waiter = subprocess.Popen([PYTHON, "-c", "from pipeline.lock import exclusive\n"
                               "with exclusive('data/build/a', 'python -m pipeline train r.yaml', wait=True):\n"
                               "    print('locked', flush=True)\n"], cwd=project, env=clean_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        said = waiter.stderr.readline()  # the phase: it found the lock taken and waits
        assert "data/build/a: waiting for `python -m pipeline holder`" in said, said
        assert waiter.poll() is None
    finally:
        holder.kill()
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0 and out == "locked\n", err
    figures.record("race")


def test_a_merge_into_a_merged_dir_being_written_is_refused(project: Path):
    holder = Holder(Path("out/merged"), project)
    try:
        assert_user_error(run_main(["merge", "r.yaml"], project), "r.yaml:7: output_dir: out/merged is in use by",
                          f"pid {holder.proc.pid}", kind="race")
    finally:
        holder.kill()


def test_a_lock_left_by_a_killed_run_is_stale_and_taken_over(project: Path):
    holder = Holder(Path("data/build/a"), project)
    holder.kill()  # SIGKILL: no chance to clean up
    assert lock_path(project / "data/build/a").exists()  # the file stays, the kernel's lock does not
    result = run_main(["build", "r.yaml"], project)
    assert result.code == 0, result.err
    assert not lock_path(project / "data/build/a").exists()  # released and removed at the end
    figures.record("race")


def test_a_failed_run_leaves_no_lock_and_no_folder(project: Path):
    (project / "r.yaml").write_text((project / "r.yaml").read_text().replace("output_dir: out", "output_dir: a/b/out"))
    result = run_main(["train", "r.yaml"], project)  # not built: a user error before anything is written
    assert result.code == 2
    assert not (project / "a").exists()


def test_a_second_train_on_a_running_output_dir_is_refused_naming_the_running_one(project: Path):
    assert run_main(["build", "r.yaml"], project).code == 0
    first = subprocess.Popen([PYTHON, "-m", "pipeline", "train", "r.yaml", "max_steps=500", "save_steps=100",
                              "logging_steps=1"], cwd=project, env=clean_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        log = project / "out" / "trainer_log.jsonl"
        deadline = time.monotonic() + 600
        while not (log.exists() and log.read_text().strip()):  # the phase: the first run is training
            assert first.poll() is None, first.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = run_cli(["train", "r.yaml", "overwrite_output_dir=true"], project)
        assert_user_error(second, "r.yaml:7: output_dir: out is in use by `python -m pipeline train r.yaml`",
                          f"pid {first.pid} on host", kind="race")
        assert first.poll() is None and log.read_text().strip()  # the first run goes on, its output untouched
    finally:
        os.killpg(first.pid, signal.SIGINT)
        first.communicate(timeout=300)
    assert first.returncode == 130
    assert not lock_path(project / "out").exists()


def test_start_up_deletes_only_temp_checkpoints_of_dead_owners(tmp_path: Path):
    from pipeline.io import _HOST
    from pipeline.train import checkpoint

    out = tmp_path / "out"
    live = subprocess.Popen([PYTHON, "-c", "import time; time.sleep(600)"])
    dead = subprocess.Popen([PYTHON, "-c", "pass"])
    dead.wait()
    try:
        names = {"live": f".checkpoint-4.tmp-{_HOST}-{live.pid}", "dead": f".checkpoint-5.tmp-{_HOST}-{dead.pid}",
                 "legacy": ".checkpoint-6.tmp", "old_dead": f".checkpoint-7.old-{_HOST}-{dead.pid}"}
        for name in names.values():
            (out / name).mkdir(parents=True)
            (out / name / "half-written").write_text("x")
        checkpoint.clean_stale(out)
        assert sorted(p.name for p in out.iterdir()) == [names["live"]]  # a live run's save in progress stays
        figures.record("race")
    finally:
        live.kill()
        live.wait()


def test_an_up_to_date_build_in_a_read_only_folder_needs_no_lock(project: Path, monkeypatch):
    """A shared, already built dataset folder the user cannot write: `build` says up to date, as before locks."""
    import errno

    assert run_main(["build", "r.yaml"], project).code == 0
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # the folder refuses new files (EACCES), whoever runs the test
        if str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only)
    result = run_main(["build", "r.yaml"], project)
    assert result.code == 0 and "up to date" in result.out, result.err
    figures.record("race")


def test_a_dry_runs_probe_does_not_make_a_starting_run_refuse(tmp_path: Path, monkeypatch):
    """in_use (the dry run's look at the lock) holds a shared lock on a stale lock file for an instant; a real run
    trying the lock in that instant called it in use by 'another run' and refused to start. It now tries again
    for PROBE_PATIENCE: here the probe's lock is let go at the run's first retry (no clock involved), and the run
    takes the lock. A live holder is still refused after the patience (the tests above). Failed before: UserError
    '... is in use by ...'."""
    import fcntl

    from pipeline import lock

    target = tmp_path / "out"
    lock_path(target).write_text("")  # stale: a killed run's
    probe = os.open(lock_path(target), os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the probe's instant
    retries = []

    def retry(seconds: float) -> None:  # the probe closes its file: its shared lock goes with it
        if not retries:
            os.close(probe)
        retries.append(seconds)
    monkeypatch.setattr(lock.time, "sleep", retry)
    with lock.exclusive(target, "train r.yaml") as held:
        assert held == lock_path(target) and '"command": "train r.yaml"' in held.read_text()
    assert len(retries) == 1


def test_ctrl_c_while_retrying_a_lock_leaves_no_folder_and_no_lock_file(tmp_path: Path, monkeypatch):
    """exclusive() makes output_dir's missing parents to hold the lock file. A Ctrl-C while it retries a lock held
    for an instant (_lock_within: a dry run's probe, here the first try failing) left those folders and the lock file
    behind; now nothing of them stays. A lock file another run holds stays, with its folder. Failed before: a/b/ and
    a/b/.out.lock were there after the Ctrl-C."""
    import fcntl

    from pipeline import lock

    tries = []

    def held_once(fd: int) -> bool:  # another run holds it at the first try only
        tries.append(fd)
        return len(tries) > 1 and real_try(fd)

    def ctrl_c(seconds: float) -> None:
        raise KeyboardInterrupt

    real_try = lock._try_lock
    monkeypatch.setattr(lock, "_try_lock", held_once)
    monkeypatch.setattr(lock.time, "sleep", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        with lock.exclusive(tmp_path / "a" / "b" / "out", "train r.yaml", writes=True):
            raise AssertionError("the lock was never taken")
    assert list(tmp_path.iterdir()) == []

    monkeypatch.setattr(lock, "_try_lock", real_try)
    (tmp_path / "c").mkdir()
    holder = os.open(lock_path(tmp_path / "c" / "out"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a live run's lock
    try:
        with pytest.raises(KeyboardInterrupt):
            with lock.exclusive(tmp_path / "c" / "out", "train r.yaml", writes=True):
                raise AssertionError("the lock was never taken")
        assert [p.name for p in (tmp_path / "c").iterdir()] == [".out.lock"]
    finally:
        os.close(holder)
