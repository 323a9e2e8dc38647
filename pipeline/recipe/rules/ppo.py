"""Rules on stage ppo (pipeline.train.ppo): reward_model given (and there, for train), the parts implemented (a LoRA,
OFT, full or freeze policy, ZeRO 0-2 on any number of ranks, ppo_buffer_size 1, no beam search), and the ppo keys only
under stage ppo. reward_model_type api / oft: the schema's x-refused.
"""
from __future__ import annotations

import json
import os

from pipeline.recipe.rules.core import Context, rule
from pipeline.recipe.spec import defaults

PPO_KEYS = ("reward_model", "reward_model_type", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target",
            "ppo_whiten_rewards")
NOT_IMPLEMENTED = {
    "ppo_buffer_size": (lambda v: v != 1, "only 1 (LLaMA-Factory's default) is implemented here: each PPO step "
                        "generates per_device_train_batch_size x gradient_accumulation_steps responses; raise "
                        "gradient_accumulation_steps for a larger batch"),
    "zero_stage": (lambda v: v == 3, "stage ppo runs on DeepSpeed ZeRO 0, 1 or 2 here: ZeRO 3 partitions the "
                   "policy's weights, and its rollouts would need them gathered for generation (TRL's "
                   "unwrap_model_for_generation), which is not implemented; use ZeRO 2"),
    "num_beams": (lambda v: v != 1, "stage ppo's rollouts are one response per prompt, sampled or greedy, here; "
                  "beam search is for generate, eval and chat: set num_beams: 1"),
}


@rule("stage", "reward_model", commands=None)
def ppo_needs_reward_model(ctx: Context) -> list[tuple[str, str]]:
    """PPO scores every response with the reward model: without one there is nothing to train on (LLaMA-Factory:
    "Reward model is necessary for PPO training"). train loads it now: a missing folder stops here."""
    if ctx.values["stage"] != "ppo":
        return []
    path = ctx.values["reward_model"]
    if path is None:
        return [("stage", "ppo needs reward_model: a stage rm run's output_dir (its adapter/ with reward_model_type "
                          "lora, the default; its model/ or merged/ with reward_model_type full)")]
    if ctx.command != "train":
        return []
    from pipeline.errors import UserError
    from pipeline.model.hub import is_hub_id, resolve_model_path

    if is_hub_id(path):  # as model_name_or_path: a snapshot in the HF cache, fetched now
        try:
            resolve_model_path(path, key="reward_model")
        except UserError as err:
            return [("reward_model", m.removeprefix("reward_model: ")) for m in err.messages]
    elif not os.path.exists(path):
        return [("reward_model", f"directory {path!r} not found; expected a stage rm run's output_dir, its adapter/ "
                                 "(reward_model_type lora) or a reward model folder (reward_model_type full)")]
    return []


@rule("stage", "deepspeed", *NOT_IMPLEMENTED)
def ppo_parts_implemented(ctx: Context) -> list[tuple[str, str]]:
    """The parts of LLaMA-Factory's PPO not implemented here, each refused at its key with the reason."""
    if ctx.values["stage"] != "ppo":
        return []
    problems = []
    for key, (refused, why) in NOT_IMPLEMENTED.items():
        if refused(ctx.values[key]):
            at = "deepspeed" if key == "zero_stage" and ctx.values["deepspeed"] else key  # the JSON's stage
            problems.append((at, f"given {json.dumps(ctx.values[at])} with stage ppo: {why}"))
    return problems


@rule("stage", *PPO_KEYS)
def ppo_keys_need_ppo(ctx: Context) -> list[tuple[str, str]]:
    """The ppo keys outside stage ppo would be ignored without a word."""
    stage = ctx.values["stage"]
    if stage == "ppo":
        return []
    default = defaults()
    return [(key, f"is a stage ppo setting but stage is {stage}; remove it or set stage: ppo") for key in PPO_KEYS
            if ctx.set_here(key) and ctx.values[key] != default[key]]
