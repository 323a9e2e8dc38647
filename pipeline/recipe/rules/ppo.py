"""Rules on stage ppo (pipeline.train.ppo): reward_model given (and there, for train), the parts implemented (a LoRA,
OFT, full or freeze policy, ZeRO 0-3 on any number of ranks, any ppo_buffer_size, no beam search), and the ppo keys
only under stage ppo. reward_model_type api: reward_model a reward server's URL (pipeline.model.reward_server); oft: the
schema's x-refused.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.recipe.rules.core import Context, rule
from pipeline.recipe.spec import defaults

PPO_KEYS = ("reward_model", "reward_model_type", "ppo_buffer_size", "ppo_epochs", "ppo_score_norm", "ppo_target",
            "ppo_whiten_rewards")
NOT_IMPLEMENTED = {
    "num_beams": (lambda v: v != 1, "stage ppo's rollouts are one response per prompt, sampled or greedy, here; "
                  "beam search is for generate, eval and chat: set num_beams: 1"),
}


@rule("stage", "reward_model", commands=None)
def ppo_needs_reward_model(ctx: Context) -> list[tuple[str, str]]:
    """PPO scores every response with the reward model: without one there is nothing to train on (LLaMA-Factory:
    "Reward model is necessary for PPO training"). train loads it now: a missing folder stops here. The other
    commands (validate, plan) check a local folder that already holds its reward model (one an upstream rm recipe
    has still to train is left to train). Under reward_model_type api it is a reward server's URL."""
    if ctx.values["stage"] != "ppo":
        return []
    path = ctx.values["reward_model"]
    if path is None:
        return [("stage", "ppo needs reward_model: a stage rm run's output_dir (its adapter/ with reward_model_type "
                          "lora, the default; its model/ or merged/ with reward_model_type full), or a reward "
                          "server's URL with reward_model_type api")]
    if ctx.values["reward_model_type"] == "api":
        return reward_server_problems(ctx, path)
    if ctx.command != "train":
        here = local_reward_folder(path, ctx.values["reward_model_type"])
        return reward_folder_problems(ctx, here) if here is not None else []
    from pipeline.errors import UserError
    from pipeline.model.hub import is_hub_id, missing_here, resolve_model_path
    from pipeline.recipe.rules.model import written_by

    writer = written_by(ctx, path)
    if is_hub_id(path):  # as model_name_or_path: a snapshot in the HF cache, fetched now
        try:
            resolve_model_path(path, key="reward_model", writer=writer)
        except UserError as err:
            return [("reward_model", m.removeprefix("reward_model: ")) for m in err.messages]
    elif not os.path.exists(path):
        return [("reward_model", f"{missing_here(path, writer)}; expected a stage rm run's output_dir, its adapter/ "
                                 "(reward_model_type lora) or a reward model folder (reward_model_type full)")]
    return reward_folder_problems(ctx)


def reward_server_problems(ctx: Context, url: str) -> list[tuple[str, str]]:
    """reward_model_type api: the URL's form, for every command (validate and plan contact nothing). train asks once,
    at its first resolve (before the build that overwrite_cache runs, before the model loads), whether anything
    answers there (pipeline.model.reward_server.unreachable): a server not started, or a wrong host or port, would
    otherwise stop the run only at its first reward, after the model load and a rollout. What the server answers to
    the rows is checked when it answers."""
    from pipeline.model.reward_server import unreachable, url_problem

    problem = url_problem(url)
    if problem is None and ctx.command == "train" and not ctx.built:
        why = unreachable(url)
        if why is not None:
            problem = (f"the reward server {url} does not answer ({why}); start it first (docs/ppo.md#a-reward-server), "
                       "or check the host, the port and http / https")
    return [("reward_model", problem)] if problem else []


def local_reward_folder(path: str, kind: str) -> Path | None:
    """The reward model's folder when the local folder `path` already holds it under reward_model_type `kind`
    (run_folders.reward_folder finds it; a hub id is not looked up: nothing is downloaded before train), else None."""
    from pipeline.errors import UserError
    from pipeline.recipe.run_folders import reward_folder

    if kind not in ("lora", "full") or not os.path.isdir(path):
        return None
    try:
        return reward_folder(path, kind)
    except UserError:
        return None


def reward_folder_problems(ctx: Context, folder: Path | None = None) -> list[tuple[str, str]]:
    """What the reward_model folder holds, read from its files now (pipeline.model.reward_folder): a folder of
    another form, another base (a full model whose vocabulary lacks ids of the policy's tokenizer; a LoRA adapter
    whose tensors do not fit the policy's base, which it is folded into) or a value head of the wrong size stops
    here, at the key, not after the policy loaded or at the first reward. `folder`: the one reward_folder found
    already (None: found here, its problems said)."""
    from pipeline.errors import UserError
    from pipeline.model.reward_folder import reward_source
    from pipeline.recipe.modelinfo import available_recipe_tokenizer, model_info
    from pipeline.recipe.run_folders import reward_folder

    kind = ctx.values["reward_model_type"]
    if kind not in ("lora", "full"):
        return []  # api: a server (reward_server_problems); oft: refused by the schema
    info = model_info(ctx.values["model_name_or_path"])
    tokenizer = available_recipe_tokenizer(ctx.values) if kind == "full" else None
    try:
        found = folder if folder is not None else reward_folder(ctx.values["reward_model"], kind)
        source = reward_source(found, kind, info and info.n_embd, tokenizer)
    except UserError as err:
        return [("reward_model", m.removeprefix("reward_model: ")) for m in err.messages]
    return [] if kind == "full" else lora_reward_fits(ctx, str(source.folder))


def lora_reward_fits(ctx: Context, adapter: str) -> list[tuple[str, str]]:
    """A LoRA reward adapter is folded into the policy's base (pipeline.train.ppo.load_reward_model; LLaMA-Factory
    swaps it into the policy model itself): its tensors must fit that base's layers (rules.model.
    adapter_shape_problems, from the files' headers), or the run would stop when they load."""
    from pipeline.recipe.rules.model import adapter_shape_problems

    return adapter_shape_problems(
        "reward_model", adapter, "model_name_or_path", ctx.values["model_name_or_path"],
        advice="a LoRA reward adapter must be trained on the policy's base, which it is folded into to score (as "
               "LLaMA-Factory swaps it into the policy model); train it (stage rm) on model_name_or_path, or give a "
               "full reward model folder (reward_model_type: full) that shares the policy's tokenizer")


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
