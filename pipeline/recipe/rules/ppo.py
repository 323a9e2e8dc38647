"""Rules on stage ppo (pipeline.train.ppo): reward_model given (and there, for train), the parts implemented (a LoRA,
OFT, full or freeze policy, ZeRO 0-3 on any number of ranks, ppo_buffer_size 1, no beam search), and the ppo keys
only under stage ppo. reward_model_type api / oft: the schema's x-refused.
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
    return reward_folder_problems(ctx)


def reward_folder_problems(ctx: Context) -> list[tuple[str, str]]:
    """What the reward_model folder holds, read from its files now (pipeline.model.reward_folder): a folder of
    another form, another base or a value head of the wrong size stops here, at the key, not after the policy
    loaded."""
    from pipeline.errors import UserError
    from pipeline.model.reward_folder import reward_source
    from pipeline.recipe.modelinfo import model_info
    from pipeline.recipe.run_folders import reward_folder

    if ctx.values["reward_model_type"] not in ("lora", "full"):
        return []  # api / oft: refused by the schema
    info = model_info(ctx.values["model_name_or_path"])
    try:
        kind = ctx.values["reward_model_type"]
        reward_source(reward_folder(ctx.values["reward_model"], kind), kind, info and info.n_embd)
    except UserError as err:
        return [("reward_model", m.removeprefix("reward_model: ")) for m in err.messages]
    return []


@rule("stage", *NOT_IMPLEMENTED)
def ppo_parts_implemented(ctx: Context) -> list[tuple[str, str]]:
    """The parts of LLaMA-Factory's PPO not implemented here, each refused at its key with the reason."""
    if ctx.values["stage"] != "ppo":
        return []
    return [(key, f"given {json.dumps(ctx.values[key])} with stage ppo: {why}")
            for key, (refused, why) in NOT_IMPLEMENTED.items() if refused(ctx.values[key])]


@rule("stage", *PPO_KEYS)
def ppo_keys_need_ppo(ctx: Context) -> list[tuple[str, str]]:
    """The ppo keys outside stage ppo would be ignored without a word."""
    stage = ctx.values["stage"]
    if stage == "ppo":
        return []
    default = defaults()
    return [(key, f"is a stage ppo setting but stage is {stage}; remove it or set stage: ppo") for key in PPO_KEYS
            if ctx.set_here(key) and ctx.values[key] != default[key]]
