"""LLaMA-Factory's examples/extras/asft/qwen2_full_asft.yaml through the CLI, as a user brings it: the recipe as
LLaMA-Factory ships it, model_name_or_path pointed at a tiny transformers-written Qwen2 checkpoint, the demo data's
`identity` in place of `math` (not in the demo data), cut short by command-line overrides.

Golden values: LLaMA-Factory's asft_loss_func as tests/train/test_asft.py re-writes it from its source, over
transformers' logits: step 1's logged loss with the checkpoint as policy and reference, step 2's with step 1's
saved weights (checkpoint-1/model, in our layout: written out in transformers' by save_hf) as the policy and the
starting checkpoint as the reference, eval_loss with the final weights as the policy over the val split. A run killed after step 1 and resumed logs the same losses and ends with the same weights (the reference
is the starting checkpoint again, not the checkpoint resumed from), and merged/ loads in transformers. The same
example with finetuning_type lora / freeze / oft and two micro-batches an update (the built data and checkpoint
shared) logs the mean of those micro-batches' LLaMA-Factory losses, against the start as reference.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.harness import (assert_close, assert_same_run, cli_env, crash_copy, log_losses, pipeline,
                                      trained_model, write_hf_checkpoint)
from tests.compat.test_lf_recipes import lf_checkout
from tests.reliability.rel_helpers import run_main
from tests.train.test_asft import hf_labels, llama_factory_asft

EXAMPLE = "examples/extras/asft/qwen2_full_asft.yaml"
RUN = "saves/qwen2-7b/full/asft"  # the example's output_dir
# identity: 7 train rows, one micro-batch of the example's 4 per epoch; fp32 on CPU; a rate that moves the tiny
# model enough for step 2's KL term to count; no loader workers (test time)
OVERRIDES = ["dataset=identity", "max_steps=2", "gradient_accumulation_steps=1", "warmup_ratio=0",
             "learning_rate=1e-2", "bf16=false", "logging_steps=1", "save_steps=1", "dataloader_num_workers=0"]


def hf_logits(path: Path, batches: list[dict], adapter: Path | None = None) -> list[Any]:
    """transformers' logits of each micro-batch (ours) for the checkpoint at `path` (with `adapter`: that PEFT adapter
    on it), each one position longer, as Trainer's labels are."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    if adapter:
        import peft  # here only: its import takes seconds, which a caller without adapters need not pay

        model = peft.PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        out = [model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
    return [torch.cat([x, x[:, -1:]], dim=1) for x in out]


def lf_losses(policy: list[Any], reference: list[Any], batches: list[dict], alpha: float) -> list[float]:
    """LLaMA-Factory's loss of each micro-batch (ours: labels already shifted) from hf_logits of policy and reference."""
    return [float(llama_factory_asft(p, r, hf_labels(b["labels"]), alpha)) for p, r, b in zip(policy, reference, batches)]


def step_losses(policy: Path, reference: Path, batches: list[dict], alpha: float, adapter: Path | None = None,
                reference_adapter: Path | None = None) -> list[float]:
    """LLaMA-Factory's loss of each micro-batch over transformers' logits; with `adapter` (`reference_adapter`), the
    policy (reference) is that checkpoint with that PEFT adapter (LoRA / OFT)."""
    return lf_losses(hf_logits(policy, batches, adapter), hf_logits(reference, batches, reference_adapter), batches,
                     alpha)


def step_loss(policy: Path, reference: Path, batch: dict, alpha: float) -> float:
    """step_losses of one micro-batch."""
    return step_losses(policy, reference, [batch], alpha)[0]


def epoch_batches(overrides: list[str], epochs: int, per_epoch: int) -> list[list[dict]]:
    """The first `per_epoch` training micro-batches of each of the first `epochs` epochs, as the run's loader
    yields them (run from the working copy)."""
    from pipeline.data.loaders import make_loader
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    data = data_args(resolve(EXAMPLE, overrides, command="train", env=cli_env(WORLD_SIZE="1")))
    loader = make_loader(data, "train", rank=0, world_size=1, epoch=0, shuffle=True)
    out = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        batches = loader.iter_from(0)
        out.append([next(batches) for _ in range(per_epoch)])
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """The example built and trained 2 steps in a LLaMA-Factory-like working copy: (the base checkpoint, the copy)."""
    root = tmp_path_factory.mktemp("asft")
    base = root / "qwen2"
    write_hf_checkpoint(base, "qwen2", small_vocab=True, max_position_embeddings=2048)
    work = lf_checkout(root / "lf", str(base))
    pipeline("build", EXAMPLE, "dataset=identity", cwd=work)
    err = pipeline("train", EXAMPLE, *OVERRIDES, cwd=work).stderr
    assert "sft: ASFT loss, asft_alpha 0.05; reference: the starting model (a frozen copy)" in err, err
    assert "loss: KL-anchored DFT-weighted cross-entropy (use_asft_loss, asft_alpha 0.05)" in err, err
    return base, work


def test_llama_factorys_asft_example_logs_llama_factorys_loss(trained, tmp_path, monkeypatch):
    from pipeline.data.loaders import make_loader
    from pipeline.model.weights import load_model, save_hf
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    base, work = trained
    run = work / RUN
    results = json.loads((run / "all_results.json").read_text("utf-8"))
    assert results["global_step"] == 2 and results["use_asft_loss"] is True and results["asft_alpha"] == 0.05

    monkeypatch.chdir(work)
    data = data_args(resolve(EXAMPLE, OVERRIDES, command="train", env=cli_env(WORLD_SIZE="1")))
    assert len(make_loader(data, "train", rank=0, world_size=1, shuffle=True)) == 1  # a step: an epoch's batch
    batches = [first for first, in epoch_batches(OVERRIDES, 2, 1)]
    logged = log_losses(run)
    assert logged[1] == pytest.approx(step_loss(base, base, batches[0], 0.05), rel=1e-5)
    step1 = save_hf(load_model(run / "checkpoint-1/model"), tmp_path / "step1")
    want = step_loss(step1, base, batches[1], 0.05)
    assert abs(want - step_loss(step1, step1, batches[1], 0.05)) > 1e-3 * want  # the KL term weighs in
    assert logged[2] == pytest.approx(want, rel=1e-5)

    # eval_loss: the same loss of the final weights over the val split (one row here), as the last step logs it
    val = list(make_loader(data, "val", rank=0, world_size=1, shuffle=False))
    assert len(val) == 1 and len(val[0]["input_ids"]) == 1
    final = save_hf(load_model(run / "model"), tmp_path / "final")
    evaluated = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text("utf-8").splitlines()]
    assert next(e for e in evaluated if "eval_loss" in e)["eval_loss"] == pytest.approx(
        step_loss(final, base, val[0], 0.05), rel=1e-5)


# the example with another finetuning_type: 2 rows a micro-batch, 2 micro-batches an update (identity's 7 rows:
# 3 micro-batches an epoch, one update; the third is left, as an epoch is whole updates); no plot (test time)
ACCUMULATED = ["per_device_train_batch_size=2", "gradient_accumulation_steps=2", "plot_loss=false"]


@pytest.mark.parametrize("finetuning", ["lora", "freeze", "oft"])
def test_asft_under_lora_freeze_and_oft_anchors_to_the_start_and_averages_accumulated_micro_batches(
        trained, finetuning, tmp_path, monkeypatch):
    """The example with finetuning_type lora / freeze / oft and gradient_accumulation_steps 2. Golden: LLaMA-Factory's
    asft_loss_func over transformers' / PEFT's logits, the policy at step 2 being checkpoint-1's adapter loaded by PEFT
    on the checkpoint (lora, oft) or checkpoint-1's weights (freeze), the reference the starting checkpoint (which
    LLaMA-Factory, building no reference under LoRA, fails to have). Each step logs the mean of its two micro-batches'
    losses; LLaMA-Factory's Trainer sums them (its compute_loss_func loss is not divided by the accumulation steps):
    its log would say twice this (docs/training.md, ASFT)."""
    from pipeline.model.weights import load_model, save_hf

    base, work = trained
    out = f"saves/asft-{finetuning}"
    overrides = [*OVERRIDES, *ACCUMULATED, f"finetuning_type={finetuning}", f"output_dir={out}"]
    if finetuning == "lora":  # as typed; the others through the same main(argv) in this process (test time)
        err = pipeline("train", EXAMPLE, *overrides, cwd=work).stderr
    else:
        done = run_main(["train", EXAMPLE, *overrides], work)
        assert done.code == 0, done.err[-6000:]
        err = done.err
    reference = "(the policy with its adapters switched off)" if finetuning != "freeze" else "(a frozen copy)"
    assert f"reference: the starting model {reference}" in err, err
    run = work / out
    monkeypatch.chdir(work)
    step1, step2 = epoch_batches(overrides, 2, 2)
    logged = log_losses(run)
    assert logged[1] == pytest.approx(sum(step_losses(base, base, step1, 0.05)) / 2, rel=1e-5)
    if finetuning == "freeze":
        policy, adapter = save_hf(load_model(run / "checkpoint-1/model"), tmp_path / "step1"), None
    else:
        policy, adapter = base, run / "checkpoint-1/adapter"
    losses = step_losses(policy, base, step2, 0.05, adapter)
    itself = step_losses(policy, policy, step2, 0.05, adapter, adapter)
    assert abs(sum(losses) - sum(itself)) > 1e-3 * sum(losses), (losses, itself)  # the KL term weighs in
    assert logged[2] == pytest.approx(sum(losses) / 2, rel=1e-5)  # LLaMA-Factory would log sum(losses)


@pytest.mark.slow  # ~15 s: a resumed run and a merge through the CLI
def test_a_resumed_asft_run_is_the_same_run_and_merged_loads_in_transformers(trained):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    _, work = trained
    run = work / RUN
    crashed = crash_copy(run, work / "saves/crashed", 1)
    pipeline("train", EXAMPLE, *OVERRIDES, "output_dir=saves/crashed", "resume_from_checkpoint=latest", cwd=work)
    assert_same_run(run, crashed, "model/model.safetensors")

    # the merge in this process (main(argv), as_typed=False): the point is the resumed ASFT run; a full run's merge is
    # typed by test_lf_examples.py's full examples
    pipeline("merge", EXAMPLE, *OVERRIDES, cwd=work, as_typed=False)
    ids = torch.tensor([[3, 17, 42, 99, 120, 7]])
    with torch.no_grad():
        want = transformers.AutoModelForCausalLM.from_pretrained(run / "merged").eval()(ids).logits
        got = trained_model(EXAMPLE, work, OVERRIDES)(ids)
    assert_close(want, got)
