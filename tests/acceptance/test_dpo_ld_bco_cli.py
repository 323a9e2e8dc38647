"""LD-DPO (ld_alpha) and the BCO term (pref_bco_weight) as a LLaMA-Factory user brings them: LLaMA-Factory's
examples/train_lora/qwen3_lora_dpo.yaml, its model line pointed at a checkpoint transformers wrote, the two keys
added, `python -m pipeline build / train`; the adapter loads in PEFT, the first step's loss is LLaMA-Factory's
formula on log-probabilities transformers computes here, and a resume continues the BCO running mean exactly."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.acceptance.harness import assert_same_run, crash_copy, log_losses, pipeline
from tests.compat.test_lf_examples import assert_adapter_loads_in_peft, tiny_model
from tests.compat.test_lf_recipes import lf_checkout, template_override

EXAMPLE = "train_lora/qwen3_lora_dpo.yaml"
RUN = "saves/qwen3-4b/lora/dpo"
LD_ALPHA, BCO_WEIGHT, BETA = 0.5, 0.5, 0.1  # BETA: the example's pref_beta


def lf_batch_logps(logits: torch.Tensor, labels: torch.Tensor, ld_alpha: float | None) -> torch.Tensor:
    """LLaMA-Factory 0.9.5's get_batch_logps (src/llamafactory/train/trainer_utils.py:592-636), re-typed: labels
    shifted by one, the public part by position (first scored position + the pair's shorter length)."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != -100
    labels[labels == -100] = 0
    per_token = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    if ld_alpha is None:
        return (per_token * loss_mask).sum(-1)
    valid = loss_mask.sum(-1)
    n = labels.shape[0] // 2
    shorter = torch.min(valid[:n], valid[n:])
    public_lengths = torch.argmax(loss_mask.int(), dim=1) + torch.cat([shorter, shorter])
    positions = torch.arange(labels.shape[-1]).expand_as(per_token)
    ld_mask = positions < public_lengths.unsqueeze(1)
    front = (per_token * (ld_mask * loss_mask)).sum(-1)
    rear = (per_token * (~ld_mask * loss_mask)).sum(-1)
    return front + ld_alpha * rear


def lf_first_step_loss(base: Path, work: Path, overrides: list[str]) -> float:
    """The loss of a step over every train pair with the policy still the base (LoRA's B = 0): LLaMA-Factory's
    CustomDPOTrainer (src/llamafactory/train/dpo/trainer.py): policy log-probs with ld_alpha, the reference's
    without (:231-233, is_ref_model), trl's sigmoid loss, then bco_loss (:168-185) with trl's RunningMoments
    (trl 0.24 trl/trainer/utils.py:460-498) after its first update -- delta = this batch's mean reward (count
    1e-24) -- and (dpo + w bco) / (1 + w) (:214). Log-probabilities from transformers' forward."""
    from transformers import AutoModelForCausalLM

    from pipeline.data.pairs import tokenized_pairs
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    cwd = os.getcwd()
    os.chdir(work)
    try:
        pairs = tokenized_pairs(data_args(resolve(f"examples/{EXAMPLE}", overrides, command="train")), "train")
    finally:
        os.chdir(cwd)
    sides = [side.example(i) for side in (pairs.chosen, pairs.rejected) for i in range(len(pairs))]
    width = max(len(ex.input_ids) for ex in sides)
    ids = torch.tensor([ex.input_ids + [0] * (width - len(ex.input_ids)) for ex in sides])
    labels = torch.tensor([list(ex.labels) + [-100] * (width - len(ex.labels)) for ex in sides])
    mask = torch.tensor([[1] * len(ex.input_ids) + [0] * (width - len(ex.input_ids)) for ex in sides])
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
    policy, reference = lf_batch_logps(logits, labels, LD_ALPHA), lf_batch_logps(logits, labels, None)
    n = len(pairs)
    pi_c, pi_r, ref_c, ref_r = policy[:n], policy[n:], reference[:n], reference[n:]
    dpo = -F.logsigmoid(BETA * ((pi_c - pi_r) - (ref_c - ref_r)))
    chosen, rejected = BETA * (pi_c - ref_c), BETA * (pi_r - ref_r)
    delta = torch.cat((chosen, rejected)).mean()
    bco = -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))
    return float(((dpo + BCO_WEIGHT * bco) / (1 + BCO_WEIGHT)).mean())


def test_ld_dpo_and_bco_train_from_llamafactory_example_and_resume_exactly(tmp_path):
    base = tiny_model(tmp_path / "qwen", "qwen3")
    work = lf_checkout(tmp_path / "lf", str(base))
    recipe = work / "examples" / EXAMPLE
    recipe.write_text(recipe.read_text("utf-8") + f"ld_alpha: {LD_ALPHA}\npref_bco_weight: {BCO_WEIGHT}\n", "utf-8")
    extra = template_override()
    pipeline("build", f"examples/{EXAMPLE}", *extra, cwd=work)
    # one micro-batch of every train pair per step (5 of the demo's 6), fp32 (the golden's precision), four steps
    # at a learning rate that moves the adapter (the running mean then sees other rewards each step), a line and
    # a checkpoint every 2 steps
    overrides = [*extra, "per_device_train_batch_size=5", "gradient_accumulation_steps=1", "bf16=false",
                 "max_steps=4", "learning_rate=1e-2", "logging_steps=1", "save_steps=2"]
    done = pipeline("train", f"examples/{EXAMPLE}", *overrides, cwd=work, timeout=600)
    assert "dpo: pref_loss sigmoid, pref_beta 0.1, ld_alpha 0.5, pref_bco_weight 0.5; reference:" in done.stderr
    run = work / RUN
    losses = log_losses(run)
    # step 1: warmup_ratio 0.1 makes its learning rate 0, so step 1 and the reference are both the base
    assert losses[1] == pytest.approx(lf_first_step_loss(base, work, overrides), rel=1e-5, abs=1e-6)
    saved = json.loads((run / "checkpoint-2/trainer_state.json").read_text("utf-8"))["objective"]["bco_baseline"]
    assert saved["count"] == pytest.approx(2.0)  # one rank, one micro-batch per step, two steps
    assert_adapter_loads_in_peft(work, EXAMPLE, base, run, overrides)
    # eval's preference loss leaves LD and BCO out: its report must not call training's eval loss that row
    results = json.loads((run / "all_results.json").read_text("utf-8"))
    assert (results["ld_alpha"], results["pref_bco_weight"]) == (LD_ALPHA, BCO_WEIGHT)
    pipeline("eval", f"examples/{EXAMPLE}", *overrides, "max_eval_samples=1", "max_new_tokens=1", cwd=work)
    report = (run / "eval/report.md").read_text("utf-8")
    assert (f"(stage dpo's objective with ld_alpha {LD_ALPHA:g} and pref_bco_weight {BCO_WEIGHT:g}, which the "
            "table's preference loss leaves out)") in report, report

    crashed = crash_copy(run, work / "saves/crashed", 2)
    pipeline("train", f"examples/{EXAMPLE}", *overrides, f"output_dir={crashed.relative_to(work)}",
             "resume_from_checkpoint=latest", cwd=work, timeout=600)
    assert_same_run(run, crashed, "adapter/adapter_model.safetensors")
