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

import pytest

from tests.acceptance.harness import assert_close, pipeline, refused, trained_model
from tests.compat.test_lf_examples import tiny_model
from tests.compat.test_lf_recipes import lf_checkout

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SFT, DPO = "examples/train_lora/qwen3_lora_sft.yaml", "examples/train_lora/qwen3_lora_dpo.yaml"
SFT_RUN = "saves/qwen3-4b/lora/sft"  # the sft example's output_dir


def test_dpo_against_the_sft_adapter_as_reference(tmp_path):
    base = tiny_model(tmp_path / "qwen", "qwen3")
    work = lf_checkout(tmp_path / "lf", str(base))
    # one step that moves the adapter (the example's warmup makes step 1's learning rate 0, and LoRA starts at B = 0)
    # (overwrite_cache: train builds the data itself, one command less)
    pipeline("train", SFT, "max_steps=1", "gradient_accumulation_steps=1", "warmup_ratio=0", "learning_rate=1e-2",
             "overwrite_cache=true", cwd=work, timeout=600)
    with (work / DPO).open("a", encoding="utf-8") as recipe:
        recipe.write(f"\n### reference\nref_model: {base}\nref_model_adapters: {SFT_RUN}\n"
                     f"adapter_name_or_path: {SFT_RUN}\n")
    # without ref_model the adapters have no base: one message at the key's line (LLaMA-Factory drops them silently)
    said = refused("validate", DPO, "ref_model=", cwd=work, as_typed=False)
    assert f"{DPO}:51:21: ref_model_adapters: given '{SFT_RUN}/adapter' but ref_model is not set" in said, said
    used = ["max_steps=1", "gradient_accumulation_steps=1",  # our demo dpo_en_demo: fewer pairs than 8 micro-batches
            "overwrite_cache=true"]
    done = pipeline("train", DPO, *used, cwd=work, timeout=600)
    assert f"reference: ref_model {base} with ref_model_adapters {SFT_RUN}/adapter folded in" in done.stderr, \
        done.stderr
    run = work / "saves/qwen3-4b/lora/dpo"
    first = json.loads((run / "trainer_log.jsonl").read_text("utf-8").splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=2e-3)  # bf16 as the example: the same model, rounded
    assert abs(first["rewards/margins"]) < 2e-2

    ids = torch.tensor([[3, 17, 42, 99, 120, 7]])
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                run / "adapter").eval()
        assert_close(theirs(ids).logits, trained_model(DPO, work, used)(ids))
