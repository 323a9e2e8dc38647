"""The NVMe offload refusal on another rank count has one wording and one decision
(pipeline.runtime.deepspeed_compat.offload_problem): check_compatible's (world_change.problems, from the recipe's
offload_optimizer) and checkpoint.load's (reshard_problem, from the engine) say the same sentence. Before, each
worded it on its own ("which are not rebuilt ... (offload_optimizer: cpu is)" against "which this trainer does not
rebuild ... (offload_optimizer: cpu it does)", and only one named NPROC x NNODES)."""
from __future__ import annotations

import types
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.runtime import deepspeed_compat
from pipeline.train import checkpoint, world_change


def test_recipe_and_engine_refuse_nvme_offload_in_the_same_words():
    change = world_change.world_change({"world_size": 2, "per_device_train_batch_size": 2,
                                        "gradient_accumulation_steps": 1}, (1, 2, 2))
    assert change is not None
    path = Path("saves/x/checkpoint-4")
    from_recipe = world_change.problems(change, path, 0, stage="sft", asft=False, group_by_length=False,
                                        offload_optimizer="nvme")
    engine = types.SimpleNamespace(zero_optimization_stage=lambda: 3,
                                   zero_offload_optimizer=lambda: types.SimpleNamespace(device="nvme"),
                                   optimizer=type("DeepSpeedZeroOptimizer_Stage3", (), {})())
    with pytest.raises(UserError) as raised:  # refused before DeepSpeed reads anything
        checkpoint.load(engine, path, change)
    from_engine = str(raised.value)
    assert from_recipe == [from_engine]
    assert from_engine.startswith("this job has 1 rank(s) but saves/x/checkpoint-4 was trained on 2: the optimizer "
                                  "state offloaded to NVMe (offload_optimizer: nvme)")
    assert from_engine.endswith("resume with 2 rank(s) (`make train NPROC=2` (python -m pipeline.launch --num_gpus 2 "
                                "--module pipeline train RECIPE), or NPROC x NNODES = 2), or start a new run from "
                                "saves/x/checkpoint-4/adapter or saves/x/checkpoint-4/model")
    for offload in ("none", "cpu"):
        assert deepspeed_compat.offload_problem(offload) is None
