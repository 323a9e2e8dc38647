"""Mistakes a careless user makes, through the CLI as they type it: one exit-2 message each, no traceback,
nothing written (found by a bug hunt; each test names what used to happen instead)."""
from __future__ import annotations

import shutil
from pathlib import Path

from tests.acceptance.harness import pipeline, write_data, write_hf_checkpoint, write_recipe


def refused(*args: str, cwd: Path) -> str:
    """stderr of a command that must exit 2 with one message and no traceback."""
    result = pipeline(*args, cwd=cwd, expect=2)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def test_a_model_folders_own_tokenizer_larger_than_its_embedding_table(tmp_path):
    """The tokenizer files of a Llama folder (384 ids) beside weights of 256 rows, as when tokenizer files come
    from another download: refused before training (it was an IndexError traceback mid-run, leaving
    ds_config.json and resolved.yaml in output_dir, which then blocked the rerun as "not empty")."""
    write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True, vocab_size=256)
    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="llama", dataset_dir="data", template="llama3",
                          output_dir="saves/r")
    for command in ("validate", "train"):
        err = refused(command, recipe, cwd=tmp_path)
        assert "model_name_or_path: its tokenizer files have 384 token ids, more than the 256 rows" in err, err
        assert "tokenizer_name_or_path" in err
    assert not (tmp_path / "saves").exists()


def test_a_file_where_an_output_directory_must_go(tmp_path):
    """output_dir / export_dir under a file, a dataset_dir whose build/ is a file, a link to nothing: one message
    naming what is in the way (each was a FileExistsError / NotADirectoryError traceback, exit 1)."""
    write_data(tmp_path / "data")
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r")
    for command, key, value in (("train", "output_dir", "notes.txt/run"), ("merge", "export_dir", "notes.txt/a/b"),
                                ("train", "output_dir", "gone/run")):
        err = refused(command, recipe, f"{key}={value}", cwd=tmp_path)
        blocker = "gone is a symbolic link to nothing" if value.startswith("gone") else "notes.txt is a file"
        assert f"{key}: {value} cannot be created: {blocker}, not a directory; move it away" in err, err
    (tmp_path / "data" / "build").write_text("")
    err = refused("build", recipe, cwd=tmp_path)
    assert "data/build/tiny_sft cannot be created: data/build is a file, not a directory" in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine\n" and not (tmp_path / "saves").exists()
