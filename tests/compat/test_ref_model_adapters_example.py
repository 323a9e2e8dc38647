"""LLaMA-Factory's common two-step flow through the CLI as a user types it: SFT with LoRA
(examples/train_lora/qwen3_lora_sft.yaml), then DPO (examples/train_lora/qwen3_lora_dpo.yaml) whose policy continues
the SFT adapter and whose reference is the base with that adapter on top: ref_model: <the base>,
ref_model_adapters / adapter_name_or_path: <the SFT run's output_dir>, as LLaMA-Factory's users write them. A tiny
transformers-written Qwen3 and LLaMA-Factory's demo data.

Golden: at step one the policy is the reference (both the base + the SFT adapter), so DPO's loss is ln 2 and every
reward 0, by hand; the DPO run's adapter loads in PEFT onto the base and gives our trained model's logits. Without
ref_model the adapters are one exit-2 message at their line.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.acceptance.harness import assert_close, assert_same_run, crash_copy, log_losses, pipeline, refused, trained_model
from tests.compat.test_lf_examples import tiny_model
from tests.compat.test_lf_recipes import lf_checkout
from tests.reliability.rel_helpers import run_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SFT, DPO = "examples/train_lora/qwen3_lora_sft.yaml", "examples/train_lora/qwen3_lora_dpo.yaml"
SFT_RUN = "saves/qwen3-4b/lora/sft"  # the sft example's output_dir


# our demo dpo_en_demo: fewer pairs than 8 micro-batches; 2 steps, a checkpoint after each (the resume test's);
# no plots (test time)
USED = ["max_steps=2", "gradient_accumulation_steps=1", "save_steps=1", "logging_steps=1", "overwrite_cache=true",
        "plot_loss=false"]
DPO_RUN = "saves/qwen3-4b/lora/dpo"  # the dpo example's output_dir


@pytest.fixture(scope="module")
def dpo(tmp_path_factory) -> tuple[Path, Path]:
    """The sft example trained one step, then the dpo example against its adapter: (the base, the working copy)."""
    root = tmp_path_factory.mktemp("ref_adapters")
    base = tiny_model(root / "qwen", "qwen3")
    work = lf_checkout(root / "lf", str(base))
    # one step that moves the adapter (the example's warmup makes step 1's learning rate 0, and LoRA starts at B = 0)
    # (overwrite_cache: train builds the data itself, one command less)
    pipeline("train", SFT, "max_steps=1", "gradient_accumulation_steps=1", "warmup_ratio=0", "learning_rate=1e-2",
             "overwrite_cache=true", cwd=work, timeout=600)
    with (work / DPO).open("a", encoding="utf-8") as recipe:
        recipe.write(f"\n### reference\nref_model: {base}\nref_model_adapters: {SFT_RUN}\n"
                     f"adapter_name_or_path: {SFT_RUN}\n")
    done = pipeline("train", DPO, *USED, cwd=work, timeout=600)
    assert f"reference: ref_model {base} with ref_model_adapters {SFT_RUN}/adapter folded in" in done.stderr, \
        done.stderr
    return base, work


def test_dpo_against_the_sft_adapter_as_reference(dpo):
    base, work = dpo
    # without ref_model the adapters have no base: one message at the key's line (LLaMA-Factory drops them silently)
    said = refused("validate", DPO, "ref_model=", cwd=work, as_typed=False)
    assert f"{DPO}:51:21: ref_model_adapters: given '{SFT_RUN}/adapter' but ref_model is not set" in said, said
    run = work / DPO_RUN
    first = json.loads((run / "trainer_log.jsonl").read_text("utf-8").splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=2e-3)  # bf16 as the example: the same model, rounded
    assert abs(first["rewards/margins"]) < 2e-2

    ids = torch.tensor([[3, 17, 42, 99, 120, 7]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                run / "adapter").eval()
        assert_close(theirs(ids).logits, trained_model(DPO, work, USED)(ids))

    # the policy continues the sft adapter with its settings: another lora_rank is one message at the override, before
    # anything loads (it stopped train after the model was built, naming only the adapter's file)
    said = refused("train", DPO, *USED, "lora_rank=16", cwd=work, as_typed=False)
    assert (f"command line override lora_rank=16: lora_rank: given 16, but adapter_name_or_path '{SFT_RUN}/adapter' "
            "was trained with r 8 (its adapter_config.json)") in said and "set lora_rank: 8" in said, said
    # eval's base is model_name_or_path alone, the model before the sft adapter (docs/preference-tuning.md#evaluation):
    # not the reference (base + sft adapter), so its reward margin is not 0
    done = run_main(["eval", DPO, *USED, "max_eval_samples=1", "max_new_tokens=1"], work)
    assert done.code == 0, done.err[-6000:]
    metrics = json.loads((run / "eval" / "metrics.json").read_text("utf-8"))
    assert metrics["base_model"] == str(base)
    assert (f"- base model: {base} alone (adapter_name_or_path {SFT_RUN}/adapter is in the tuned model only)"
            in (run / "eval" / "report.md").read_text("utf-8"))
    assert abs(metrics["results"]["base"]["reward_margin"]) > 1e-6, metrics["results"]["base"]


def test_a_resume_rebuilds_the_same_reference_and_says_when_its_adapter_changed(dpo):
    """Killed after step 1 and resumed as typed: the reference is ref_model + the adapter folded again, so the run
    goes on bitwise. With the adapter's files rewritten in place (the sft run retrained) between the two, the
    resume says so at the key and step 2 scores against the new reference (docs/resume.md: a new reference is
    applied from the resumed step, as a new ref_model_adapters value is)."""
    from safetensors.torch import load_file, save_file

    _, work = dpo
    run = work / DPO_RUN
    crashed = crash_copy(run, work / "saves/crashed", 1)
    pipeline("train", DPO, *USED, "output_dir=saves/crashed", "resume_from_checkpoint=latest", cwd=work,
             timeout=600)
    assert_same_run(run, crashed, "adapter/adapter_model.safetensors")

    weights = work / SFT_RUN / "adapter/adapter_model.safetensors"
    kept = load_file(weights)
    save_file({k: 2 * v if "lora_B" in k else v for k, v in kept.items()}, weights, metadata={"format": "pt"})
    try:
        changed = crash_copy(run, work / "saves/changed", 1)
        done = run_main(["train", DPO, *USED, "output_dir=saves/changed", "resume_from_checkpoint=latest"], work)
    finally:
        save_file(kept, weights, metadata={"format": "pt"})
    assert done.code == 0, done.err[-6000:]
    assert (f"resume: {DPO}:51: ref_model_adapters: {SFT_RUN}/adapter changed since saves/changed/checkpoint-1 "
            "was saved (adapter_model.safetensors: another sha256): the reference folds in the new adapter from "
            "step 1 on") in done.err, done.err
    assert log_losses(changed)[2] != log_losses(run)[2]
