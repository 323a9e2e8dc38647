"""fp16 cannot run on a CPU: its DeepSpeed loss-scaling block is checked as DeepSpeed reads it, and the trainer's
fp16 reporting (loss scale in the log and in failure messages) is checked against a stand-in engine."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.recipe.args import train_args
from pipeline.errors import UserError
from pipeline.recipe import resolve
from pipeline.train.checkpoint import TrainState
from pipeline.train.loop import Trainer, Window
from tests.train.helpers import BASE_SFT


def fp16_recipe(workdir, command="plan", **keys):
    import json

    values = {**BASE_SFT, "output_dir": "saves/fp16", "fp16": True, **keys}
    path = workdir / "fp16.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()), encoding="utf-8")
    return resolve(path, [], command=command, env={"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"})


def test_default_fp16_block_is_dynamic_loss_scaling(workdir):
    ds = fp16_recipe(workdir).ds_config
    assert ds["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                          "hysteresis": 2, "min_loss_scale": 1}
    assert ds["bf16"] == {"enabled": False}
    from deepspeed.runtime.precision_config import get_float16_config

    fp16 = get_float16_config(ds)
    assert fp16.enabled and fp16.loss_scale == 0  # 0 = dynamic
    assert fp16.dynamic_loss_scale_args() == {"init_scale": 65536, "scale_window": 1000, "delayed_shift": 2,
                                              "consecutive_hysteresis": False, "min_scale": 1}


def test_recipe_scaling_keys_reach_deepspeed(workdir):
    ds = fp16_recipe(workdir, initial_scale_power=12, loss_scale_window=200, hysteresis=4, min_loss_scale=8).ds_config
    from deepspeed.runtime.precision_config import get_float16_config

    assert get_float16_config(ds).dynamic_loss_scale_args() == {"init_scale": 4096, "scale_window": 200,
                                                                "delayed_shift": 4, "consecutive_hysteresis": False,
                                                                "min_scale": 8}
    static = get_float16_config(fp16_recipe(workdir, loss_scale=128).ds_config)
    assert static.loss_scale == 128.0  # a fixed scale: no dynamic scaling


def test_training_with_fp16_on_a_cpu_is_refused_by_the_recipe(workdir, monkeypatch):
    from pipeline.recipe import rules

    monkeypatch.setattr(rules.core, "cuda_available", lambda: False)
    with pytest.raises(UserError) as err:
        fp16_recipe(workdir, command="train")
    assert any("fp16 needs a CUDA GPU" in m and "bf16" in m for m in err.value.messages)


class StubOptimizer:
    """DeepSpeed's own dynamic loss scaler behind the attribute its fp16 optimizers expose (cur_scale)."""

    def __init__(self):
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

        from pipeline.runtime import dist

        dist.init()  # the scaler logs its overflow through deepspeed.comm
        self.loss_scaler = DynamicLossScaler(init_scale=2.0**12, scale_window=1000, min_scale=1, delayed_shift=1,
                                             consecutive_hysteresis=False)
        self.loss_scaler.update_scale(True)  # one overflow: DeepSpeed halves the scale, 4096 -> 2048

    @property
    def cur_scale(self):
        return self.loss_scaler.loss_scale


class StubEngine:
    """Just enough of a DeepSpeed engine under fp16 for the loop's bookkeeping."""

    def __init__(self, losses, step_error=None):
        self.module = torch.nn.Linear(2, 2)
        self.optimizer = StubOptimizer()
        self.device = "cpu"
        self.losses, self.step_error, self.micro = list(losses), step_error, 0

    def __call__(self, input_ids, attention_mask=None, labels=None, reduction="mean"):
        """`losses` are per-token means; the loop asks for (sum, count) over the labelled tokens."""
        count = int((labels != -100).sum())
        return torch.tensor(self.losses.pop(0) * count, requires_grad=True), count

    def backward(self, loss):
        pass

    def step(self):
        self.micro += 1
        if self.step_error:
            raise Exception(self.step_error)

    def is_gradient_accumulation_boundary(self):
        return True

    def get_global_grad_norm(self):
        return 0.5

    def get_lr(self):
        return [1e-4]

    def zero_optimization(self):
        return False

    def bfloat16_enabled(self):
        return False

    def fp16_enabled(self):
        return True


class StubLoader:
    batch_size, world_size, num_examples = 1, 1, 8

    def __len__(self):
        return 8

    def set_epoch(self, epoch):
        pass

    def iter_from(self, k):
        for _ in range(k, 8):
            yield {"input_ids": torch.zeros(1, 3, dtype=torch.long), "labels": torch.ones(1, 3, dtype=torch.long),
                   "attention_mask": torch.ones(1, 3, dtype=torch.long)}


def stub_trainer(engine, **keys):
    r = {"gradient_accumulation_steps": 1, "l1_lambda": 0.0, "nan_policy": "stop", "fp16": True,
         "min_loss_scale": 1, "total_steps": 4, **keys}
    return Trainer(engine, train_args(r), TrainState(global_step=2), StubLoader(), evaluate=None, save=lambda: None, log=None,
                   stop=None)


def test_fp16_log_carries_the_loss_scale():
    trainer = stub_trainer(StubEngine([2.0, 4.0]), gradient_accumulation_steps=2)
    window = Window()
    trainer.optimizer_step(window)
    window.steps = 1
    from tqdm import tqdm

    record = trainer.train_metrics(window, 0.5, started=0.0, bar=tqdm(total=4, initial=2, disable=True))
    assert record["loss_scale"] == 2048.0  # DeepSpeed's scaler after one overflow (4096 halved), by hand
    assert record["loss"] == 3.0  # the mean of the window's two micro-batch losses, by hand


def test_fp16_nan_message_names_the_step_and_the_scale():
    with pytest.raises(UserError) as err:
        stub_trainer(StubEngine([math.nan])).optimizer_step(Window())
    assert "optimizer step 3 is nan (fp16 loss scale 2048)" in err.value.messages[0]


def test_fp16_scaler_giving_up_is_explained():
    engine = StubEngine([1.0], step_error="Current loss scale already at minimum - cannot decrease scale anymore.")
    with pytest.raises(UserError) as err:
        stub_trainer(engine).optimizer_step(Window())
    assert "fp16 gradients overflowed at optimizer step 3 even at the minimum loss scale 2048.0" in \
        err.value.messages[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_llama_and_qwen_checkpoints_get_the_same_fp16_block_and_cpu_refusal(workdir, monkeypatch, family):
    """The fp16 block and the CPU refusal do not depend on the family: a transformers-written Llama / Qwen
    checkpoint resolves to GPT-2's block (the model's half-precision forward and backward: tests/model/
    test_families.py; on a GPU: bench/gpu_check.sh, Qwen3-0.6B-shaped)."""
    pytest.importorskip("transformers")
    from pipeline.recipe import rules
    from tests.acceptance.harness import hf_model

    checkpoint = workdir / family
    hf_model(family, vocab_size=512, bos_token_id=0, eos_token_id=1).save_pretrained(checkpoint)
    gpt2 = fp16_recipe(workdir).ds_config
    ds = fp16_recipe(workdir, model_name_or_path=str(checkpoint)).ds_config
    assert ds["fp16"] == gpt2["fp16"] and ds["bf16"] == {"enabled": False}
    monkeypatch.setattr(rules.core, "cuda_available", lambda: False)
    with pytest.raises(UserError) as err:
        fp16_recipe(workdir, command="train", model_name_or_path=str(checkpoint))
    assert any("fp16 needs a CUDA GPU" in m for m in err.value.messages)
