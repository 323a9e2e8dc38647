"""The step layout every counter of steps shares: how many micro-batches one optimizer step (stage ppo: one PPO step)
draws on a rank. A module of its own, below resolve and the rules, which both read it."""
from __future__ import annotations

from typing import Any, Mapping


def batches_per_step(values: Mapping[str, Any]) -> int:
    """The micro-batches (per_device_train_batch_size rows each) one step draws on a rank: gradient_accumulation_steps,
    and under stage ppo ppo_buffer_size times that. LLaMA-Factory 0.9.5's PPO step takes TRL's batch_size =
    per_device_train_batch_size x gradient_accumulation_steps x ppo_buffer_size prompts (train/ppo/trainer.py:99-104)
    and updates once per per_device_train_batch_size x gradient_accumulation_steps of them, so a step is
    ppo_buffer_size updates an epoch (pipeline.train.ppo); its data loader and step count go by the whole batch
    (trainer.py:133-135, 205-220)."""
    buffer = values.get("ppo_buffer_size", 1) if values.get("stage") == "ppo" else 1
    return values["gradient_accumulation_steps"] * buffer


def warmup_waste(total_steps: int | None, warmup_steps: int | None) -> str | None:
    """What the warmup does to a run of `total_steps` optimizer steps when it wastes steps at learning rate 0, else
    None. The linear warmup's factor at step s (0-based) is s / warmup_steps (pipeline.train.schedule.lr_factor, as
    transformers' get_linear_schedule_with_warmup and HF Trainer: step 0 of a warmup trains at lr 0), so step 1
    always trains at lr 0. That is the price of a ramp; it buys nothing when the warmup is that one step, or when it
    covers every step (the run never reaches learning_rate; a one-step run never moves its weights)."""
    if not total_steps or not warmup_steps or 1 < warmup_steps < total_steps:
        return None
    if total_steps == 1:
        return "the run's only step trains at lr 0, so the weights do not change"
    if warmup_steps >= total_steps:
        return (f"warmup covers all {total_steps} steps: step 1 trains at lr 0 and the learning rate never reaches "
                f"learning_rate (the last step trains at {(total_steps - 1) / warmup_steps:.0%} of it)")
    return "step 1 trains at lr 0 and the warmup is that one step, which trains nothing"


def steps_word(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"
