"""The papercuts a user meets in `make all` and in the dry run, through make and the CLI as typed.

One tiny LoRA run (the `tiny` preset, one step) is made by `make all` once for the module, with a recipe that sets
keys a ported LLaMA-Factory recipe carries (num_train_epochs beside max_steps, trust_remote_code) and data with a
few rows too long for cutoff_len; the checks share it.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.acceptance import harness

pytestmark = pytest.mark.slow  # one `make all` (build, validate, a one-step train, merge, eval): ~20 s on 2 cores

LONG = {"instruction": "Repeat: " + " ".join(harness.WORDS), "input": "", "output": "x"}  # over cutoff_len 48
EPOCHS = "num_train_epochs: 2 has no effect: max_steps 1"
TRUST = "trust_remote_code: accepted; no remote code ever runs here"
WORKERS = "dataloader_num_workers: "


def notice_lines(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("notice:") and text in line]


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, str, subprocess.CompletedProcess]:
    """(the scratch repo, its VENV= argument, `make all`'s result) for recipes/t.yaml."""
    repo = harness.scratch_repo(tmp_path_factory.mktemp("repo"))
    harness.write_data(repo / "datasets")
    with open(repo / "datasets" / "raw" / "sft.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(LONG) + "\n")
    # an evaluation set of its own (demo_test's part in demo_sft.yaml), for the checks that name it in eval_dataset
    rows = harness.sft_rows(10, seed=5)
    (repo / "datasets" / "raw" / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    registry = json.loads((repo / "datasets" / "dataset_info.json").read_text(encoding="utf-8"))
    registry["tiny_eval"] = {"file_name": "raw/eval.jsonl", "formatting": "alpaca"}
    (repo / "datasets" / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")
    (repo / "recipes").mkdir()
    from pipeline.data.build import usable_cores

    harness.write_recipe(repo / "recipes" / "t.yaml", model_name_or_path="tiny", output_dir="saves/t", max_steps=1,
                         num_train_epochs=2, trust_remote_code=True, dataloader_num_workers=usable_cores() + 1)
    venv = f"VENV={repo / 'venv'}"
    return repo, venv, harness.make("all", "RECIPE=recipes/t.yaml", venv, cwd=repo)


def test_each_recipe_notice_is_said_once_per_make_all(made):
    """validate says them (it checks the recipe, and reads the checkpoint first in the chain); train, merge and
    eval, which follow it, do not repeat them. Failed before: build, validate, train, merge and eval each said both
    (five times)."""
    repo, _, done = made
    assert harness.make_stages(done) == [(c, "recipes/t.yaml") for c in ("build", "validate", "train", "merge", "eval")]
    assert len(notice_lines(done.stderr, EPOCHS)) == 1, done.stderr
    assert len(notice_lines(done.stderr, TRUST)) == 1, done.stderr
    # train's workers (validate's loader and eval's never start any): failed before, 3 times (validate, train, eval)
    assert len(notice_lines(done.stderr, WORKERS)) == 1, done.stderr
    # a stage run alone, as typed, still says them: validate and plan (which check and show the recipe)
    for command in ("validate", "plan"):
        err = harness.pipeline(command, "recipes/t.yaml", cwd=repo, as_typed=False).stderr
        assert len(notice_lines(err, EPOCHS)) == 1 and len(notice_lines(err, TRUST)) == 1, (command, err)


def test_make_all_names_the_report_once_last(made):
    """eval's summary line named it, then make's own last line again. Failed before: two `report:`."""
    _, _, done = made
    said = [line for line in (done.stdout + done.stderr).splitlines() if "report: " in line]
    assert said == ["report: saves/t/eval/report.md"], said
    assert done.stdout.rstrip().endswith("report: saves/t/eval/report.md")
    assert any(line.startswith("eval: base: loss ") for line in done.stderr.splitlines()), done.stderr


def test_validate_counts_the_rows_each_stage_reads(made):
    """With eval_dataset, eval reads the whole of an evaluation-only dataset (its train.json and val.json) and
    training reads the training dataset's val.json too (load.split_files): the table says so, one row per dataset and
    use. Failed before: one row per built file, tiny_eval as train 9 / val 1 and tiny_sft as train 22 / val 3."""
    repo, _, _ = made
    harness.pipeline("build", "recipes/t.yaml", "eval_dataset=tiny_eval", cwd=repo, as_typed=False)
    out = harness.pipeline("validate", "recipes/t.yaml", "eval_dataset=tiny_eval", cwd=repo).stdout
    table = [line.split()[:3] for line in out.splitlines()[out.splitlines().index(next(
        line for line in out.splitlines() if line.startswith("dataset "))) + 1:] if line.startswith("tiny_")]
    assert table == [["tiny_sft", "train", "25"], ["tiny_eval", "val", "10"]], out


DROPPED = ("note: 1 of the 22 training rows are longer than cutoff_len 48 and are left out (overlength_policy: drop, "
           "the default here; LLaMA-Factory cuts them instead): set overlength_policy: truncate to keep them with "
           "their responses cut, or raise cutoff_len")


@pytest.fixture(scope="module")
def dry_run_alone(made) -> subprocess.CompletedProcess:
    """`python -m pipeline train recipes/t.yaml --dry-run` as typed, into an output_dir that does not exist yet
    (saves/new/run: saves/ is its nearest existing parent); `.saves`: saves/'s (entries, mtime_ns) before and after
    (taken at once: the lock test's holder changes saves/ later)."""
    repo, _, _ = made
    saves = repo / "saves"

    def state() -> tuple[list[str], int]:
        return sorted(p.name for p in saves.iterdir()), saves.stat().st_mtime_ns

    before = state()
    done = harness.pipeline("train", "recipes/t.yaml", "--dry-run", "output_dir=saves/new/run", cwd=repo)
    done.saves = (before, state())
    return done


def test_train_says_the_rows_it_leaves_out_once_in_validates_words(made, dry_run_alone):
    """The one row over cutoff_len 48 (build kept 25 rows: 22 train, 3 val): validate says it, and train typed alone
    says the same line once; under make (which runs validate first) once in all. Failed before: train said nothing."""
    _, _, done = made
    assert (done.stdout + done.stderr).splitlines().count(DROPPED) == 1, done.stdout + done.stderr
    assert dry_run_alone.stderr.splitlines().count(DROPPED) == 1, dry_run_alone.stderr
    # and the recipe's notices, which a stage typed alone must still say
    assert len(notice_lines(dry_run_alone.stderr, EPOCHS)) == 1 and len(notice_lines(dry_run_alone.stderr, TRUST)) == 1


def test_the_commands_messages_give_carry_the_overrides_typed(made):
    """eval and merge of a run not trained yet name the training that produces it with the overrides the user gave
    (rerun.run_this, which make_data's hint uses too): without them `make train` trained saves/t, not saves/none.
    Failed before: `make train RECIPE=recipes/t.yaml` (python -m pipeline train), the overrides left out."""
    repo, _, _ = made
    train = ("`make train RECIPE=recipes/t.yaml ARGS='output_dir=saves/none max_steps=3'` (python -m pipeline train "
             "recipes/t.yaml output_dir=saves/none max_steps=3)")
    err = harness.refused("eval", "recipes/t.yaml", "output_dir=saves/none", "max_steps=3", cwd=repo, as_typed=False)
    assert f"error: saves/none/adapter: no trained adapter to evaluate; {train} produces it" in err.splitlines(), err
    err = harness.refused("merge", "recipes/t.yaml", "output_dir=saves/none", "max_steps=3", cwd=repo, as_typed=False)
    assert f"). {train} produces output_dir/adapter/;" in err, err


@pytest.fixture(scope="module")
def dry_run_of_the_finished_run(made) -> tuple[subprocess.CompletedProcess, Path, str]:
    """`make dry-run` of the finished saves/t while a real run (this test process, as `python -m pipeline train`
    would) holds its lock: (the result, the lock file, what the holder wrote into it)."""
    from pipeline.lock import exclusive, lock_path

    repo, venv, _ = made
    with exclusive(repo / "saves" / "t", "python -m pipeline train recipes/t.yaml", writes=True) as lock:
        held = lock.read_text(encoding="utf-8")
        done = harness.make("dry-run", "RECIPE=recipes/t.yaml", venv, cwd=repo)
        assert lock.read_text(encoding="utf-8") == held  # the dry run neither took nor rewrote it
    assert not lock_path(repo / "saves" / "t").exists()  # and the holder's release removed it as usual
    return done, lock, held


def warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning:")]


def test_a_dry_run_says_a_real_run_holds_the_lock_without_taking_it(dry_run_of_the_finished_run):
    """pipeline.lock.in_use: a shared lock asked for without waiting, let go at once. Failed before: no word of the
    run under way (the real run would stop at the lock)."""
    done, lock, _ = dry_run_of_the_finished_run
    assert "dry run: ok" in done.stdout, done.stdout
    said = [line for line in warnings(done.stderr) if " is in use by " in line]
    assert len(said) == 1, done.stderr
    assert (f"output_dir: saves/t is in use by `python -m pipeline train recipes/t.yaml` (pid {os.getpid()} on host "
            in said[0]), said
    assert said[0].endswith("The lock is saves/.t.lock. The real run would stop there; this dry run writes only to a "
                            "temporary folder, so it goes on"), said


def test_a_dry_run_of_a_finished_run_says_what_the_real_run_would_do(dry_run_of_the_finished_run):
    """RunLayout.start_refusal names a finished run as one: the real run refuses it, resume_from_checkpoint: latest
    continues it (only with more steps), overwrite_output_dir: true trains it again, and `make train` does that
    itself for its own recipe once the recipe changes (and, as make retrains only a stale run, the command that does
    so now: train --retrain-finished). Failed before: the generic "is not empty (it holds adapter,
    all_results.json, ...); set resume_from_checkpoint: latest to continue that run" of a folder holding anything."""
    done, _, _ = dry_run_of_the_finished_run
    said = [line for line in warnings(done.stderr) if "finished run" in line]
    assert len(said) == 1 and said[0].endswith(
        "output_dir: saves/t is not empty: it holds a finished run of recipes/t.yaml (all_results.json), which a new "
        "run neither continues nor replaces unless told: resume_from_checkpoint: latest continues it (with more "
        "steps: raise max_steps or num_train_epochs, it trained all it was asked), overwrite_output_dir: true trains "
        "again from scratch (its contents are removed) (`make train` does so itself once the recipe or its ARGS "
        "change; `python -m pipeline train recipes/t.yaml --retrain-finished` does so now, without an edit); or "
        "choose another output_dir. The real run would stop there; this dry run writes only to a "
        "temporary folder, so it goes on"), done.stderr


def test_a_dry_run_probes_a_missing_output_dir_without_writing(dry_run_alone):
    """The write probe of saves/new/run (pipeline.lock.unwritable) is a file without a name in saves/, so saves/
    keeps its entries and its mtime (make reads folder times). Failed before: a named probe file, created and
    removed, changed saves/'s mtime."""
    assert "dry run: ok" in dry_run_alone.stdout and warnings(dry_run_alone.stderr) == [], dry_run_alone.stderr
    before, after = dry_run_alone.saves
    assert after == before
