"""LLaMA-Factory's recipe key rope_scaling (model_utils/rope.py, configure_rope) on a user's path: a Qwen2 / Llama
checkpoint from save_pretrained whose window is shorter than cutoff_len, one LoRA step, merge, and transformers
loading merged/ gives the logits our trained model gives, on a sequence past the original window (dynamic: past
the raised context, where dynamic NTK starts)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from tests.acceptance.harness import assert_close, pipeline, trained_model, write_hf_checkpoint, write_recipe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _scaled_run(workdir, family: str, window: int, kind: str) -> tuple[dict, Any, Any, str]:
    """The user's path: a save_pretrained checkpoint of `window` positions (its own scaling dropped), an
    LLaMA-Factory recipe with rope_scaling `kind` and cutoff_len 250, build, train, merge. Returns
    merged/config.json, transformers' model of merged/, our trained model and train's stderr (the notice)."""
    ckpt = workdir / family
    write_hf_checkpoint(ckpt, family, small_vocab=True, max_position_embeddings=window, rope_scaling=None)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(ckpt), dataset_dir="data", output_dir="saves/r",
                          max_steps=1, cutoff_len=250, rope_scaling=kind)
    pipeline("build", recipe, cwd=workdir)
    trained = pipeline("train", recipe, cwd=workdir)
    pipeline("merge", recipe, cwd=workdir)
    merged = workdir / "saves/r/merged"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    return json.loads((merged / "config.json").read_text()), theirs, trained_model(recipe, workdir), trained.stderr


def _assert_same_logits(theirs: Any, ours: Any, lengths: tuple[int, ...]) -> None:
    """transformers' and our logits for random inputs of these lengths, called in this order on both models."""
    gen = torch.Generator().manual_seed(0)
    for n in lengths:
        x = torch.randint(0, theirs.config.vocab_size, (1, n), generator=gen)
        with torch.no_grad():
            assert_close(theirs(x).logits, ours(x), rel=1e-5)


def test_yarn_from_the_recipe_trains_merges_and_loads_in_transformers(workdir):
    config, theirs, ours, stderr = _scaled_run(workdir, "qwen2", 16, "yarn")
    assert ("r.yaml:24:15: rope_scaling: yarn with factor 16 = ceil(cutoff_len 250 / 16) over the model's 16 "
            "positions; context_length (max_position_embeddings) becomes 256") in stderr, stderr
    plan = pipeline("plan", workdir / "r.yaml", cwd=workdir).stdout
    assert any(line.split()[:3] == ["context_length", "256", "derived"] for line in plan.splitlines()), plan
    # what LLaMA-Factory's configure_rope sets on the config (factor ceil(250 / 16), the window kept as original)
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16}
    assert config["max_position_embeddings"] == 256
    assert theirs.model.rotary_emb.attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(16.0)).item() + 1)
    _assert_same_logits(theirs, ours, (200,))


def test_dynamic_from_the_recipe_trains_merges_and_loads_in_transformers(workdir):
    """Dynamic NTK over LLaMA-Factory's raised context (64 x ceil(250 / 64) = 256), on Llama: transformers loading
    merged/ gives our trained model's logits past it (rescaled for 300 positions), then within it (back to the
    plain frequencies, as transformers' dynamic_rope_update resets them)."""
    config, theirs, ours, stderr = _scaled_run(workdir, "llama", 64, "dynamic")
    assert ("rope_scaling: dynamic with factor 4 = ceil(cutoff_len 250 / 64) over the model's 64 positions; "
            "context_length (max_position_embeddings) becomes 256") in stderr, stderr
    # LLaMA-Factory's configure_rope: rope_type dynamic, the factor, the window as original_max_position_embeddings
    assert config["rope_scaling"] == {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": 64}
    assert config["max_position_embeddings"] == 256
    assert theirs.model.rotary_emb.rope_type == "dynamic"
    _assert_same_logits(theirs, ours, (300, 100))


def test_a_dynamic_checkpoint_trains_past_its_context_and_loads_in_transformers(workdir):
    """A checkpoint whose config.json already has dynamic NTK (as merged/ of a `rope_scaling: dynamic` run has) was
    refused at cutoff_len 250 over its 64 positions ("expected at most 64"); transformers sets no limit there. The
    rows past 64 tokens train with rescaled frequencies; transformers + PEFT loading the adapter give our trained
    model's logits past the context (rescaled for 200 positions), then within it."""
    ckpt = workdir / "llama"
    write_hf_checkpoint(ckpt, "llama", small_vocab=True, max_position_embeddings=64,
                        rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(ckpt), dataset_dir="data", output_dir="saves/r",
                          max_steps=1, cutoff_len=250)
    pipeline("build", recipe, cwd=workdir)
    trained = pipeline("train", recipe, cwd=workdir)
    assert "cutoff_len 250 runs past the model's 64 positions (max_position_embeddings): its config.json's " \
           "rope_scaling is dynamic NTK" in trained.stderr, trained.stderr[-3000:]
    rows = json.loads((workdir / "saves/r/trainer_log.jsonl").read_text().splitlines()[0])
    assert rows["tokens_seen"] > 2 * 64, rows  # of step 1's 2 rows, one at least is past the context
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    theirs = peft.PeftModel.from_pretrained(base, workdir / "saves/r/adapter").eval()
    _assert_same_logits(theirs, trained_model(recipe, workdir), (200, 40))
