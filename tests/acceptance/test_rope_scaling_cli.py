"""LLaMA-Factory's recipe key rope_scaling (model_utils/rope.py, configure_rope) on a user's path: a Qwen2
checkpoint from save_pretrained whose window is shorter than cutoff_len, one LoRA step, merge, and transformers
loading merged/ gives the logits our trained model gives, on a sequence past the original window."""
from __future__ import annotations

import json

import pytest

from tests.acceptance.harness import assert_close, pipeline, trained_model, write_hf_checkpoint, write_recipe

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def test_yarn_from_the_recipe_trains_merges_and_loads_in_transformers(workdir):
    ckpt = workdir / "qwen"
    write_hf_checkpoint(ckpt, "qwen2", small_vocab=True, max_position_embeddings=16)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(ckpt), dataset_dir="data", output_dir="saves/r",
                          max_steps=1, cutoff_len=250, rope_scaling="yarn")
    pipeline("build", recipe, cwd=workdir)
    plan = pipeline("plan", recipe, cwd=workdir).stdout
    assert any(line.split()[:3] == ["context_length", "256", "derived"] for line in plan.splitlines()), plan
    trained = pipeline("train", recipe, cwd=workdir)
    assert ("r.yaml:24:15: rope_scaling: yarn with factor 16 = ceil(cutoff_len 250 / 16) over the model's 16 "
            "positions; context_length (max_position_embeddings) becomes 256") in trained.stderr, trained.stderr
    pipeline("merge", recipe, cwd=workdir)

    merged = workdir / "saves/r/merged"
    config = json.loads((merged / "config.json").read_text())
    # what LLaMA-Factory's configure_rope sets on the config (factor ceil(250 / 16), the window kept as original)
    assert config["rope_scaling"] == {"rope_type": "yarn", "factor": 16.0, "original_max_position_embeddings": 16}
    assert config["max_position_embeddings"] == 256
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert theirs.model.rotary_emb.attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(16.0)).item() + 1)
    ours = trained_model(recipe, workdir)
    x = torch.randint(0, theirs.config.vocab_size, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(theirs(x).logits, ours(x), rel=1e-5)
