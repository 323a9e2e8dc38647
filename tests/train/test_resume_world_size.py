"""Resuming on another number of ranks with the same global batch (pipeline.train.world_change): the resumed run is
the uninterrupted one to fp32 rounding. 2 ranks -> 1 (ZeRO 2, full, pt) rides on test_multinode's two-rank launch;
1 -> 2 (ZeRO 2, LoRA, sft) is here, through the deepspeed launcher as a user starts it. The refusals are in
test_resume_changes.py (check_compatible, no training run)."""
from __future__ import annotations

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


# stage: (recipe, final weights, logged metrics compared beside the loss): sft, and dpo, whose loss is a mean per
# micro-batch (the same micro-batches: per_device_train_batch_size kept), both LoRA (stage rm, a mean per micro-batch
# the same way, was run by hand: docs/resume.md)
STAGES = {"sft": ({**BASE_SFT, **KEYS}, "adapter/adapter_model.safetensors", ()),
          "dpo": ({**BASE_DPO, **KEYS}, "adapter/adapter_model.safetensors", METRICS)}


@pytest.mark.multirank
@pytest.mark.parametrize("stage", list(STAGES))
def test_one_rank_checkpoint_resumes_on_two_ranks_with_the_same_global_batch(make_recipe, workdir, request, stage):
    """1 rank x 2 x GA 2 to step 4 (saving step 2), then its checkpoint-2 resumed by 2 ranks x 2 x GA 1: the same
    examples per update, the ZeRO-2 partitions of the fp32 masters and Adam moments cut in two, the schedule and
    counters going on. Failed before: exit 2, "resume with 1 rank(s)" (dpo, rm: "supported for stage pt and sft");
    before the bf16_ file names were known, rank 0 read its 1-rank file as is ("The size of tensor a (4096) must
    match the size of tensor b (8192)")."""
    base, weights, metrics = STAGES[stage]
    if stage != "sft":
        request.getfixturevalue("dpo_recipe")  # writes the ranking data and its registry entry
    one = train(make_recipe(base, name="one", per_device_train_batch_size=2, gradient_accumulation_steps=2,
                            zero_stage=2)).output_dir
    (workdir / "saves" / "two").mkdir(parents=True)
    shutil.copytree(one / "checkpoint-2", workdir / "saves" / "two" / "checkpoint-2")
    make_recipe(base, name="two", per_device_train_batch_size=2, gradient_accumulation_steps=1, zero_stage=2,
                resume_from_checkpoint="latest")  # writes two.yaml
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONWARNINGS")}
    env.update(PYTHONPATH=str(REPO))
    launcher = str(Path(os.sys.executable).with_name("deepspeed"))
    proc = run_on_free_port(lambda port: [launcher, "--num_gpus", "2", "--master_port", port, "--module",
                                          "pipeline", "train", "two.yaml"], cwd=workdir, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    assert proc.stderr.count("resume: world_size: 1 -> 2 (global batch 4 kept: 1 rank(s) x 2 x GA 2 -> 2 rank(s) x "
                             "2 x GA 1): resharded") == 1
    two = workdir / "saves" / "two"
    diff = check_resumed_run_is_the_uninterrupted_one(one, two, weights, metrics=metrics)
    print(f"{stage}: largest weight difference {diff:.3g}")
    ckpt = two / "checkpoint-4"
    assert {p.name for p in (ckpt / "rng").iterdir()} == {"rank-0.safetensors", "rank-1.safetensors"}
