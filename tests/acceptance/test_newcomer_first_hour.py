"""A newcomer's first hour, followed literally: README.md, then docs/coming-from-llama-factory.md, each command typed
as the page shows it. What went wrong on that walk (2026-12-06) and is checked here, each as the user types it:

- the LLaMA-Factory page writes its verbs `python -m pipeline chat x.yaml`; typed with a Python that lacks the
  pipeline's packages (the system's: a user coming from LLaMA-Factory runs its CLI from wherever it is installed), it
  ended in a traceback about `tiktoken` or `yaml`. Now: one line naming the environment to use, exit 2.
- a LLaMA-Factory recipe's `cutoff_len` past a checkpoint's positions was refused with "lower cutoff_len or raise
  context_length": for GPT-2's learned positions that passed validate and train then refused the checkpoint, and for
  rotary ones it named our key, not LLaMA-Factory's `rope_scaling`. Now the fix this checkpoint takes.
- README's `python datasets/generate.py --check` printed nothing when the files matched: now one line says so.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.harness import PYTHON, _run, pipeline, refused, write_data, write_recipe

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("argv", [("chat", "x.yaml", "--prompt", "hi"),
                                  ("expand", "--model", "X", "--output-dir", "Y", "--num-expand", "2")],
                         ids=["chat", "expand"])
def test_python_without_the_packages_names_the_environment_to_run_in(tmp_path: Path, argv: tuple[str, ...]):
    """`python -m pipeline chat x.yaml` and `... expand` as the LLaMA-Factory page types them, run by a Python without
    the pipeline's packages: the test's own interpreter with -S (no site-packages, and sys.prefix is then the base
    installation's, as a system Python's). Before: a traceback ending `ModuleNotFoundError: No module named 'yaml'`
    (`'torch'` for expand), exit 1."""
    page = (DOCS / "coming-from-llama-factory.md").read_text(encoding="utf-8")
    assert f"`python -m pipeline {argv[0]} " in page
    done = _run([PYTHON, "-S", "-m", "pipeline", *argv], cwd=tmp_path, expect=2, timeout=60, env=None)
    assert "Traceback" not in done.stderr and done.stdout == "", done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: this Python (") and "has no module '" in line, line
    assert "`.venv/bin/python -m pipeline ...`" in line and "source .venv/bin/activate" in line, line


# config.json of a Qwen3 (rotary) and a GPT-2 (learned positions) checkpoint with few positions, as transformers writes
# them: the rule reads only config.json (the folder's other files are not opened before the data is built)
CONFIGS = {
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 32, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64,
              "vocab_size": 512, "max_position_embeddings": 256, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
              "tie_word_embeddings": True},
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2,
             "n_positions": 64, "vocab_size": 512},
}


@pytest.mark.parametrize("family", ["qwen3", "gpt2"])
def test_a_cutoff_past_the_checkpoints_positions_names_the_fix_that_works(tmp_path: Path, family: str):
    """Porting step 2 (a LLaMA-Factory recipe, `cutoff_len: 2048`, with model_name_or_path changed to a checkpoint
    with fewer positions: 256 (qwen3) and 64 (gpt2) here), then `python -m pipeline validate`. Before, both said
    "lower cutoff_len or raise context_length"; gpt2 with context_length raised passed validate, and train refused
    its wpe. Now: rotary positions are stretched by rope_scaling (with which the recipe is then accepted), learned
    ones cannot be."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps(CONFIGS[family]), encoding="utf-8")
    write_data(tmp_path / "datasets")
    write_recipe(tmp_path / "r.yaml", model_name_or_path=str(tmp_path / "m"), cutoff_len=2048, max_steps=1)
    err = refused("validate", "r.yaml", cwd=tmp_path, as_typed=family == "qwen3")
    (line,) = [x for x in err.splitlines() if "cutoff_len" in x]
    if family == "qwen3":
        assert line.endswith("expected at most 256 (the model's context length); lower cutoff_len, or set "
                             "rope_scaling: linear (or dynamic, yarn), which stretches the checkpoint's positions to "
                             "cutoff_len as LLaMA-Factory does"), line
        done = pipeline("validate", "r.yaml", "rope_scaling=linear", cwd=tmp_path, expect=None, as_typed=False)
        assert done.stdout.startswith("recipe: OK") and "error: r.yaml:" not in done.stderr, done.stderr
    else:
        assert line.endswith("expected at most 64 (the model's context length); lower cutoff_len: the checkpoint's "
                             "learned positions end at 64 (a gpt2 model cannot be stretched: rope_scaling needs rotary "
                             "positions)"), line


def test_the_readmes_generate_check_says_what_it_verified():
    """README: "`python datasets/generate.py --check` verifies the files are its output, byte for byte". Typed as
    shown (from the repository root), it exits 0 and says so in one line; before, it printed nothing."""
    root = DOCS.parent
    assert "`python datasets/generate.py --check` verifies" in (root / "README.md").read_text(encoding="utf-8")
    done = _run([PYTHON, "datasets/generate.py", "--check"], cwd=root, expect=0, timeout=60, env=None)
    (line,) = done.stdout.splitlines()
    assert line.endswith("files are the generator's output, byte for byte (seed 1234)"), line
