"""Reward models (stage rm): our score head against transformers' XForSequenceClassification (the same weights
scored by both, to 1e-5), the pooled token, PEFT loading our adapter, and the pairwise loss by hand."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.model.config import read_config
from pipeline.errors import UserError
from pipeline.model.lora import apply_lora, load_adapter, save_adapter
from pipeline.model.reward import (SCORE_INIT_STD, last_attended_index, last_token_index, pairwise_loss,
                                   sequence_scores)
from pipeline.model.weights import load_model, save_hf
from tests.acceptance.harness import hf_model

transformers = pytest.importorskip("transformers")

PAD = 7  # the id batches are padded with and exported as pad_token_id


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def reward(request, tmp_path_factory):
    """(family, base dir, our reward model built from it, its export read by transformers)."""
    family = request.param
    base = tmp_path_factory.mktemp(f"rm-{family}") / "base"
    hf_model(family, vocab_size=64, pad_token_id=None).save_pretrained(base)
    ours = load_model(base, cfg=read_config(base).replace(num_labels=1), seed=5)
    with torch.no_grad():  # a trained-looking head, not the init (both models must read the same one)
        ours.score.weight.mul_(20)
    merged = save_hf(ours, base.parent / "merged", special={"pad_token_id": PAD, "eos_token_id": PAD})
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(merged).eval()
    return family, base, ours.eval(), theirs


def batch() -> torch.Tensor:
    """Right-padded rows; one ends with PAD as its own last token (pad = eos: transformers skips it too), one has a
    PAD inside (only the rightmost non-pad token counts)."""
    return torch.tensor([[5, 9, 11, 3, PAD, PAD], [5, 9, PAD, 12, 13, 14], [8, 8, 8, PAD, PAD, PAD]])


def test_export_is_transformers_sequence_classification(reward):
    family, _, ours, theirs = reward
    arch = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification"}[family]
    assert type(theirs).__name__ == arch and theirs.config.num_labels == 1 and theirs.config.pad_token_id == PAD
    assert theirs.score.bias is None
    ids = batch()
    with torch.no_grad():
        expected = theirs(ids).logits[:, 0]
        got = sequence_scores(ours(ids), ids, PAD)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)
    assert last_token_index(ids, PAD).tolist() == [3, 5, 2]


def test_a_scored_sequence_ends_at_its_last_attended_token():
    """A row whose response ends in the pad id (pad = eos): transformers' rule with that pad skips it; with no pad
    id (LLaMA-Factory's `attention_mask.sum(-1) - 1`, transformers on one sequence of a config without
    pad_token_id) it is the scored token. Padding past the row is never scored, whatever id fills it."""
    ids = torch.tensor([[5, 6, PAD, 9, 9], [5, 6, 7, 8, PAD]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    assert last_attended_index(ids, mask, PAD).tolist() == [1, 3]
    assert last_attended_index(ids, mask, None).tolist() == [2, 4]
    assert (mask.sum(-1) - 1).tolist() == [2, 4]


def test_export_reads_back_as_the_same_reward_model(reward, tmp_path):
    _, base, ours, _ = reward
    again = load_model(save_hf(ours, tmp_path / "m", special={"pad_token_id": PAD}))
    assert again.cfg.num_labels == 1 and again.lm_head is None
    ids = batch()
    with torch.no_grad():
        assert torch.equal(again.eval()(ids), ours(ids))


def test_score_head_starts_as_transformers_initialises_it_seeded(reward):
    _, base, _, _ = reward
    cfg = read_config(base).replace(num_labels=1)
    a, b, c = (load_model(base, cfg=cfg, seed=s).score.weight.detach() for s in (1, 1, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (1, cfg.emb_dim) and abs(float(a.std()) - SCORE_INIT_STD) < 0.01


def test_lora_adapter_loads_in_peft_as_seq_cls(reward, tmp_path):
    from peft import PeftModel

    family, base, ours, _ = reward
    model = load_model(base, cfg=read_config(base).replace(num_labels=1), seed=5)
    apply_lora(model, "all", rank=2, alpha=4, seed=0)
    assert model.score.weight.requires_grad  # trained in full beside the LoRA matrices
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    adapter = save_adapter(model, tmp_path / "adapter")
    config = __import__("json").loads((adapter / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    with pytest.raises(UserError, match="a reward-model adapter .* load it with stage: rm"):
        load_adapter(load_model(base), adapter)  # onto the language model: said, not a missing-module error
    hf_base = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1,
                                                                              pad_token_id=PAD)
    peft = PeftModel.from_pretrained(hf_base, adapter).eval()
    ids = batch()
    with torch.no_grad():
        expected = peft(ids).logits[:, 0]
        got = sequence_scores(model.eval()(ids), ids, PAD)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_pairwise_loss_by_hand():
    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([1.0, 0.0, 0.5])
    losses, metrics = pairwise_loss(chosen, rejected)
    by_hand = [math.log(1 + math.exp(-(c - r))) for c, r in zip(chosen.tolist(), rejected.tolist())]
    assert losses.tolist() == pytest.approx(by_hand, rel=1e-6)
    assert metrics["accuracy"].tolist() == [1.0, 0.0, 0.0]  # a tie is not a win (LLaMA-Factory: chosen > rejected)


def test_score_bias_would_not_learn():
    """Why the head has no bias: the pairwise loss sees only chosen - rejected, so a bias's gradient is zero."""
    bias = torch.zeros((), requires_grad=True)
    losses, _ = pairwise_loss(torch.tensor([0.3, -2.0]) + bias, torch.tensor([1.0, 0.4]) + bias)
    losses.mean().backward()
    assert float(bias.grad) == 0.0


def test_the_new_head_trains_under_every_finetuning_type(reward):
    """The score head starts random: LoRA trains it in full (modules_to_save), freeze beside its blocks, and plan's
    trainable count says so."""
    from pipeline.model.build import FinetuneArgs, apply_finetuning_type
    from pipeline.model.config import freeze_trainable_names, trainable_params

    _, base, _, _ = reward
    cfg = read_config(base).replace(num_labels=1)
    assert "score" in freeze_trainable_names(cfg, 1)
    lora_only = trainable_params(cfg.replace(num_labels=0), "lora", 2, "all")
    assert trainable_params(cfg, "lora", 2, "all") == lora_only + cfg.emb_dim  # + score (1 x hidden)
    for kind in ("lora", "freeze", "full"):
        ft = FinetuneArgs(kind, 2, 4, 0.0, "all", False, False, None, 1, None, 0)
        model = apply_finetuning_type(load_model(base, cfg=cfg, seed=5), ft)
        trained = {n for n, p in model.named_parameters() if p.requires_grad}
        assert "score.weight" in trained and not any(".lora" in n and "score" in n for n in trained), kind


def test_a_grown_vocabulary_under_rm_trains_the_embedding_beside_the_score_head(reward):
    """new_special_tokens / resize_vocab with LoRA trains the embedding and the LM head in full (LLaMA-Factory); a
    reward model has no LM head (score trains in full anyway), so only the embedding is added."""
    from pipeline.model.build import FinetuneArgs, apply_finetuning_type, lora_additional_targets

    family, base, _, _ = reward
    cfg = read_config(base).replace(num_labels=1)
    ft = FinetuneArgs("lora", 2, 4, 0.0, "all", False, False, None, 1, None, 0, resize_vocab=True)
    embedding = {"gpt2": "wte", "llama": "embed_tokens"}[family]
    assert lora_additional_targets(load_model(base, cfg=cfg, seed=5), ft) == [embedding]
    model = apply_finetuning_type(load_model(base, cfg=cfg, seed=5), ft)
    trained = {n for n, p in model.named_parameters() if p.requires_grad and ".lora" not in n}
    assert trained == {"score.weight", "embed_tokens.weight"}, trained
