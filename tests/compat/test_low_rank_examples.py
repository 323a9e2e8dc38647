"""LLaMA-Factory's extras/galore and extras/apollo llama3_full_sft.yaml (use_galore / use_apollo, *_layerwise: true,
pure_bf16) through the CLI as written, on a tiny Llama written by transformers, with model_name_or_path changed.

Golden values: transformers' Llama of the same checkpoint loaded in bf16 (as LLaMA-Factory loads it under pure_bf16)
fed our loader's micro-batches (the data layer is not under test), stepped as LLaMA-Factory's layer-wise GaLore /
APOLLO steps it: one optimizer per bf16 parameter, re-written from galore_torch's and apollo_torch's source in
tests/train/test_galore.py and test_apollo.py (GaLoreReference, APOLLOReference) over LLaMA-Factory's groups
(lf_groups), unclipped (its hooks clear the gradients before transformers clips), compared as bf16 arithmetic
allows (lf_golden.bf16_within_a_step); and transformers, which loads the merged model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests.acceptance.harness import pipeline
from tests.compat.lf_golden import assert_each_step_equals, golden_start, merged_is_the_last_checkpoint, stepped, unclipped
from tests.compat.test_lf_recipes import lf_checkout
from tests.train.test_apollo import APOLLOReference
from tests.train.test_galore import GaLoreReference, lf_groups

RUN = "saves/llama3-8b/full/sft"
PURE = "pure bf16 (bf16 weights and optimizer states, no fp32 master copy), ZeRO stage 0"
# as written (pure_bf16 too); three steps, each saved; a constant rate high enough to see; weight decay (after the
# update in both); an adam_epsilon where its placement shows; a rank below the matrices' sides and an interval of 2:
# step 1 takes a projection, step 2 reuses it, step 3 takes a new one
STEPS = ["max_steps=3", "save_steps=1", "lr_scheduler_type=constant", "warmup_ratio=0",
         "learning_rate=1e-3", "weight_decay=0.1", "adam_epsilon=1e-6"]


def example(key: str) -> str:
    return f"examples/extras/{key}/llama3_full_sft.yaml"


def overrides(key: str) -> list[str]:
    return [*STEPS, f"{key}_rank=4", f"{key}_update_interval=2"]


def extras(key: str, r: Any) -> dict[str, Any]:
    """The projected group's keys, as LLaMA-Factory's `_create_galore_optimizer` / `_create_apollo_optimizer`."""
    common = {"rank": r[f"{key}_rank"], "update_proj_gap": r[f"{key}_update_interval"], "scale": r[f"{key}_scale"],
              "proj_type": r[f"{key}_proj_type"]}
    return common if key == "galore" else {**common, "proj": r["apollo_proj"], "scale_type": r["apollo_scale_type"]}


def golden_steps(work: Path, llama: Path, key: str, steps: int) -> list[dict[str, Any]]:
    """transformers' weights after each of `steps` layer-wise updates on our micro-batches: one reference optimizer
    per parameter (for APOLLO that makes every first seed 1; for GaLore it changes nothing, its state is per
    parameter), not clipped."""
    r, batches, model = golden_start(work, example(key), overrides(key), steps, llama, torch.bfloat16)
    params = dict(model.named_parameters())
    kinds = ({"weight_decay": 0.0}, {"weight_decay": r["weight_decay"]},
             {"weight_decay": r["weight_decay"], **extras(key, r)})
    reference = GaLoreReference if key == "galore" else APOLLOReference
    betas = (r["adam_beta1"], r["adam_beta2"])
    optimizers = [reference([{"params": [params[n]], **kind}], r["learning_rate"], betas, r["adam_epsilon"])
                  for names, kind in zip(lf_groups(model, r["weight_decay"], r[f"{key}_target"]), kinds)
                  for n in names]

    def step() -> None:
        for optimizer in optimizers:
            optimizer.step()
    return stepped(model, batches, step, None)


@pytest.mark.parametrize("key, groups", [
    ("galore", "GaLore (rank 4, std, every 2 steps)"),
    # ~25 s: slow; GaLore's run covers the shared path, test_apollo.py holds the update to apollo_torch's bit for bit
    pytest.param("apollo", "APOLLO (rank 4, random std, channel, every 2 steps)", marks=pytest.mark.slow),
])
def test_the_example_as_written_is_llamafactorys_layerwise_update_and_its_merged_model_loads(tmp_path, lf_models,
                                                                                             key, groups):
    """After steps 1, 2 and 3 every tensor is the bf16 golden's as bf16 arithmetic allows (a bf16 value: no fp32
    master copy); pure bf16 at ZeRO 0 said; the layer-wise notice; no clipping in the DeepSpeed config; merged/
    loads in transformers."""
    llama = lf_models("llama")
    work = lf_checkout(tmp_path, str(llama))
    err = pipeline("train", example(key), *overrides(key), cwd=work, timeout=600).stderr
    name = groups.split()[0]
    assert (f"optimizer: {name} (use_{key}): 6 tensors by AdamW at lr 0.001, weight decay 0.1 | 14 tensors by "
            f"{groups} at lr 0.001, weight decay 0.1") in err, err
    assert (f"notice: {example(key)}:10:19: {key}_layerwise: true: the update is LLaMA-Factory's layer-wise one"
            in err), err
    assert PURE in err and unclipped(work / RUN), err
    start = transformers.AutoModelForCausalLM.from_pretrained(llama).state_dict()
    assert_each_step_equals(work / RUN, start, golden_steps(work, llama, key, 3))
    merged_is_the_last_checkpoint(work, example(key), overrides(key), work / RUN, 3)


def test_without_use_galore_its_keys_say_they_do_nothing(tmp_path, lf_models):
    from tests.reliability.rel_helpers import run_main

    work = lf_checkout(tmp_path, str(lf_models("llama")))
    err = run_main(["validate", example("galore"), "use_galore=false"], work).err
    assert (f"notice: {example('galore')}:12:14: galore_rank: accepted without effect: it only matters with "
            "use_galore: true (GaLore)") in err, err
    assert "layer-wise" not in err


def test_pure_bf16_where_it_cannot_be_honoured_exits_2_with_the_reason(tmp_path, lf_models):
    """The galore example (pure_bf16) without use_galore, with bf16 and ZeRO 3 beside it: an error at each key with
    its reason, exit 2, no traceback."""
    from tests.reliability.rel_helpers import run_main

    work = lf_checkout(tmp_path, str(lf_models("llama")))
    done = run_main(["validate", example("galore"), "bf16=true", "zero_stage=3", "use_galore=false"], work)
    assert done.code == 2 and "Traceback" not in done.err, done.err
    errors = [line for line in done.err.splitlines() if line.startswith("error: ")]
    for says in ("bf16: given true with pure_bf16: true: bf16 is mixed precision with fp32 master weights",
                 "zero_stage: given 3 with pure_bf16: true: pure_bf16 does not run under ZeRO 3: LLaMA-Factory "
                 "refuses the two"):
        assert any(says in line for line in errors), (says, errors)


@pytest.mark.parametrize("zero_stage", [0, pytest.param(2, marks=pytest.mark.slow)])  # ~13 s a run
def test_without_use_galore_the_example_is_torch_adamw_on_bf16_parameters(tmp_path, lf_models, zero_stage):
    """The galore example with use_galore=false: pure_bf16 full fine-tuning by plain AdamW, at ZeRO 0 (DeepSpeed's
    bf16 section off) and 2 (its bf16 masters and optimizer states). Golden: transformers' Llama in bf16 stepped by
    torch.optim.AdamW on its bf16 parameters (transformers' decay groups: not biases or norms), clipped to
    max_grad_norm as transformers' Trainer clips, for 2 steps (bf16_within_a_step)."""
    llama = lf_models("llama")
    work = lf_checkout(tmp_path, str(llama))
    plain = ["use_galore=false", "galore_layerwise=false", *STEPS[1:], "max_steps=2", f"zero_stage={zero_stage}"]
    err = pipeline("train", example("galore"), *plain, cwd=work, timeout=600).stderr
    assert PURE.replace("ZeRO stage 0", f"ZeRO stage {zero_stage}") in err and "optimizer:" not in err, err
    r, batches, model = golden_start(work, example("galore"), plain, 2, llama, torch.bfloat16)
    named = list(model.named_parameters())
    no_decay = [p for n, p in named if "norm" in n or "bias" in n]
    decay = [p for n, p in named if not ("norm" in n or "bias" in n)]
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]},
                               {"params": no_decay, "weight_decay": 0.0}], lr=r["learning_rate"],
                              betas=(r["adam_beta1"], r["adam_beta2"]), eps=r["adam_epsilon"])
    goldens = stepped(model, batches, adamw.step, r["max_grad_norm"])
    start = transformers.AutoModelForCausalLM.from_pretrained(llama).state_dict()
    assert_each_step_equals(work / RUN, start, goldens)
