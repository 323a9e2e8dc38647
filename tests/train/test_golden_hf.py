"""Golden losses from transformers + PEFT, not from this project's model or loss.

A GPT-2 written by transformers' save_pretrained is fine-tuned with LoRA by the trainer; then, on the same
batches the trainer used, transformers' GPT2LMHeadModel (its logits, torch's cross-entropy) gives the losses:
- before training: the base model's loss equals the trainer's logged loss of step 1 (LoRA B starts at zero, so
  step 1's forward is the base model's): data, template, masks, label shift and the loss reduction;
- after training: the base model with the trained adapter loaded by PEFT gives the same loss as our model,
  with LoRA's scaling and every adapted layer non-trivial.
Only the batches come from the project (its loader: what is being trained on); every value compared comes
from transformers/PEFT.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.data.loaders import make_loader
from pipeline.recipe.args import data_args
from pipeline.runtime.log import read_log
from pipeline.train import loop
from pipeline.train.run import train
from tests.acceptance.harness import write_hf_checkpoint
from tests.train.helpers import BASE_SFT, GOLDEN_GPT2

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def hf_loss(model, *batches: dict) -> float:
    """Mean cross-entropy of transformers' logits over the labelled positions of all the batches (our labels are
    already shifted: labels[:, t] is the target of position t, as in the book)."""
    total = count = 0.0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(),
                                                             ignore_index=-100, reduction="sum"))
            count += int((batch["labels"] != -100).sum())
    return total / count


def test_losses_equal_transformers_and_peft_on_the_same_batch(make_recipe, workdir):
    write_hf_checkpoint(workdir / "gpt2")
    # answers of 1-12 words, 2 micro-batches of 2 rows per update: step 1's loss is the mean over the update's
    # labelled tokens (transformers' Trainer with num_items_in_batch), not the mean of the two micro-batches' means
    r = make_recipe(BASE_SFT, max_steps=3, **GOLDEN_GPT2)
    result = train(r)
    assert result.exit_code == 0
    first, second = list(make_loader(data_args(r), "train", rank=0, world_size=1, epoch=0, shuffle=True))[:2]
    assert (first["labels"] != -100).sum() != (second["labels"] != -100).sum()  # the two means weigh differently
    base = transformers.GPT2LMHeadModel.from_pretrained(workdir / "gpt2").eval()
    logged = read_log(result.output_dir / "trainer_log.jsonl")[0]["loss"]
    assert logged == pytest.approx(hf_loss(base, first, second), rel=1e-5)

    tuned = peft.PeftModel.from_pretrained(base, result.output_dir / "adapter").eval()
    module = result.engine.module.eval()
    with torch.no_grad():
        ours = float(module(first["input_ids"], attention_mask=first["attention_mask"], labels=first["labels"]))
    golden = hf_loss(tuned, first)
    assert ours == pytest.approx(golden, rel=1e-5)
    assert abs(golden - logged) > 1e-2  # the adapter changed the loss: the comparison is not of two base models


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_a_micro_batch_without_trained_tokens_adds_nothing(make_recipe, workdir, monkeypatch, zero_stage):
    """Step 1's second micro-batch has every label -100 (an answer cut away, a pack of prompts): the update's loss is
    the other micro-batch's mean, finite, its count the only one (transformers' num_items_in_batch would be the
    same); under ZeRO-3 the empty head call still takes part in the gathers."""
    drawn = loop.BatchStream.next

    def blank_second(self: loop.BatchStream) -> dict:
        batch = drawn(self)
        if self.state.epoch == 0 and self.state.batch_in_epoch == 2:
            batch = {**batch, "labels": torch.full_like(batch["labels"], -100)}
        return batch
    monkeypatch.setattr(loop.BatchStream, "next", blank_second)
    write_hf_checkpoint(workdir / "gpt2")
    r = make_recipe(BASE_SFT, max_steps=2, zero_stage=zero_stage, **GOLDEN_GPT2)
    result = train(r)
    first = next(iter(make_loader(data_args(r), "train", rank=0, world_size=1, epoch=0, shuffle=True)))
    log = read_log(result.output_dir / "trainer_log.jsonl")
    base = transformers.GPT2LMHeadModel.from_pretrained(workdir / "gpt2").eval()
    assert log[0]["loss"] == pytest.approx(hf_loss(base, first), rel=1e-5)
    assert log[0]["trained_tokens_seen"] == int((first["labels"] != -100).sum())
    assert all(torch.isfinite(p).all() for p in result.engine.module.parameters())
