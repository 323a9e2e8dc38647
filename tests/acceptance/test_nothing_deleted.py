"""What train's overwrite_output_dir and merge / export would delete, pointed at the wrong folder, is refused first.

Both clear a folder as a whole: train empties output_dir, merge and export swap a new export_dir in and delete what
was there. A bug hunt pointed them at the base model, the data, the folder of all runs, the project and a file of
notes: each time something of the user's was deleted, with exit 0. Now each is one exit-2 message, and every file
is still there afterwards (pipeline/runtime/guard.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.acceptance.harness import files_under, pipeline, refused, write_recipe


@pytest.fixture(scope="module")
def project(tmp_path_factory, hf_checkpoint) -> Path:
    """A project with a base model, data, notes and one trained LoRA run (saves/run) beside another (saves/other)."""
    from tests.acceptance.harness import write_data

    root = tmp_path_factory.mktemp("project")
    write_data(root / "data")
    (root / "notes.txt").write_text("keep me")
    (root / "base").symlink_to(hf_checkpoint("gpt2"))
    write_recipe(root / "r.yaml", model_name_or_path="base", dataset_dir="data", output_dir="saves/run", max_steps=1)
    pipeline("build", "r.yaml", cwd=root)
    pipeline("train", "r.yaml", cwd=root)
    pipeline("train", "r.yaml", "output_dir=saves/other", cwd=root)
    return root


# one case of each command runs as a user types it (a fresh `python -m pipeline`: its exit code and stderr); the
# others run in this process (main(argv)), the same refusal without an interpreter start and torch's import each
AS_TYPED = {("merge", "export_dir=saves"), ("train", "output_dir=saves")}


@pytest.mark.parametrize("command,override,words", [
    ("merge", "export_dir=saves", "export_dir: saves holds output_dir, the run merged from, which this command would "
                                  "delete"),
    ("merge", "export_dir=.", "export_dir: . holds dataset_dir, which this command would delete"),
    ("merge", "export_dir=notes.txt", "export_dir: notes.txt is a file, not a directory"),
    ("merge", "export_dir=data", "export_dir: data is dataset_dir, which this command would delete"),
    ("train", "output_dir=saves", "output_dir: saves holds other training runs (other, run)"),
    ("train", "output_dir=data", "output_dir: data is dataset_dir, which this command would delete"),
    ("train", "output_dir=.", "output_dir: . holds dataset_dir, which this command would delete"),
    # a subfolder of dataset_dir holding the raw files: emptied with exit 0 before
    ("train", "output_dir=data/raw", "output_dir: data/raw holds the data file data/raw/sft.jsonl of dataset "
                                     "'tiny_sft', which this command would delete"),
])
def test_a_folder_of_the_users_is_never_cleared(project, command, override, words):
    before = files_under(project)
    stderr = refused(command, "r.yaml", override, "overwrite_output_dir=true", cwd=project,
                     as_typed=(command, override) in AS_TYPED)
    assert words in stderr and "Traceback" not in stderr, stderr
    assert files_under(project) == before  # nothing deleted, nothing half-written


def test_an_earlier_export_is_replaced_and_a_foreign_folder_is_not(project):
    pipeline("merge", "r.yaml", "export_dir=exported", cwd=project)
    # the replacing merge and the refusal in-process (as_typed=False: the same command, no interpreter start; merge
    # keeps no process state)
    pipeline("merge", "r.yaml", "export_dir=exported", cwd=project, as_typed=False)  # ours (verification.json): replaced
    (project / "thesis").mkdir()
    (project / "thesis" / "chapter1.tex").write_text("...")
    failed = pipeline("merge", "r.yaml", "export_dir=thesis", cwd=project, expect=2, as_typed=False)
    assert "export_dir: thesis already holds other files (chapter1.tex) and no verification.json" in failed.stderr
    assert (project / "thesis" / "chapter1.tex").read_text() == "..."
