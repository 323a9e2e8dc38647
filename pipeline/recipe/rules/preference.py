"""Rules on preference tuning (stages dpo and kto): their keys (pref_beta, pref_loss, pref_ftx, dpo_label_smoothing,
simpo_gamma, pref_bco_weight, ld_alpha, kto_chosen_weight, kto_rejected_weight) only in the stages that read them,
pref_bco_weight only with a loss that has a reference, and ref_model (a loss that uses it: dpo / kto, or sft's
use_asft_loss; the policy's vocabulary) with its ref_model_adapters (on top of ref_model, adapter folders). PiSSA's
reference: method.py.
"""
from __future__ import annotations

import os

from pipeline.names import DPO_LOSS_KEYS, PREFERENCE_STAGES, REFERENCE_FREE, uses_reference
from pipeline.recipe.rules.core import Context, rule


PREF_KEYS = ("pref_beta", "pref_loss", "pref_ftx", "dpo_label_smoothing", "simpo_gamma", "pref_bco_weight", "ld_alpha",
             "ref_model", "ref_model_adapters")
REFERENCE_KEYS = ("ref_model", "ref_model_adapters")  # the reference model a loss with one scores against


KTO_KEYS = ("kto_chosen_weight", "kto_rejected_weight")


@rule("stage", "use_asft_loss", *PREF_KEYS, *KTO_KEYS)
def pref_keys_need_dpo(ctx: Context) -> list[tuple[str, str]]:
    """Preference settings outside the stages that read them would be ignored without a word: pref_loss & co. under
    kto (LLaMA-Factory's KTO trainer never reads them), kto_*_weight outside kto, every one of them under pt / sft / rm
    (a reward model has no reference and no preference loss), but ref_model and ref_model_adapters under sft with
    use_asft_loss (the reference of its KL term, as LLaMA-Factory's create_ref_model reads them there)."""
    stage = ctx.values["stage"]
    if stage == "kto":
        return [(key, "is a stage dpo setting; stage kto's loss is KTO's (its keys: pref_beta, pref_ftx, "
                      "kto_chosen_weight, kto_rejected_weight, ref_model, ref_model_adapters); remove it") for key in DPO_LOSS_KEYS
                if ctx.set_here(key)]
    if stage == "dpo":
        return [(key, "is a stage kto setting; remove it or set stage: kto") for key in KTO_KEYS if ctx.set_here(key)]
    if stage == "ppo":  # LLaMA-Factory's PPO takes a ref_model; here its reference is the starting model
        return [(key, "is not implemented for stage ppo: its reference is the starting model (the policy with its "
                      "adapters switched off); remove it") if key in REFERENCE_KEYS else
                (key, "is a preference-tuning setting but stage is ppo; remove it")
                for key in (*PREF_KEYS, *KTO_KEYS) if ctx.set_here(key)]
    asft = stage == "sft" and ctx.values["use_asft_loss"]
    return [(key, f"is a preference-tuning setting but stage is {stage}; remove it or set stage: "
                  f"{'kto' if key in KTO_KEYS else 'dpo'}"
                  + (" (or use_asft_loss: true, whose KL term scores against it)"
                     if key in REFERENCE_KEYS and stage == "sft" else ""))
            for key in (*PREF_KEYS, *KTO_KEYS) if ctx.set_here(key) and not (asft and key in REFERENCE_KEYS)]


@rule("stage", "pref_loss", *REFERENCE_KEYS)
def ref_model_needs_reference_loss(ctx: Context) -> list[tuple[str, str]]:
    """One message for the one mistake: at ref_model, or at ref_model_adapters when it is set alone."""
    loss = ctx.values["pref_loss"]
    given = [key for key in REFERENCE_KEYS if ctx.values[key] is not None]
    if ctx.values["stage"] != "dpo" or loss not in REFERENCE_FREE or not given:
        return []
    return [(given[0], f"is set but pref_loss {loss} uses no reference model; remove {' and '.join(given)}, or "
                       "choose pref_loss sigmoid, hinge or ipo")]


def scores_against_reference(ctx: Context) -> bool:
    """dpo with a reference loss, kto, or sft with use_asft_loss: the stages whose reference ref_model_adapters build."""
    return uses_reference(ctx.values["stage"], ctx.values["pref_loss"], ctx.values["use_asft_loss"])


@rule("stage", "ref_model_adapters", "ref_model", "pref_loss", "use_asft_loss")
def ref_model_adapters_need_ref_model(ctx: Context) -> list[tuple[str, str]]:
    """ref_model_adapters go on top of ref_model. LLaMA-Factory reads them only with ref_model and otherwise drops
    them without a word (the reference is then the starting model, not the adapter's): here that is a mistake to
    fix, not a guess of which base was meant."""
    adapters = ctx.values["ref_model_adapters"]
    if adapters is None or ctx.values["ref_model"] is not None or not scores_against_reference(ctx):
        # no reference: the rule above
        return []
    return [("ref_model_adapters", f"given {adapters!r} but ref_model is not set; the adapters go on top of "
                                   "ref_model: set ref_model to the base model they were trained on (often "
                                   f"model_name_or_path, {ctx.values['model_name_or_path']}), or remove "
                                   "ref_model_adapters")]


@rule("stage", "ref_model_adapters", "pref_loss", "use_asft_loss")
def ref_model_adapters_exist(ctx: Context) -> list[tuple[str, str]]:
    """Each adapter folded into the reference is checked as adapter_name_or_path is (a LoRA or an OFT adapter
    alike: either is folded in). train and eval load the reference now, so every folder must be there; the other
    commands (validate, plan) check the folders that exist, as a missing one may be an upstream recipe's output
    that make builds first, and never download a hub id."""
    from pipeline.names import split_names
    from pipeline.recipe.rules.model import adapter_folder_problems, folders_to_check

    if not scores_against_reference(ctx):
        return []
    paths = folders_to_check(split_names(ctx.values["ref_model_adapters"]), ctx.command in ("train", "eval"))
    return [problem for path in paths for problem in adapter_folder_problems(ctx, "ref_model_adapters", path)]


@rule("stage", "ref_model_adapters", "ref_model", "pref_loss", "use_asft_loss", commands=("train", "eval"))
def ref_model_adapters_fit(ctx: Context) -> list[tuple[str, str]]:
    """Each adapter folded into the reference must fit ref_model, as adapter_name_or_path must fit the model
    (model.adapter_shape_problems): else eval stops after scoring the base, naming the adapter's file only."""
    from pipeline.names import split_names
    from pipeline.recipe.rules.model import adapter_shape_problems

    ref = ctx.values["ref_model"]
    if not scores_against_reference(ctx) or ref is None:
        return []
    return [problem for path in split_names(ctx.values["ref_model_adapters"])
            for problem in adapter_shape_problems("ref_model_adapters", path, "ref_model", ref)][:1]


@rule("stage", "pref_loss", "dpo_label_smoothing")
def label_smoothing_needs_sigmoid(ctx: Context) -> list[tuple[str, str]]:
    """Only the sigmoid (DPO) loss has a label-smoothing term: set with another loss it would be ignored
    (LLaMA-Factory refuses it the same way)."""
    loss, eps = ctx.values["pref_loss"], ctx.values["dpo_label_smoothing"]
    if ctx.values["stage"] == "dpo" and loss != "sigmoid" and eps:
        return [("dpo_label_smoothing", f"is {eps} but pref_loss {loss} has no label smoothing (only sigmoid, "
                                        "conservative DPO, uses it); remove it, or set pref_loss: sigmoid")]
    return []


@rule("stage", "pref_loss", "pref_bco_weight")
def bco_needs_reference_loss(ctx: Context) -> list[tuple[str, str]]:
    """BCO classifies the rewards beta (pi - ref): LLaMA-Factory adds it only in its reference branch, so with orpo
    or simpo (no reference) the weight would be ignored without a word."""
    loss, weight = ctx.values["pref_loss"], ctx.values["pref_bco_weight"]
    if ctx.values["stage"] == "dpo" and loss in REFERENCE_FREE and weight:
        return [("pref_bco_weight", f"is {weight} but pref_loss {loss} uses no reference model, and the BCO term "
                                    "classifies the rewards against it (LLaMA-Factory ignores it there); remove it, "
                                    "or set pref_loss sigmoid, hinge or ipo")]
    return []


@rule("stage", "ref_model", "model_name_or_path", "use_asft_loss")
def ref_model_same_vocabulary(ctx: Context) -> list[tuple[str, str]]:
    """The reference scores the policy's tokens: it must read the same vocabulary."""
    ref = ctx.values["ref_model"]
    asft = ctx.values["stage"] == "sft" and ctx.values["use_asft_loss"]
    if (ctx.values["stage"] not in PREFERENCE_STAGES and not asft) or ref is None:
        return []
    from pipeline.errors import UserError
    from pipeline.model.hub import is_hub_id, resolve_model_path
    from pipeline.recipe.modelinfo import looks_like_path, model_info

    loads_now = ctx.command in ("train", "eval")
    if is_hub_id(ref):  # as model_name_or_path: a snapshot in the HF cache, fetched by the commands that load it
        if loads_now:
            try:
                resolve_model_path(ref, key="ref_model")
            except UserError as err:
                return [("ref_model", m.removeprefix("ref_model: ")) for m in err.messages]
    elif looks_like_path(ref) and not os.path.exists(ref):
        if loads_now:
            return [("ref_model", f"directory {ref!r} not found; expected a model directory, a hub id (org/name) "
                                  "or preset name")]
        return []
    ref_info, info = model_info(ref), model_info(ctx.values["model_name_or_path"])
    if ref_info is None:
        if is_hub_id(ref) and not loads_now:
            return []  # not cached yet: validate and plan never download; train and eval fetch it (above)
        from pipeline.model.config import read_config

        try:
            read_config(ref)
        except UserError as err:
            return [("ref_model", m.removeprefix("model_name_or_path: ")) for m in err.messages]
        return []
    if info is not None and ref_info.vocab_size != info.vocab_size:
        return [("ref_model", f"has a vocabulary of {ref_info.vocab_size:,} tokens but the policy "
                              f"({ctx.values['model_name_or_path']}) has {info.vocab_size:,}; the reference must "
                              "score the same tokens: use a model of the same family and tokenizer")]
    return []
