"""The harness itself: family detection from model lines, checkpoint writing (what other suites build on)."""
from __future__ import annotations

import json

import pytest

from tests.acceptance.harness import REPO, cli_env, family_of, family_of_recipe, pipeline, write_hf_checkpoint


def test_cli_env_puts_the_repository_first_and_keeps_the_callers_path(monkeypatch):
    """On a machine without network, bench/gpu_check.sh --wheels puts the missing packages on PYTHONPATH; the CLI the
    tests start must still find them (tests/gpu/test_user_path_cuda.py runs there)."""
    import os

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(["/wheels/site", str(REPO)]))
    assert cli_env()["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/wheels/site"]
    monkeypatch.delenv("PYTHONPATH")
    assert cli_env()["PYTHONPATH"] == str(REPO)


def test_an_in_process_command_sees_a_users_shell_and_leaves_the_process_as_it_was(tmp_path, monkeypatch):
    """pipeline(..., as_typed=False) stands in for the typed command: the same output in a worker that holds a
    launcher variable (an in-process training test sets WORLD_SIZE for the worker; a user's shell has none), and
    cwd, sys.argv, os.environ and the warnings filters as they were afterwards, whatever the command did."""
    import os
    import sys
    import warnings

    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: alpaca_demo\nmax_steps: 2\n", encoding="utf-8")
    monkeypatch.setenv("WORLD_SIZE", "4")
    typed = pipeline("plan", "r.yaml", cwd=tmp_path)
    before = (os.getcwd(), sys.argv[:], dict(os.environ), warnings.filters[:])
    here = pipeline("plan", "r.yaml", cwd=tmp_path, as_typed=False)
    assert (os.getcwd(), sys.argv, dict(os.environ), warnings.filters) == before
    assert "world_size              1" in here.stdout
    assert (here.returncode, here.stdout, here.stderr) == (typed.returncode, typed.stdout, typed.stderr)
    failed = pipeline("plan", "missing.yaml", cwd=tmp_path, as_typed=False, expect=2)
    assert failed.stderr.startswith("error: missing.yaml: recipe not found") and os.getcwd() == before[0]


@pytest.mark.parametrize("line, family", [("models/gpt2-large", "gpt2"), ("openai-community/gpt2", "gpt2"),
                                          ("tiny", "gpt2"), ("gpt2-small", "gpt2"), ("saves/x/model", None),
                                          ("meta-llama/Llama-3.2-1B-Instruct", "llama"), ("llama-3.1-8b", "llama"),
                                          ("Qwen/Qwen3-0.6B", "qwen3"), ("qwen3-8b", "qwen3"),
                                          ("Qwen/Qwen2.5-0.5B-Instruct", "qwen2"), ("qwen2.5-7b", "qwen2"),
                                          ("mistral-7b", "mistral"), ("llama-2-7b", "llama")])
def test_family_of_a_model_line(line, family):
    assert family_of(line) == family


def test_a_recipe_trained_on_another_recipes_output_takes_its_family(tmp_path):
    (tmp_path / "up.yaml").write_text("model_name_or_path: models/gpt2\noutput_dir: saves/up\n", encoding="utf-8")
    (tmp_path / "down.yaml").write_text("extends: base.yaml\n", encoding="utf-8")
    (tmp_path / "base.yaml").write_text("model_name_or_path: saves/up/model\n", encoding="utf-8")
    recipes = sorted(tmp_path.glob("*.yaml"))
    assert family_of_recipe(tmp_path / "down.yaml", recipes) == "gpt2"
    (tmp_path / "lost.yaml").write_text("model_name_or_path: somewhere/else\n", encoding="utf-8")
    with pytest.raises(AssertionError, match="names no family"):
        family_of_recipe(tmp_path / "lost.yaml", recipes)


def test_the_demo_sft_recipe_is_gpt2_through_demo_pt():
    recipes = sorted((REPO / "recipes").rglob("*.yaml"))
    assert family_of_recipe(REPO / "recipes" / "demo_sft.yaml", recipes) == "gpt2"


def test_write_hf_checkpoint_is_the_save_pretrained_layout(tmp_path):
    write_hf_checkpoint(tmp_path / "m", "gpt2", n_positions=128)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["n_layer"] == 2 and config["n_positions"] == 128
    assert (tmp_path / "m" / "model.safetensors").is_file()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_write_hf_checkpoint_of_the_new_families_loads_with_its_tokenizer(tmp_path, family):
    from pipeline.data.model_tokenizer import load_tokenizer
    from pipeline.model.weights import load_model

    write_hf_checkpoint(tmp_path / "m", family)
    model = load_model(tmp_path / "m")
    tokenizer = load_tokenizer(tmp_path / "m")
    assert model.cfg.family == family and model.cfg.vocab_size >= tokenizer.n_vocab
