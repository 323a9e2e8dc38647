"""Stage dpo as a user drives it: LLaMA-Factory ranking data (alpaca and sharegpt forms) and a save_pretrained GPT-2,
`python -m pipeline build / train / merge / eval`, outputs loaded by transformers and PEFT; each bad input one
exit-2 message."""
from __future__ import annotations

from pipeline.recipe.args import data_args
import json
import os
from pathlib import Path

import pytest
import torch

from tests.acceptance import harness
from tests.acceptance.harness import DPO, write_ranking_data


@pytest.fixture
def dpo_workdir(workdir: Path) -> Path:
    write_ranking_data(workdir / "data")
    return workdir


def test_dpo_train_merge_eval_from_llamafactory_ranking_data(dpo_workdir, hf_checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = hf_checkpoint("gpt2")
    harness.write_recipe(dpo_workdir / "dpo.yaml", DPO, model_name_or_path=str(base_dir), output_dir="saves/dpo",
                         plot_loss=True)
    for command in ("build", "train", "merge", "eval"):
        harness.pipeline(command, "dpo.yaml", cwd=dpo_workdir)
    out = dpo_workdir / "saves" / "dpo"
    assert (out / "training_loss.png").is_file() and (out / "training_rewards_accuracies.png").is_file()
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy = reference at step one
    assert all(key in log[-1] for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies",
                                          "rewards/margins", "logps/chosen", "logps/rejected"))
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    base, tuned = metrics["results"]["base"], metrics["results"]["tuned"]
    assert base["reward_margin"] == 0.0 and tuned["reward_margin"] > 0  # the base is the reference
    assert tuned["preference_accuracy"] >= base["preference_accuracy"]
    assert {"f1", "exact_match", "preference_accuracy", "pref_loss"} <= tuned.keys()
    assert "preference accuracy (%)" in (out / "eval" / "report.md").read_text()

    # the user's tools load what we wrote: merged/ in transformers, adapter/ on the base in PEFT, same logits
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    ids = torch.tensor([[464, 3290, 318, 257, 1332, 13, 15496, 11]])
    with torch.no_grad():
        a, b = merged(ids).logits, peft(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, base_logits, atol=1e-3)  # DPO changed the model

    # held-out preference accuracy of the tuned model, recomputed with PEFT's forward
    from pipeline.data.pairs import tokenized_pairs
    from pipeline.recipe import resolve

    cwd = os.getcwd()
    os.chdir(dpo_workdir)  # the recipe's paths are relative to where the user runs the CLI
    try:
        pairs = tokenized_pairs(data_args(resolve("dpo.yaml", [], command="eval")), "val")
    finally:
        os.chdir(cwd)
    wins = 0
    for i in range(len(pairs)):
        scores = []
        for side in (pairs.chosen, pairs.rejected):
            ex = side.example(i)
            x = torch.tensor([ex.input_ids])
            with torch.no_grad():
                logp = torch.log_softmax(peft(x).logits[0, :-1].float(), dim=-1)
            targets = torch.tensor(ex.input_ids[1:])
            scored = torch.tensor([label != -100 for label in ex.labels[1:]])
            scores.append(float(logp[torch.arange(len(targets)), targets][scored].sum()))
        wins += scores[0] > scores[1]
    assert tuned["preference_accuracy"] == pytest.approx(wins / len(pairs))


def test_an_sft_output_as_model_makes_the_sft_recipe_upstream(dpo_workdir):
    harness.write_recipe(dpo_workdir / "sft.yaml", harness.SFT, model_name_or_path="tiny", output_dir="saves/sft")
    harness.write_recipe(dpo_workdir / "dpo.yaml", DPO, model_name_or_path="saves/sft/merged", output_dir="saves/dpo")
    deps = harness.pipeline("deps", "dpo.yaml", cwd=dpo_workdir).stdout
    assert {"UPSTREAM=sft.yaml", "UPSTREAM_GOAL=merge", "STAGE=dpo"} <= set(deps.splitlines())


def one_error(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


@pytest.mark.parametrize("command, keys, words", [
    ("build", dict(dataset="tiny_sft"), ["has no preference pairs but the recipe's stage is dpo",
                                         '"ranking": true', "or set stage: sft"]),
    ("build", dict(stage="sft"), ["preference data (ranking: true", "set stage: dpo"]),
    ("validate", dict(pref_loss="sigmod"), ["pref_loss", "did you mean 'sigmoid'"]),
    ("validate", dict(pref_loss="orpo", ref_model="tiny"), ["ref_model", "pref_loss orpo uses no reference model"]),
    # LLaMA-Factory refuses it too ("only valid for sigmoid loss function"); ignoring it trained unsmoothed hinge
    ("validate", dict(pref_loss="hinge", dpo_label_smoothing=0.1), ["dpo_label_smoothing", "pref_loss hinge",
                                                                     "pref_loss: sigmoid"]),
], ids=["dpo-without-ranking", "ranking-under-sft", "unknown-pref_loss", "ref_model-with-orpo",
        "label-smoothing-without-sigmoid"])
def test_bad_input_is_one_exit_2_message(dpo_workdir, command, keys, words):
    harness.write_recipe(dpo_workdir / "bad.yaml", DPO, model_name_or_path="tiny", **keys)
    if keys.get("stage") == "sft":
        (dpo_workdir / "bad.yaml").write_text((dpo_workdir / "bad.yaml").read_text().replace(
            "pref_beta: 0.5\n", "").replace("dataset: \"prefs_alpaca,prefs_sharegpt\"", "dataset: prefs_alpaca"))
    message = one_error(harness.pipeline(command, "bad.yaml", cwd=dpo_workdir, expect=2))
    assert all(w in message for w in words), message


def test_a_ref_model_with_another_vocabulary_is_refused(dpo_workdir, hf_checkpoint):
    other = hf_checkpoint("gpt2", vocab_size=1000)
    harness.write_recipe(dpo_workdir / "bad.yaml", DPO, model_name_or_path=str(hf_checkpoint("gpt2")),
                         ref_model=str(other))
    message = one_error(harness.pipeline("validate", "bad.yaml", cwd=dpo_workdir, expect=2))
    assert "ref_model" in message and "1,000" in message and "50,257" in message


def test_full_dpo_on_an_sft_adapter_is_evaluated_against_its_training_reference(dpo_workdir):
    """finetuning_type full on top of adapter_name_or_path: training's frozen reference has the adapter folded in
    (as the policy starts); eval's reward_margin and pref_loss used the bare base as the reference instead, so
    the tuned model's held-out pref_loss disagreed with training's eval_loss on the same pairs and weights."""
    harness.write_recipe(dpo_workdir / "sft.yaml", harness.SFT, model_name_or_path="tiny", output_dir="saves/sft",
                         learning_rate=5e-2, max_steps=2)
    harness.write_recipe(dpo_workdir / "dpo.yaml", DPO, model_name_or_path="tiny", output_dir="saves/dpo",
                         finetuning_type="full", lora_rank=None, adapter_name_or_path="saves/sft/adapter",
                         learning_rate=1e-3, max_steps=2, eval_steps=2)
    for command, recipe in (("build", "sft.yaml"), ("train", "sft.yaml"), ("build", "dpo.yaml"),
                            ("train", "dpo.yaml"), ("eval", "dpo.yaml")):
        harness.pipeline(command, recipe, cwd=dpo_workdir)
    out = dpo_workdir / "saves" / "dpo"
    trained = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()][-1]
    tuned = json.loads((out / "eval" / "metrics.json").read_text())["results"]["tuned"]
    assert tuned["pref_loss"] == pytest.approx(trained["eval_loss"], rel=1e-5)
    assert tuned["reward_margin"] == pytest.approx(trained["eval_rewards/margins"], rel=1e-4, abs=1e-7)


def test_ref_model_may_name_a_full_runs_output_dir(dpo_workdir, hf_checkpoint):
    """As model_name_or_path does (LLaMA-Factory's `ref_model: saves/.../full/sft`): the run's model/ folder is used.
    It was refused: 'no config.json in this directory'."""
    import shutil

    base = hf_checkpoint("gpt2")
    shutil.copytree(base, dpo_workdir / "saves" / "sft_full" / "model")
    harness.write_recipe(dpo_workdir / "dpo.yaml", DPO, model_name_or_path=str(base), ref_model="saves/sft_full")
    plan = harness.pipeline("plan", "dpo.yaml", cwd=dpo_workdir).stdout
    rows = [line.split()[:3] for line in plan.splitlines()]
    assert ["ref_model", '"saves/sft_full/model"', "derived"] in rows, plan
