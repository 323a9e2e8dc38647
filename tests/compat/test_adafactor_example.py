"""`optim: adafactor` in LLaMA-Factory's train_full/qwen3_full_sft.yaml through the CLI, on a tiny Qwen3 written by
transformers, with only model_name_or_path changed and the optimizer asked for on the command line, as a
LLaMA-Factory user passes transformers' `optim`.

Golden values: transformers' Qwen3 of the same checkpoint fed our loader's micro-batches (the data layer is not under
test), its gradients clipped by torch's clip_grad_norm_, stepped by the optimizer transformers' own
Trainer.create_optimizer builds for optim adafactor (transformers.optimization.Adafactor with scale_parameter and
relative_step off, over its decay groups); and transformers, which loads the merged model.
"""
from __future__ import annotations

import transformers

from tests.acceptance.harness import pipeline
from tests.compat.lf_golden import assert_each_step_equals, golden_start, merged_is_the_last_checkpoint, stepped
from tests.compat.test_lf_recipes import lf_checkout

EXAMPLE = "examples/train_full/qwen3_full_sft.yaml"
RUN = "saves/qwen3-4b/full/sft"
# fp32, one micro-batch per update, a constant rate high enough to see, and weight decay (Adafactor decays by
# p x weight_decay x lr, not on norms); overwrite_cache builds the datasets in train (the example leaves it out)
GOLDEN = ["optim=adafactor", "overwrite_cache=true", "bf16=false", "gradient_accumulation_steps=1", "max_steps=2", "save_steps=1",
          "lr_scheduler_type=constant", "warmup_ratio=0", "learning_rate=1e-3", "weight_decay=0.1",
          "optim_args=beta1=0.9"]  # transformers' Trainer reads no optim_args for adafactor: ignored, with a notice
ZERO0 = "deepspeed=examples/deepspeed/ds_z0_config.json"


def test_each_step_is_transformers_trainers_adafactor_step_and_merged_loads(tmp_path, lf_models):
    """With the example's ZeRO-0 JSON in place of its ZeRO-3 one (Adafactor factors whole matrices: ZeRO 1-3 are
    refused, tests/train/test_transformers_optims.py) each saved step equals transformers' Adafactor step within
    1e-6 (fp32 rounding: our model and transformers' sum in other orders), and `merge` writes a model transformers
    loads, holding the last step's weights."""
    qwen3 = lf_models("qwen3")
    work = lf_checkout(tmp_path, str(qwen3))
    err = pipeline("train", EXAMPLE, *GOLDEN, ZERO0, cwd=work, timeout=600).stderr
    assert "optimizer: Adafactor (optim adafactor): " in err and "ZeRO stage 0" in err, err
    assert ("notice: command line override optim_args=beta1=0.9: optim_args: beta1: ignored, as transformers' "
            "Trainer ignores it (it reads no optim_args for optim adafactor)") in err, err
    r, batches, model = golden_start(work, EXAMPLE, GOLDEN + [ZERO0], 2, qwen3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "hf"), optim="adafactor", report_to=[],
                                          learning_rate=r["learning_rate"], weight_decay=r["weight_decay"],
                                          optim_args=r["optim_args"])
    optimizer = transformers.Trainer(model=model, args=args).create_optimizer()
    assert type(optimizer) is transformers.optimization.Adafactor
    assert_each_step_equals(work / RUN, start, stepped(model, batches, optimizer.step, r["max_grad_norm"]))
    merged_is_the_last_checkpoint(work, EXAMPLE, GOLDEN + [ZERO0], work / RUN, 2)
