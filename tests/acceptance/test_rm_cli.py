"""Stage rm as a user drives it: a transformers-written Llama or GPT-2, LLaMA-Factory ranking data (alpaca and sharegpt
forms) and an LLaMA-Factory-style recipe (stage: rm, finetuning_type: lora), `python -m pipeline build / train /
merge` (eval and generate's refusal in-process), then merged/ loaded by transformers' AutoModelForSequenceClassification and adapter/ by PEFT on it.
Golden values: transformers' scores of the val pairs and the pairwise loss computed from them by hand."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import torch

from tests.acceptance import harness
from tests.acceptance.harness import DPO, write_ranking_data

RM = {**{k: v for k, v in DPO.items() if not k.startswith("pref_") and k not in ("max_new_tokens", "max_eval_samples")},
      "stage": "rm", "template": "llama3", "eval_strategy": "steps", "eval_steps": 4, "logging_steps": 1}


def in_workdir(workdir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """In the user's folder, in-process (the CLI's start-up is test time): `eval` (the command's own function),
    `generate` refused with its message, and the held-out pairs' token ids as training batches them (right-padded
    with the tokenizer's pad id): (chosen, rejected)."""
    from pipeline import chat
    from pipeline.data.model_tokenizer import recipe_tokenizer
    from pipeline.data.pairs import tokenized_pairs
    from pipeline.errors import UserError
    from pipeline.evaluate import run as evaluate
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    cwd = os.getcwd()
    os.chdir(workdir)  # the recipe's paths are relative to where the user runs the CLI
    try:
        evaluate.run(resolve("rm.yaml", [], command="eval"))
        with pytest.raises(UserError, match=r"rm.yaml:1:8: stage: rm trains a reward model"):
            chat.run(resolve("rm.yaml", [], command="generate"), argparse.Namespace(prompt="hi"))
        data = data_args(resolve("rm.yaml", [], command="eval"))
        pairs, pad = tokenized_pairs(data, "val"), recipe_tokenizer(data).pad_id
    finally:
        os.chdir(cwd)
    sides = [[side.example(i).input_ids for i in range(len(pairs))] for side in (pairs.chosen, pairs.rejected)]
    width = max(len(ids) for side in sides for ids in side)
    return tuple(torch.tensor([ids + [pad] * (width - len(ids)) for ids in side]) for side in sides)


@pytest.mark.parametrize("family,checkpoint,template,architecture", [
    ("llama", {"small_vocab": True}, "llama3", "LlamaForSequenceClassification"),
    ("gpt2", {}, "alpaca", "GPT2ForSequenceClassification"),  # a tied head, no pad token of its own
    # sparse MoE blocks; moe_aux_loss_coef set as a LLaMA-Factory MoE recipe would: no effect in stage rm (a notice)
    ("qwen3_moe", {"small_vocab": True}, "qwen3", "Qwen3MoeForSequenceClassification"),
], ids=["llama", "gpt2", "qwen3_moe"])
def test_rm_train_merge_eval_loads_in_transformers_and_peft(workdir, hf_checkpoint, family, checkpoint, template,
                                                            architecture):
    moe = {"moe_aux_loss_coef": 0.01} if family == "qwen3_moe" else {}
    check_rm_user_path(workdir, hf_checkpoint(family, **checkpoint), template, architecture, moe)


def check_rm_user_path(workdir: Path, base: Path, template: str, architecture: str, moe: dict | None = None) -> None:
    """Stage rm on the save_pretrained checkpoint `base` as the module docstring says: build / train / merge as typed
    with `template` (and `moe`: moe_aux_loss_coef, said to have no effect), merged/ loaded as `architecture` and
    adapter/ by PEFT scoring the held-out pairs alike, the trainer's and eval's loss and accuracy those scores'."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    write_ranking_data(workdir / "data")
    moe = moe or {}
    harness.write_recipe(workdir / "rm.yaml", {**RM, "template": template, **moe}, model_name_or_path=str(base),
                         output_dir="saves/rm", plot_loss=True)
    for command in ("build", "train", "merge"):
        done = harness.pipeline(command, "rm.yaml", cwd=workdir)
        if moe and command == "train":  # accepted, said to change nothing (no router term in a reward model's loss)
            assert "moe_aux_loss_coef: accepted without effect: stage rm's pairwise loss" in done.stderr, done.stderr
    out = workdir / "saves" / "rm"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert all("accuracy" in rec and "scores/chosen" in rec for rec in log if "loss" in rec)
    assert (out / "training_eval_accuracy.png").is_file()
    results = json.loads((out / "all_results.json").read_text())

    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    assert merged.config.architectures == [architecture] and merged.config.num_labels == 1
    pad = merged.config.pad_token_id
    chosen, rejected = in_workdir(workdir)  # padded with the tokenizer's pad id, which must be config.json's
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    peft = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=pad), out / "adapter").eval()
    with torch.no_grad():
        c, r = merged(chosen).logits[:, 0].double(), merged(rejected).logits[:, 0].double()
        assert torch.allclose(peft(chosen).logits[:, 0].double(), c, atol=1e-5)
        assert torch.allclose(peft(rejected).logits[:, 0].double(), r, atol=1e-5)
    by_hand = sum(math.log1p(math.exp(-(a - b))) for a, b in zip(c.tolist(), r.tolist())) / len(c)
    accuracy = float((c > r).double().mean())
    assert results["eval_loss"] == pytest.approx(by_hand, rel=1e-4)  # the trainer's final evaluation
    assert results["eval_accuracy"] == pytest.approx(accuracy)
    tuned = json.loads((out / "eval" / "metrics.json").read_text())["results"]["tuned"]
    assert tuned["pairwise_loss"] == pytest.approx(by_hand, rel=1e-4) and tuned["accuracy"] == pytest.approx(accuracy)
    assert tuned["accuracy"] > 0.5  # the task (repeat the prompt's words) is learnt
