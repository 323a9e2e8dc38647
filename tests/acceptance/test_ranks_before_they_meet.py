"""Which processes are ranks, and what each says, before the ranks meet (pipeline.launched, pipeline.runtime.dist).

A command no launcher starts on ranks (validate, build, merge, chat, export, plan) in a shell or a pod that kept a
RANK (a Kubeflow worker pod sets RANK and WORLD_SIZE for its own reasons) is one process, rank 0 of one, and says its
notes (launched.stray_rank): it said nothing of them (RANK=3 beside WORLD_SIZE=4), or was refused outright
("environment RANK=3 is not below WORLD_SIZE=1"). A rank the launcher started (WORLD_SIZE and LOCAL_RANK with it)
stays quiet. overwrite_cache's early look at train's output_dir lock (__main__.refuse_before_build) is every rank's,
so that each refuses with rank 0's one message (print_errors says it once a job): rank 1 looked at no lock and said
that output_dir was not empty, beside rank 0's "in use". Goldens: the notice and the refusal as written by hand.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.lock import exclusive
from tests.acceptance.harness import cli_env, pipeline, write_recipe

KUBEFLOW_POD = {"RANK": "3", "WORLD_SIZE": "4", "MASTER_ADDR": "job-master-0", "MASTER_PORT": "23456"}
JOB = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29511"}
RANK_1_OF_2 = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_SIZE": "2", **JOB}  # DeepSpeed's launcher's


def test_a_rank_is_a_launchers_for_the_commands_it_launches_or_where_it_started_the_process():
    from pipeline.launched import stray_rank

    assert stray_rank("validate", {"RANK": "3"}) and stray_rank("merge", KUBEFLOW_POD)
    assert stray_rank("chat", {"RANK": "1", "WORLD_SIZE": "2"})  # torchrun gives every rank LOCAL_RANK too
    assert not stray_rank("validate", RANK_1_OF_2)  # a command someone launched on ranks: rank 1 stays quiet
    assert not stray_rank("train", KUBEFLOW_POD)  # one process per pod is a launch: rank 0 alone takes the lock
    assert not stray_rank("eval", {"RANK": "1", "WORLD_SIZE": "2"}) and not stray_rank("merge", {})


@pytest.mark.parametrize("environ, as_typed", [({"RANK": "3"}, True), (KUBEFLOW_POD, False)], ids=["shell", "pod"])
def test_a_command_in_a_shell_that_kept_a_rank_says_its_notices(workdir: Path, environ, as_typed):
    """build and validate (as typed in that shell) each say the recipe's notice (failed before: the shell's exit 2,
    "environment RANK=3 is not below WORLD_SIZE=1"; the pod's, no notice)."""
    write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r", tf32=True)
    line = next(i for i, text in enumerate((workdir / "r.yaml").read_text().splitlines(), 1) if text.startswith("tf32"))
    notice = f"notice: r.yaml:{line}:7: tf32: accepted without effect: "  # column 7: the value after `tf32: `
    for command in ("build", "validate"):
        err = pipeline(command, "r.yaml", cwd=workdir, as_typed=as_typed and command == "validate",
                       env=cli_env(**environ)).stderr
        assert [text for text in err.splitlines() if text.startswith(notice)], err


def test_every_rank_refuses_an_output_dir_another_run_holds_with_rank_0s_message(workdir: Path, monkeypatch):
    """train with overwrite_cache, its output_dir locked by another run and holding its files: rank 1's refusal is
    rank 0's, word for word (before, rank 1 looked at no lock: 'saves/r is not empty ...'); as typed on rank 1 too.
    A lock its own job's rank 0 holds is no refusal."""
    from pipeline.__main__ import refuse_before_build
    from pipeline.recipe import resolve

    write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                 overwrite_cache=True)
    (workdir / "saves" / "r").mkdir(parents=True)
    (workdir / "saves" / "r" / "notes.txt").write_text("the other run's\n", encoding="utf-8")
    monkeypatch.chdir(workdir)
    args = argparse.Namespace(dry_run=False, retrain_finished=False)
    said = []
    with exclusive(workdir / "saves" / "r", "the other run"):
        for environ in ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "2", **JOB}, RANK_1_OF_2):
            for name, value in environ.items():
                monkeypatch.setenv(name, value)
            with pytest.raises(UserError) as refused:
                refuse_before_build("train", resolve("r.yaml", command="train"), args)
            said.append(refused.value.messages)
        typed = pipeline("train", "r.yaml", cwd=workdir, expect=2, env=cli_env(**RANK_1_OF_2)).stderr
    line = next(i for i, text in enumerate((workdir / "r.yaml").read_text().splitlines(), 1)
                if text.startswith("output_dir"))
    [first], [second] = said
    assert first == second and first.startswith(f"r.yaml:{line}: output_dir: saves/r is in use by `the other run` "
                                                "(pid "), said
    assert typed == f"error: {first}\n", typed
    # the lock of this job's own rank 0, which went through the build first and waits for the ranks to meet, is not
    # another run's: rank 1 goes on (a lock file naming the job rank 0 is of, pipeline.launched.job_of)
    (workdir / "saves" / "r" / "notes.txt").unlink()
    with exclusive(workdir / "saves" / "r", "python -m pipeline train r.yaml", job="10.0.0.1:29511"):
        refuse_before_build("train", resolve("r.yaml", command="train"), args)


def test_rank_0_refuses_a_lock_of_another_job_on_the_same_master_port(workdir: Path, monkeypatch):
    """Two DeepSpeed launches on one machine, both on its default MASTER_PORT (or the same one set by hand): the
    first trains in saves/r, holding its lock with the job name both share (this host/127.0.0.1:29500). The second
    job's rank 0 never finds its own job's lock there (it takes it itself, after the build): it refuses with the
    lock's message. Before, it took the first job's lock for its own and went on to overwrite_cache's build of the
    data the first job trains on."""
    from pipeline.__main__ import refuse_before_build
    from pipeline.launched import job_of
    from pipeline.recipe import resolve

    write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                 overwrite_cache=True)
    monkeypatch.chdir(workdir)
    same_port = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": "29500"}
    for name, value in same_port.items():
        monkeypatch.setenv(name, value)
    args = argparse.Namespace(dry_run=False, retrain_finished=False)
    with exclusive(workdir / "saves" / "r", "python -m pipeline train r.yaml", job=job_of()):
        with pytest.raises(UserError) as refused:
            refuse_before_build("train", resolve("r.yaml", command="train"), args)
    [message] = refused.value.messages
    assert "saves/r is in use by `python -m pipeline train r.yaml` (pid " in message, message
