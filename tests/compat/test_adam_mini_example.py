"""LLaMA-Factory's extras/adam_mini/qwen2_full_sft.yaml (use_adam_mini) through the CLI, on a tiny Qwen2 written by
transformers (GQA: 4 query heads, 2 key/value groups; q/k/v biases; tied embedding), with only model_name_or_path
changed.

Golden values: transformers' Qwen2 of the same checkpoint fed our loader's micro-batches (the data layer is not under
test), its gradients clipped by torch's clip_grad_norm_ (transformers' Trainer clips before LLaMA-Factory's
optimizer steps), stepped by adam-mini 1.1.1's Adam_mini as re-written from its source in
tests/train/test_adam_mini.py (AdamMiniReference) with the config's hidden_size and num_attention_heads; and
transformers, which loads the merged model.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from tests.acceptance.harness import pipeline
from tests.compat.lf_golden import assert_each_step_equals, golden_start, merged_is_the_last_checkpoint, stepped
from tests.compat.test_lf_recipes import lf_checkout
from tests.train.test_adam_mini import AdamMiniReference

EXAMPLE = "examples/extras/adam_mini/qwen2_full_sft.yaml"
RUN = "saves/qwen2-1_5b/full/sft"
# the golden run: fp32, one micro-batch per update, a constant rate high enough to see, weight decay (Adam-mini's
# own rule: not on norms and biases) and an adam_epsilon large enough that where eps is added shows
GOLDEN = ["bf16=false", "gradient_accumulation_steps=1", "max_steps=2", "save_steps=1", "lr_scheduler_type=constant",
          "warmup_ratio=0", "learning_rate=1e-3", "weight_decay=0.1", "adam_epsilon=1e-6"]


def golden_steps(work: Path, qwen2: Path, steps: int) -> list[dict[str, torch.Tensor]]:
    """transformers' weights after each of `steps` updates by adam_mini's Adam_mini on our micro-batches."""
    r, batches, model = golden_start(work, EXAMPLE, GOLDEN, steps, qwen2)
    c = model.config
    optimizer = AdamMiniReference(model.named_parameters(), r["learning_rate"], (r["adam_beta1"], r["adam_beta2"]),
                                  r["adam_epsilon"], r["weight_decay"], c.hidden_size, c.num_attention_heads)
    return stepped(model, batches, optimizer.step, r["max_grad_norm"])


def test_each_step_is_adam_minis_step_and_the_merged_model_loads(tmp_path, lf_models):
    """After steps 1 and 2 every tensor equals the golden to fp32 rounding (moves are about 1e-3); merged/ holds
    checkpoint-2's weights and loads in transformers."""
    qwen2 = lf_models("qwen2")
    work = lf_checkout(tmp_path, str(qwen2))
    err = pipeline("train", EXAMPLE, *GOLDEN, cwd=work, timeout=600).stderr
    assert ("optimizer: Adam-mini (use_adam_mini): 11 tensors by Adam-mini (rows) at lr 0.001, weight decay 0.1 | "
            "5 tensors by Adam-mini (whole) at lr 0.001, weight decay 0 | 4 tensors by Adam-mini (heads) at lr 0.001, "
            "weight decay 0.1 | 6 tensors by Adam-mini (adam) at lr 0.001, weight decay 0") in err, err
    assert "fp32, ZeRO stage 0" in err, err
    start = transformers.AutoModelForCausalLM.from_pretrained(qwen2).state_dict()
    assert_each_step_equals(work / RUN, start, golden_steps(work, qwen2, 2))
    merged_is_the_last_checkpoint(work, EXAMPLE, GOLDEN, work / RUN, 2)


@pytest.mark.slow  # ~20 s: builds, trains one step of 8 bf16 micro-batches and merges through the CLI
def test_the_example_as_written_trains_in_bf16_and_its_merged_model_loads(tmp_path, lf_models):
    qwen2 = lf_models("qwen2")
    work = lf_checkout(tmp_path, str(qwen2))
    err = pipeline("train", EXAMPLE, "max_steps=1", "save_steps=1", cwd=work, timeout=600).stderr
    assert "optimizer: Adam-mini (use_adam_mini)" in err and "bf16, ZeRO stage 0" in err, err
    merged_is_the_last_checkpoint(work, EXAMPLE, ["max_steps=1", "save_steps=1"], work / RUN, 1)
