"""Resuming on another number of ranks with the same global batch (pipeline.train.world_change): the resumed run is
the uninterrupted one to fp32 rounding. 2 ranks -> 1 (ZeRO 2, full, pt) rides on test_multinode's two-rank launch;
here 1 -> 2 (DeepSpeed's BF16_Optimizer at ZeRO 1, LoRA, sft; ZeRO 3, LoRA, dpo) and 3 -> 2 (ZeRO 1 with
offload_optimizer: cpu, full, sft), the several-rank side through the deepspeed launcher as a user starts it. The
refusals are in test_resume_changes.py (check_compatible, no training run)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline.train.run import train
from tests.ports import run_on_free_port
from tests.train.helpers import BASE_SFT, check_resumed_run_is_the_uninterrupted_one
from tests.train.test_dpo import BASE_DPO, METRICS, dpo_recipe  # noqa: F401 - the ranking data fixture

REPO = Path(__file__).resolve().parents[2]
# 4 steps, a checkpoint at step 2; logging every 3 steps: the line of step 3 sums steps 1-2 (the checkpoint's log
# window, kept by the ranks that saved it) and step 3 (trained on the new rank count); no dropout anywhere (its
# random draws are per rank); bf16: DeepSpeed names its ZeRO files bf16_zero_pp_rank_<r>_... then (fp32 ZeRO 2 and 0:
# test_multinode.py, test_multirank.py)
KEYS = dict(max_steps=4, save_steps=2, logging_steps=3, warmup_steps=1, val_size=0, dropout=0.0, lora_dropout=0.0,
            bf16=True)
# bf16 at ZeRO 1 with gradients accumulated in fp32: DeepSpeed's BF16_Optimizer instead of DeepSpeedZeroOptimizer
# (engine._do_optimizer_sanity_check), which a user's deepspeed JSON selects
BF16_OPTIMIZER = {"data_types": {"grad_accum_dtype": "fp32"}}
# ranks before and after: per_device_train_batch_size, gradient_accumulation_steps on each, the same global batch (4;
# 6 on 3 or 2 ranks: sft weighs every trained token of the update alike, so the micro-batch may change). Under bf16,
# gradient_accumulation_steps changed by other than a power of two (3 x GA 2 -> 2 x GA 3) gave step 3's grad norm
# 4e-4 apart (BF16_Optimizer, measured; presumably the bf16 gradients of a loss scaled by 1/GA round otherwise) and
# another micro-batch size (3 x 2 -> 2 x 3) step 4's loss 1.6e-5 apart: the three-rank case is fp32
ONE_TO_TWO = {1: (2, 2), 2: (2, 1)}
THREE_TO_TWO = {3: (2, 1), 2: (3, 1)}


# case: (recipe, final weights, logged metrics compared beside the loss, the layouts before and after). sft, and dpo,
# whose loss is a mean per micro-batch (the same micro-batches: per_device_train_batch_size kept); DeepSpeed's
# BF16_Optimizer (its fp32 partitions saved with their padding), ZeRO 1 with its partitions held on the CPU
# (offload_optimizer: cpu; DeepSpeedZeroOptimizer, ZeRO 2's layout) and ZeRO 3 (every parameter cut on its own:
# deepspeed_compat.zero3_partition), LoRA and full, both directions, three ranks. Stage rm (a mean per micro-batch
# the same way) and the other combinations were run by hand: docs/resume.md
CASES = {"sft-bf16optimizer-lora-1to2": ({**BASE_SFT, **KEYS, "zero_stage": 1, "deepspeed": "ds.json"},
                                         "adapter/adapter_model.safetensors", (), ONE_TO_TWO),
         "dpo-zero3-lora-1to2": ({**BASE_DPO, **KEYS, "zero_stage": 3}, "adapter/adapter_model.safetensors", METRICS,
                                 ONE_TO_TWO),
         "sft-zero1-offload-full-3to2": ({**BASE_SFT, **KEYS, "zero_stage": 1, "offload_optimizer": "cpu",
                                          "finetuning_type": "full", "bf16": False}, "model/model.safetensors", (),
                                         THREE_TO_TWO)}


def launch_two_ranks(workdir: Path, recipe: str, ranks: int = 2) -> str:
    """`deepspeed --num_gpus <ranks> --module pipeline train <recipe>` as a user starts it; its stderr."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONWARNINGS")}
    env.update(PYTHONPATH=str(REPO))
    launcher = str(Path(os.sys.executable).with_name("deepspeed"))
    proc = run_on_free_port(lambda port: [launcher, "--num_gpus", str(ranks), "--master_port", port, "--module",
                                          "pipeline", "train", recipe], cwd=workdir, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return proc.stderr


@pytest.mark.multirank
@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpoint_resumes_on_another_number_of_ranks_with_the_same_global_batch(make_recipe, workdir, request,
                                                                                      capfd, case):
    """The same global batch on both rank counts (ONE_TO_TWO, THREE_TO_TWO): one side runs to step 4 (saving step 2), the other
    resumes its checkpoint-2 (a several-rank side through the deepspeed launcher): the same examples per update, the
    ZeRO partitions of the fp32 masters and Adam moments rebuilt for the new ranks, the schedule and counters going
    on. Failed before: exit 2, "resume with 1 rank(s)" (dpo: "supported for stage pt and sft"; ZeRO 3: "zero_stage
    3 partitions every parameter"; offload_optimizer: "the optimizer state offloaded to cpu (offload_optimizer) is
    not rebuilt"; BF16_Optimizer: "DeepSpeed's BF16_Optimizer (bf16 at zero_stage 1) keeps partitions this trainer
    does not rebuild"); before the bf16_ file names were known, rank 0 read its 1-rank file as is ("The size of
    tensor a (4096) must match the size of tensor b (8192)")."""
    base, weights, metrics, layout = CASES[case]
    before, after = layout
    if case.startswith("dpo"):
        request.getfixturevalue("dpo_recipe")  # writes the ranking data and its registry entry
    (workdir / "ds.json").write_text(json.dumps(BF16_OPTIMIZER), encoding="utf-8")
    base = {"zero_stage": 2, **base}
    layouts = {ranks: dict(per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation)
               for ranks, (micro, accumulation) in layout.items()}
    one, two = workdir / "saves" / "one", workdir / "saves" / "two"
    first = make_recipe(base, name="one", **layouts[before])  # writes one.yaml
    train(first) if before == 1 else launch_two_ranks(workdir, "one.yaml", before)
    two.mkdir(parents=True)
    shutil.copytree(one / "checkpoint-2", two / "checkpoint-2")
    capfd.readouterr()
    resumed = make_recipe(base, name="two", resume_from_checkpoint="latest", **layouts[after])  # writes two.yaml
    said = launch_two_ranks(workdir, "two.yaml", after) if after > 1 else (train(resumed), capfd.readouterr().err)[1]
    batch = before * layouts[before]["per_device_train_batch_size"] * layouts[before]["gradient_accumulation_steps"]
    assert said.count(f"resume: world_size: {before} -> {after} (global batch {batch} kept: {before} rank(s) x "
                      f"{layouts[before]['per_device_train_batch_size']} x GA "
                      f"{layouts[before]['gradient_accumulation_steps']} -> {after} rank(s) x "
                      f"{layouts[after]['per_device_train_batch_size']} x GA "
                      f"{layouts[after]['gradient_accumulation_steps']}): resharded") == 1, said[-3000:]
    diff = check_resumed_run_is_the_uninterrupted_one(one, two, weights, metrics=metrics)
    print(f"{case}: largest weight difference {diff:.3g}")
    assert {p.name for p in (two / "checkpoint-4" / "rng").iterdir()} == {f"rank-{r}.safetensors"
                                                                           for r in range(after)}
