"""What plan and validate keep beside a build (pipeline.data.kept) as a user runs them: `python -m pipeline validate /
plan` on the workdir's tiny_sft and tiny_pt (the pt corpus under a tiktoken tokenizer.model, Meta's Llama 3 format). A first validate hashes each
tokenizer file once and writes each count once; a repeat validate of an unchanged build reads no row and says the
same; a failure is never kept; a read-only dataset folder plans and validates as one that keeps nothing.

validate runs as typed once; the further calls run main(argv) in this process (as_typed=False), where the
monkeypatches that count the hashing, the writes and the rows read reach."""
from __future__ import annotations

import errno
import json
from collections import Counter
from pathlib import Path

import pytest

from pipeline import io
from pipeline.data import check, kept, load
from tests.acceptance.harness import pipeline, write_recipe

# The workdir's tiny_sft: 24 rows (harness.sft_rows), val_size 0.1 holds out ceil(2.4) = 3: 21 train rows, 3 val rows.
HAND_ROWS = {"train": 21, "val": 3}


def _recipe(workdir: Path) -> Path:
    """The harness's sft recipe on the `tiny` preset (GPT-2's tokenizer), built."""
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    return recipe


def _kept(workdir: Path, dataset: str = "tiny_sft") -> list[str]:
    folder = workdir / "data/build" / dataset / kept.FOLDER
    return sorted(p.name.split("-")[0] for p in folder.iterdir()) if folder.is_dir() else []


def test_a_first_validate_hashes_each_tokenizer_file_once_and_writes_each_result_once(workdir, monkeypatch):
    """validate counts the train split (plan's count: a miss), builds train's loader (which keeps what it counted),
    then counts both splits again: one key of each, one write of each, under a tokenizer read from a folder
    (tokenizer_name_or_path: a top-level tiktoken tokenizer.model, Meta's Llama 3 layout); train's loader writes
    nothing more. Failed before (measured): the tokenizer's file hashed 7 times by one validate, and train's loader
    wrote the kept count again (a new file every train)."""
    from pipeline.data.loaders import make_loader
    from pipeline.recipe.args import data_args
    from pipeline.recipe.resolve import resolve
    from tests.helpers.tiktoken_vocab import tiktoken_model

    (workdir / "tok").mkdir()
    (workdir / "tok/tokenizer.model").write_text(tiktoken_model(b"xy"), encoding="utf-8")
    write_recipe(workdir / "pt.yaml", model_name_or_path="tiny", tokenizer_name_or_path="tok", dataset_dir="data",
                 output_dir="saves/pt", stage="pt", dataset="tiny_pt", template=None, cutoff_len=8,
                 per_device_train_batch_size=1)
    pipeline("build", "pt.yaml", cwd=workdir, as_typed=False)
    hashed, written = Counter(), Counter()
    hash_file, write = load.sha256_file, kept.write_json
    monkeypatch.setattr(load, "sha256_file", lambda path: hashed.update([str(path)]) or hash_file(path))
    monkeypatch.setattr(kept, "write_json", lambda path, obj: written.update([Path(path).name.split("-")[0]]) or
                        write(path, obj))
    pipeline("validate", "pt.yaml", cwd=workdir, as_typed=False)
    assert hashed[str(workdir / "tok/tokenizer.model")] == 1, hashed
    assert written == {"train": 1, "val": 1, "check": 1}
    pipeline("plan", "pt.yaml", cwd=workdir, as_typed=False)
    assert written == {"train": 1, "val": 1, "check": 1} and _kept(workdir, "tiny_pt") == ["check", "train", "val"]
    # train's loader, which keeps what it counted: that count is kept already
    monkeypatch.chdir(workdir)  # the recipe's paths are relative to it, as for the commands
    make_loader(data_args(resolve(Path("pt.yaml"), command="train")), "train", say_workers=False)
    assert written == {"train": 1, "val": 1, "check": 1}


def test_a_repeat_validate_reads_no_row_and_says_the_same_and_a_failure_is_never_kept(workdir, monkeypatch):
    rows = [json.loads(line) for line in (workdir / "data/raw/sft.jsonl").read_text("utf-8").splitlines()]
    rows[0]["output"] += " <|endoftext|>"  # typed markup: validate's warning, which a kept verdict must say again
    (workdir / "data/raw/sft.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    _recipe(workdir)
    first = pipeline("validate", "r.yaml", cwd=workdir)
    table = {tuple(line.split()[:3]) for line in first.stdout.splitlines() if line.startswith("tiny_sft ")}
    assert table == {("tiny_sft", split, str(n)) for split, n in HAND_ROWS.items()}, first.stdout
    assert "types '<|endoftext|>'" in first.stderr and _kept(workdir) == ["check", "train", "val"]

    read = []
    read_rows = load.read_rows_hashed
    monkeypatch.setattr(check, "read_rows_hashed", lambda path, data: read.append(path) or read_rows(path, data))
    again = pipeline("validate", "r.yaml", cwd=workdir, as_typed=False)
    assert (again.stdout, again.stderr) == (first.stdout, first.stderr) and read == []  # failed before: 2 files read

    # a row made invalid after the build: refused every time, with the same message, and nothing more kept
    train = workdir / "data/build/tiny_sft/train.json"
    built = json.loads(train.read_text("utf-8"))
    built[1]["output"] = " "
    train.write_text(json.dumps(built), encoding="utf-8")
    said = [pipeline("validate", "r.yaml", cwd=workdir, expect=2, as_typed=False).stderr for _ in range(2)]
    assert said[0] == said[1] and f"{Path('data/build/tiny_sft/train.json')}:2:output" in said[0], said
    assert _kept(workdir) == ["check", "train", "val"] and len(read) == 4  # both files read by each validate


def test_a_read_only_dataset_folder_plans_and_validates_as_one_that_keeps_nothing(workdir, monkeypatch):
    """A shared corpus mounted read-only: every write under the dataset folder fails (EROFS). plan and validate say
    what they say where the results can be kept, exit 0, and print nothing about it."""
    _recipe(workdir)

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(io, "atomic_write", read_only)
    refused = {command: pipeline(command, "r.yaml", cwd=workdir, as_typed=False) for command in ("plan", "validate")}
    assert _kept(workdir) == []
    monkeypatch.undo()
    kept_now = {command: pipeline(command, "r.yaml", cwd=workdir, as_typed=False) for command in ("plan", "validate")}
    assert _kept(workdir) == ["check", "train", "val"]
    for command, done in refused.items():
        assert (done.stdout, done.stderr) == (kept_now[command].stdout, kept_now[command].stderr), command
        assert "Traceback" not in done.stderr and "counts" not in done.stderr


@pytest.mark.slow  # a further variant of the read-only folder: train as typed (a fresh interpreter, torch, DeepSpeed)
def test_train_over_a_dataset_folder_it_cannot_write_trains_as_without_the_cache(workdir):
    """We run as root here, where chmod does not stop a write: counts/ is a plain file instead, which no user can
    make a folder of (every write under it fails: ENOTDIR). train runs its steps, exit 0, no word about it."""
    _recipe(workdir)
    blocker = workdir / "data/build/tiny_sft" / kept.FOLDER
    blocker.write_text("not a folder", encoding="utf-8")
    done = pipeline("train", "r.yaml", cwd=workdir)
    assert json.loads((workdir / "saves/r/all_results.json").read_text(encoding="utf-8"))["global_step"] == 2
    assert "Traceback" not in done.stderr and "counts" not in done.stderr + done.stdout
    assert blocker.read_text(encoding="utf-8") == "not a folder"
