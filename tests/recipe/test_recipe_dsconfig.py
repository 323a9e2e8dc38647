"""The DeepSpeed config: generated from the recipe, and LLaMA-Factory-style JSON with "auto" values filled."""
from __future__ import annotations

import json

import pytest

from pipeline.errors import UserError
from pipeline.recipe import dsconfig, resolve

# LLaMA-Factory's examples/deepspeed/*.json, verbatim (monitor and comms sections included).
_HEAD = """{
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto",
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "zero_allow_untested_optimizer": true,
  "fp16": {
    "enabled": "auto",
    "loss_scale": 0,
    "loss_scale_window": 1000,
    "initial_scale_power": 16,
    "hysteresis": 2,
    "min_loss_scale": 1
  },
  "bf16": {
    "enabled": "auto"
  },
"""
_TAIL = """,
  "comms_config": {
    "verbose": false
  },
  "monitor_config": {
    "enabled": true,
    "tag": "DeepSpeedMonitor",
    "csv_monitor": {
      "enabled": false
    }
  }
}
"""
LF_Z0 = _HEAD + """  "zero_optimization": {
    "stage": 0,
    "allgather_partitions": true,
    "allgather_bucket_size": 5e8,
    "overlap_comm": false,
    "reduce_scatter": true,
    "reduce_bucket_size": 5e8,
    "contiguous_gradients": true,
    "round_robin_gradients": true
  }""" + _TAIL
LF_Z2 = LF_Z0.replace('"stage": 0', '"stage": 2')
LF_Z3 = _HEAD + """  "zero_optimization": {
    "stage": 3,
    "overlap_comm": false,
    "contiguous_gradients": true,
    "sub_group_size": 1e9,
    "reduce_bucket_size": "auto",
    "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto",
    "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9,
    "stage3_gather_16bit_weights_on_model_save": true
  }""" + _TAIL
LF_Z3_OFFLOAD = LF_Z3.replace('"stage": 3,', '"stage": 3,\n    "offload_optimizer": {\n      "device": "cpu",\n'
                              '      "pin_memory": true\n    },\n    "offload_param": {\n      "device": "cpu",\n'
                              '      "pin_memory": true\n    },')

RECIPE = ("model_name_or_path: tiny\ndataset: d\nmax_steps: 10\ncutoff_len: 64\nper_device_train_batch_size: 4\n"
          "gradient_accumulation_steps: 2\nmax_grad_norm: 0.5\nbf16: true\n")
WORLD2 = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}


def test_generated_config_stage0(recipe):
    r = resolve(recipe("per_device_train_batch_size: 2\ngradient_accumulation_steps: 3\nmax_grad_norm: 0\n"),
                env=WORLD2)
    assert r.ds_config == {
        "train_batch_size": 12,  # 2 x 3 x 2 ranks
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 3,
        "gradient_clipping": 0,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                 "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": {"stage": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    assert "optimizer" not in r.ds_config and "scheduler" not in r.ds_config


def test_generated_config_stage3_with_offload(recipe):
    r = resolve(recipe("zero_stage: 3\noffload_optimizer: cpu\noffload_param: cpu\nbf16: true\n"))
    zero = r.ds_config["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    # tiny is 64 wide: buckets follow transformers' "auto" rules (h*h, 0.9*h*h, 10*h)
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    assert zero["overlap_comm"] is False and zero["contiguous_gradients"] is True
    assert r.ds_config["bf16"] == {"enabled": True}
    assert r.ds_config["zero_force_ds_cpu_optimizer"] is False


def test_generated_fp16_section_follows_the_recipe(recipe, monkeypatch):
    from pipeline.recipe import rules

    monkeypatch.setattr(rules.core, "cuda_available", lambda: True)
    r = resolve(recipe("fp16: true\nloss_scale: 128\ninitial_scale_power: 12\nloss_scale_window: 500\n"
                       "hysteresis: 3\nmin_loss_scale: 0.5\n"))
    assert r.ds_config["fp16"] == {"enabled": True, "loss_scale": 128, "initial_scale_power": 12,
                                   "loss_scale_window": 500, "hysteresis": 3, "min_loss_scale": 0.5}


@pytest.mark.parametrize("text, stage", [(LF_Z0, 0), (LF_Z2, 2), (LF_Z3, 3), (LF_Z3_OFFLOAD, 3)],
                         ids=["z0", "z2", "z3", "z3_offload"])
def test_llama_factory_auto_values_are_filled(write, text, stage):
    write("ds.json", text)
    write("r.yaml", RECIPE + "deepspeed: ds.json\n")
    r = resolve("r.yaml", env=WORLD2)
    ds = r.ds_config
    assert ds["train_batch_size"] == 16  # 4 x 2 x 2 ranks
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}
    assert ds["fp16"]["enabled"] is False and ds["fp16"]["loss_scale_window"] == 1000
    assert ds["zero_optimization"]["stage"] == stage
    assert ds["monitor_config"]["tag"] == "DeepSpeedMonitor"  # the user's other settings are kept
    assert "auto" not in json.dumps(ds)
    assert (r["zero_stage"], r.source("zero_stage")) == (stage, "derived" if stage else "default")
    if stage == 3:
        zero = ds["zero_optimization"]
        assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
                zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
        assert zero["sub_group_size"] == 1e9
    else:
        assert ds["zero_optimization"]["reduce_bucket_size"] == 5e8  # explicit in the JSON: kept
    offload = text is LF_Z3_OFFLOAD
    assert r["offload_optimizer"] == ("cpu" if offload else "none")
    assert r["offload_param"] == ("cpu" if offload else "none")


def test_explicit_values_that_agree_are_fine(write):
    write("ds.json", {"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2,
                      "gradient_clipping": 0.5, "bf16": {"enabled": True}, "fp16": {"enabled": False}})
    write("r.yaml", RECIPE + "deepspeed: ds.json\n")
    assert resolve("r.yaml", env=WORLD2).ds_config["train_batch_size"] == 16


def test_train_batch_size_must_match_the_world_size(write):
    write("ds.json", {"train_batch_size": 16})
    write("r.yaml", RECIPE + "deepspeed: ds.json\n")
    with pytest.raises(UserError) as exc:
        resolve("r.yaml")  # one rank: 4 x 2 x 1 = 8
    assert exc.value.messages == [
        'ds.json:2:3: train_batch_size is 16 but the recipe has total_train_batch_size: 8 '
        '(per_device_train_batch_size x gradient_accumulation_steps x world size); set it to "auto" in ds.json or '
        'make them agree']
    assert resolve("r.yaml", env=WORLD2).ds_config["train_batch_size"] == 16


def test_every_contradiction_is_reported(write):
    write("ds.json", {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
                      "gradient_clipping": 1.0, "fp16": {"enabled": True}, "bf16": {"enabled": False}})
    write("r.yaml", RECIPE + "deepspeed: ds.json\n")
    with pytest.raises(UserError) as exc:
        resolve("r.yaml")
    assert exc.value.messages == [
        'ds.json:2:3: train_micro_batch_size_per_gpu is 8 but the recipe has per_device_train_batch_size: 4 '
        '(r.yaml:5:30); set it to "auto" in ds.json or make them agree',
        'ds.json:3:3: gradient_accumulation_steps is 1 but the recipe has gradient_accumulation_steps: 2 '
        '(r.yaml:6:30); set it to "auto" in ds.json or make them agree',
        'ds.json:4:3: gradient_clipping is 1.0 but the recipe has max_grad_norm: 0.5 (r.yaml:7:16); set it to '
        '"auto" in ds.json or make them agree',
        'ds.json:6:5: fp16.enabled is true but the recipe has fp16: false (default); set it to "auto" in ds.json '
        'or make them agree',
        'ds.json:9:5: bf16.enabled is false but the recipe has bf16: true (r.yaml:8:7); set it to "auto" in '
        'ds.json or make them agree',
    ]


def test_zero_stage_set_in_the_recipe_must_agree(write):
    write("ds.json", LF_Z2)
    write("r.yaml", RECIPE + "deepspeed: ds.json\nzero_stage: 3\n")
    with pytest.raises(UserError) as exc:
        resolve("r.yaml")
    assert exc.value.messages == [
        'ds.json:19:5: zero_optimization.stage is 2 but the recipe has zero_stage: 3 (r.yaml:10:13); set it to '
        '"auto" in ds.json or make them agree']


def test_unfillable_auto_and_bad_stage(write):
    write("ds.json", {"zero_optimization": {"stage": 5, "mystery_knob": "auto"}})
    write("r.yaml", RECIPE + "deepspeed: ds.json\n")
    with pytest.raises(UserError) as exc:
        resolve("r.yaml")
    assert exc.value.messages == [
        "ds.json:3:5: zero_optimization.stage: given 5, expected one of 0, 1, 2, 3",
        'ds.json:4:5: zero_optimization.mystery_knob is "auto" but nothing in the recipe fills it; give a value']


def test_json_that_is_not_an_object(write):
    write("ds.json", "[1, 2]\n")
    write("r.yaml", RECIPE + "deepspeed: ds.json\n")
    with pytest.raises(UserError) as exc:
        resolve("r.yaml")
    assert exc.value.messages == ["ds.json:1:1: a DeepSpeed config must be a JSON object {...}, found list"]


def test_duplicate_json_key(write):
    write("ds.json", '{"gradient_clipping": 1.0, "gradient_clipping": 0.5}\n')
    write("r.yaml", RECIPE + "deepspeed: ds.json\n")
    with pytest.raises(UserError) as exc:
        resolve("r.yaml")
    assert exc.value.messages == ["ds.json: duplicate key 'gradient_clipping' in the DeepSpeed JSON; keep one"]


def test_deepspeed_accepts_the_configs(write):
    """DeepSpeed's own config parser takes the generated and the filled-in configs (imports deepspeed: slow-ish)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    write("z3.json", LF_Z3_OFFLOAD)
    write("r.yaml", RECIPE)
    configs = [resolve("r.yaml", [f"zero_stage={s}"]).ds_config for s in (0, 1, 2)]
    configs.append(resolve("r.yaml", ["zero_stage=3", "offload_optimizer=cpu", "offload_param=cpu"]).ds_config)
    configs.append(resolve("r.yaml", ["deepspeed=z3.json"]).ds_config)
    for ds in configs:
        parsed = DeepSpeedConfig(ds)
        assert parsed.train_batch_size == 8
        assert parsed.gradient_clipping == 0.5
        assert parsed.zero_optimization_stage == ds["zero_optimization"]["stage"]


def test_zero2_reduce_bucket_holds_every_trainable_gradient(recipe):
    """ZeRO 1-2 reduce all trainable gradients in one bucket (overlap_comm is off: smaller buckets only add
    calls); counted here on the model itself, not from the recipe's arithmetic."""
    from pipeline.model.config import PRESETS
    from pipeline.model.gpt import GPTModel

    full = sum(p.numel() for p in GPTModel(PRESETS["tiny"], seed=0).parameters())
    r = resolve(recipe("zero_stage: 2\nfinetuning_type: full\n"))
    assert full > 64 * 64 and r.ds_config["zero_optimization"]["reduce_bucket_size"] == full


@pytest.mark.parametrize("stage, hidden, trainable, want", [
    (2, 768, 124_439_808, 124_439_808),   # gpt2-small full: one bucket
    (2, 768, 2_359_296, 2_359_296),       # gpt2-small LoRA r=16 on every linear
    (1, 768, 4_096, 768 * 768),           # fewer trainable than hidden²: hidden² (a floor, as before)
    (2, 4096, 8_030_261_248, 500_000_000),  # Llama 8B full: DeepSpeed's default caps the staging buffer
    (2, None, None, 500_000_000),         # nothing known: DeepSpeed's default
    (2, 768, None, 768 * 768),            # model readable, trainable count not: hidden²
    (3, 768, 124_439_808, 768 * 768),     # ZeRO 3: transformers' "auto" (hidden²), as LLaMA-Factory's z3 configs
])
def test_reduce_bucket_rule(stage, hidden, trainable, want):
    from pipeline.recipe.dsconfig import reduce_bucket

    assert reduce_bucket(stage, hidden, trainable) == want


@pytest.mark.parametrize("stage, world, offload, said", [
    (3, 1, "none", True),    # nothing to partition: the notice
    (3, 2, "none", False),   # two ranks: ZeRO 3 halves the weights
    (3, 1, "cpu", False),    # parameters offloaded: what ZeRO 3 is for on one rank
    (2, 1, "none", False),
])
def test_zero3_on_one_rank_is_said_once_with_the_measured_cost(stage, world, offload, said):
    notice = dsconfig.one_rank_zero3_notice({"zero_stage": stage, "world_size": world, "offload_param": offload})
    assert (notice is not None) == said
    if said:
        assert "zero_stage: 2" in notice and "offload_param: cpu" in notice and "0.2-0.65x" in notice
