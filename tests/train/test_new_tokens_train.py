"""new_special_tokens in train's preflight: with LoRA they make the embedding and head train in full, which stage dpo's
adapters-off reference cannot keep under ZeRO-3 (as for additional_target)."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError


@pytest.mark.parametrize("keys,refused", [("new_special_tokens: <think>\n", True), ("resize_vocab: true\n", True),
                                          ("new_special_tokens: <|endoftext|>\n", False), ("", False)])
def test_dpo_zero3_refuses_what_trains_the_embedding_in_full(tmp_path, monkeypatch, keys, refused):
    from pipeline.recipe import resolve
    from pipeline.train.run import preflight

    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: x\nmax_steps: 1\nstage: dpo\nzero_stage: 3\n"
                                     + keys, encoding="utf-8")
    r = resolve("r.yaml", [])
    if not refused:
        preflight(r)
        return
    with pytest.raises(UserError, match="with resize_vocab or new_special_tokens: the embedding and the head"):
        preflight(r)


def test_a_ref_model_grows_as_the_policy_does(tmp_path):
    """ref_model with new_special_tokens (dpo / kto): LLaMA-Factory loads the reference with the run's tokenizer and
    resizes it too (create_ref_model copies the model arguments), so it scores the new ids. The reference of a
    ref_model that is the base is then the starting policy. It was refused as another vocabulary (training), and
    eval's reference (the same model.build.load_ref_model) indexed past its embedding."""
    import torch

    from pipeline.model.build import FinetuneArgs, ModelArgs, build_model, load_base
    from pipeline.model.weights import load_model, save_hf
    from pipeline.recipe.args import PreferenceArgs, RecipeModel
    from pipeline.train.preference import build_reference, token_nll

    save_hf(load_model("tiny", seed=3), tmp_path / "ref")
    base = ModelArgs("tiny", seed=3, dropout=0.0, context_length=None, qkv_bias=None, tie_word_embeddings=None,
                     new_special_tokens="<think>,</think>")
    ft = FinetuneArgs("full", 4, None, 0.0, "all", False, False, None, 2, None, 3)
    policy = build_model(base, ft).eval()

    class Engine:
        module, device = policy, torch.device("cpu")

    pref = PreferenceArgs("sigmoid", 0.1, 0.0, 0.0, 0.5, str(tmp_path / "ref"))
    reference = build_reference(pref, RecipeModel(base, ft), Engine())
    new_ids = [50257, 50258]  # <think>, </think>: GPT-2's tokenizer has 50,257 ids
    ids = torch.tensor([[464, 3290, *new_ids, 318, 257, 13]])
    batch = {"input_ids": ids[:, :-1], "attention_mask": torch.ones_like(ids[:, :-1]), "labels": ids[:, 1:]}
    with torch.no_grad():
        expected = token_nll(load_base(base, dropout=False).eval(), batch)
    assert torch.equal(reference(batch), expected)
