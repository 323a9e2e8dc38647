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
