"""Rules on the client optimizers that replace AdamW: Muon, GaLore, APOLLO, Adam-mini and BAdam (use_muon,
use_galore, use_apollo, use_adam_mini, use_badam and their keys: galore_*, apollo_*, badam_*), with what they read
besides: the ZeRO stage they need (zero_stage, deepspeed), the fine-tuning method they train (finetuning_type), one
optimizer at a time (loraplus_lr_ratio too), layer-wise stepping (gradient_accumulation_steps, world_size) and the
model's layers (model_name_or_path).
"""
from __future__ import annotations

from typing import Any, Mapping

from pipeline.recipe.check import show
from pipeline.recipe.rules.core import Context, rule
from pipeline.model.optimizer_state import NAMES, OPTIM_ARGS_READ, OTHER_OPTIMS, optim_kwargs


def whole_matrices_only(ctx: Context, key: str, why: str, given: str = "true") -> list[tuple[str, str]]:
    """The ZeRO-0 client optimizers (Muon, GaLore, APOLLO, Adam-mini, BAdam, optim adafactor: `key` given `given`)
    refused at the recipe's ZeRO 1-3 with their reason `why` ({stage}, {fix}, {plan}: the plan of this run at ZeRO 0,
    whose memory the fix changes); a deepspeed JSON's stage is train's preflight (the file's line there:
    zero_zero_settings)."""
    v = ctx.values
    if v["deepspeed"] is None and v["zero_stage"] != 0:
        return [("zero_stage", f"given {v['zero_stage']} with {key}: {given}: "
                               + why.format(stage=v["zero_stage"], fix="set zero_stage: 0",
                                            plan=ctx.run_this("plan", zero_stage="0")))]
    return []


MUON_ZERO = ("Muon needs zero_stage 0: it orthogonalizes each weight matrix's whole update, but ZeRO {stage} hands "
             "the optimizer flat slices of the parameters that cut the matrices apart (DeepSpeed's own Muon, which "
             "works on those slices, computes another update than LLaMA-Factory's: docs/training.md); {fix} (data "
             "parallel; the memory plan: {plan}), or remove use_muon")


@rule("use_muon", "zero_stage", "deepspeed", "loraplus_lr_ratio")
def muon_fits(ctx: Context) -> list[tuple[str, str]]:
    """Muon (pipeline.train.muon) steps whole matrices: ZeRO 0 only (a deepspeed JSON's stage: train's preflight).
    With loraplus_lr_ratio, LLaMA-Factory builds LoRA+'s AdamW and silently drops use_muon; asking for both is a
    mistake either way, so it is said rather than copied."""
    if not ctx.values["use_muon"]:
        return []
    problems = []
    problems += whole_matrices_only(ctx, "use_muon", MUON_ZERO)
    if ctx.values["loraplus_lr_ratio"] is not None:
        problems.append(("loraplus_lr_ratio", f"given {show(ctx.values['loraplus_lr_ratio'])} with use_muon: true: "
                                              "LoRA+ and Muon are two optimizers (LLaMA-Factory silently trains with "
                                              "LoRA+'s AdamW and ignores use_muon); keep one of the two keys"))
    return problems


_LOW_RANK_ZERO = ("{name} needs zero_stage 0: {why}, but ZeRO {{stage}} hands the optimizer flat slices of the "
                  "parameters that cut the matrices apart (LLaMA-Factory refuses GaLore and APOLLO under any "
                  "DeepSpeed); {{fix}} (data parallel; the memory plan: {{plan}}), or remove use_{key}")
GALORE_ZERO = _LOW_RANK_ZERO.format(name="GaLore", key="galore",
                                    why="each GaLore matrix's update starts from an SVD of its whole gradient")
APOLLO_ZERO = _LOW_RANK_ZERO.format(name="APOLLO", key="apollo",
                                    why="each APOLLO matrix's update projects its whole gradient and rescales it "
                                        "by rows or columns")


def _low_rank_problems(ctx: Context, key: str, name: str, zero: str) -> list[tuple[str, str]]:
    """What GaLore (key galore) and APOLLO (apollo) share: whole matrices (ZeRO 0; a deepspeed JSON's stage: train's
    preflight), LLaMA-Factory's refusals (LoRA; layer-wise with gradient accumulation or several ranks), and one
    optimizer at a time (use_muon)."""
    v = ctx.values
    if not v[f"use_{key}"]:
        return []
    problems = []
    problems += whole_matrices_only(ctx, f"use_{key}", zero)
    if v["finetuning_type"] == "lora":
        problems.append((f"use_{key}", f"given true with finetuning_type: lora: {name} projects the gradients of "
                                       "whole weight matrices, which LoRA freezes (LLaMA-Factory refuses the two "
                                       f"together); set finetuning_type: full (or freeze), or remove use_{key}"))
    elif v["finetuning_type"] == "oft":  # LF lets it through, and its GaLore finds no trainable nn.Linear weight
        problems.append((f"use_{key}", f"given true with finetuning_type: oft: {name} projects the gradients of "
                                       "whole weight matrices, which OFT freezes (LLaMA-Factory's optimizer then "
                                       "finds none to project and trains OFT's rotations with plain AdamW); set "
                                       f"finetuning_type: full (or freeze), or remove use_{key}"))
    if v["use_muon"]:
        problems.append(("use_muon", f"given true with use_{key}: true: Muon and {name} are two optimizers; keep one "
                                     "of the two keys"))
    layerwise = f"{key}_layerwise"
    if v[layerwise] and v["gradient_accumulation_steps"] != 1:
        problems.append((layerwise, f"given true with gradient_accumulation_steps {v['gradient_accumulation_steps']}: "
                                    f"layer-wise {name} steps each weight as soon as its gradient is ready, with "
                                    "nothing to accumulate (LLaMA-Factory refuses it); set "
                                    f"gradient_accumulation_steps: 1, or {layerwise}: false"))
    if v[layerwise] and v["world_size"] > 1:
        problems.append((layerwise, f"given true on {v['world_size']} ranks: LLaMA-Factory refuses layer-wise {name} "
                                    f"in distributed training; set {layerwise}: false (the same update, gradients "
                                    "averaged over the ranks and clipped to max_grad_norm)"))
    return problems


@rule("use_galore", "zero_stage", "deepspeed", "finetuning_type", "use_muon", "galore_layerwise",
      "gradient_accumulation_steps", "world_size")
def galore_fits(ctx: Context) -> list[tuple[str, str]]:
    """GaLore (pipeline.train.galore): _low_rank_problems."""
    return _low_rank_problems(ctx, "galore", "GaLore", GALORE_ZERO)


@rule("use_apollo", "zero_stage", "deepspeed", "finetuning_type", "use_muon", "apollo_layerwise",
      "gradient_accumulation_steps", "world_size", "use_galore", "apollo_scale_type", "apollo_proj_type")
def apollo_fits(ctx: Context) -> list[tuple[str, str]]:
    """APOLLO (pipeline.train.apollo): _low_rank_problems; not with GaLore (LLaMA-Factory refuses the two); and its
    channel-wise scaling only with the std projection: apollo_torch takes the channels from the matrix's shape and
    the norms from the projected side, which for left / right disagree on matrices of one orientation or the other
    (LLaMA-Factory fails there mid-run, on a shape mismatch)."""
    v = ctx.values
    problems = _low_rank_problems(ctx, "apollo", "APOLLO", APOLLO_ZERO)
    if v["use_apollo"] and v["use_galore"]:
        problems.append(("use_galore", "given true with use_apollo: true: GaLore and APOLLO are two optimizers "
                                       "(LLaMA-Factory refuses the two together); keep one of the two keys"))
    if v["use_apollo"] and v["apollo_scale_type"] == "channel" and v["apollo_proj_type"] != "std":
        problems.append(("apollo_proj_type", f"given {v['apollo_proj_type']!r} with apollo_scale_type: channel: "
                                             "apollo_torch scales rows of a tall matrix and columns of a wide one "
                                             "by the norms over the side it projected, which a fixed "
                                             f"{v['apollo_proj_type']} projection makes the other side for one "
                                             "orientation (LLaMA-Factory stops there on a shape mismatch); use "
                                             "apollo_proj_type: std, or apollo_scale_type: tensor"))
    return problems


def _freeze_setting(v: Mapping[str, Any]) -> str:
    """The freeze keys that decide what trains, as the recipe gives them (for a message)."""
    keys = ["freeze_trainable_layers"] + [key for key, off in (("freeze_trainable_modules", "all"),
                                                               ("freeze_extra_modules", None), ("use_llama_pro", False))
                                          if v[key] != off]
    return ", ".join(f"{key}: {show(v[key])}" for key in keys)


def _no_low_rank_weight(v: Mapping[str, Any], key: str, cfg: Any, trained: set[str]) -> str:
    """Why `{key}_target` selects no trained Linear weight: it names none of the model's Linear modules, or those it
    names do not train under the recipe's freeze setting."""
    from pipeline.model.families import FAMILIES
    from pipeline.model.optimizer_state import linear_weights, low_rank_weights

    name, target, linears = NAMES[key], v[f"{key}_target"], linear_weights(cfg)
    leaves = list(dict.fromkeys(module.rsplit(".", 1)[-1] for module in linears))
    conv1d = (f"; the attention and MLP projections of {cfg.family} are Conv1D in transformers, which "
              f"LLaMA-Factory's {name} skips" if FAMILIES[cfg.family].conv1d else "")
    idle = f"{name} would project nothing (LLaMA-Factory then trains its AdamW alone, without a word)"
    if not low_rank_weights(cfg, target, linears.values()):
        return (f"given {show(target)}, which selects no nn.Linear module of this {cfg.family} model (its Linear "
                f"modules: {', '.join(leaves)}; `all` is every one but lm_head{conv1d}): {idle}; name some of "
                f"them, or remove use_{key}")
    training = list(dict.fromkeys(module.rsplit(".", 1)[-1] for module, weight in linears.items()
                                  if weight in trained))
    return (f"given {show(target)}, but none of the nn.Linear modules it selects trains under finetuning_type: "
            f"freeze with {_freeze_setting(v)} (" + (f"the Linear modules that train: {', '.join(training)}"
                                                     if training else "no Linear module trains")
            + f"): {idle}; name a module that trains, train the ones it names (freeze_trainable_layers, "
              f"freeze_trainable_modules), or remove use_{key}")


@rule("use_galore", "galore_target", "use_apollo", "apollo_target", "model_name_or_path", "finetuning_type",
      "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules", "use_llama_pro", "stage")
def low_rank_target_trains(ctx: Context) -> list[tuple[str, str]]:
    """galore_target / apollo_target select a trained weight of an nn.Linear module (pipeline.train.galore's
    low_rank_groups on the loaded model): said at the key, with the model's Linear modules and the freeze setting
    that leaves them frozen, when the model is on disk; the names come from its config as the freeze module rules'
    do. (lora and oft are refused by galore_fits / apollo_fits; a freeze setting the model does not have, by the
    freeze rules.)"""
    v = ctx.values
    if v["finetuning_type"] not in ("full", "freeze") or not (v["use_galore"] or v["use_apollo"]):
        return []
    from pipeline.recipe.modelinfo import model_info, recipe_tensors
    from pipeline.model.optimizer_state import low_rank_weights

    info = model_info(v["model_name_or_path"])
    found = recipe_tensors(v, info) if info is not None else None
    if found is None:
        return []
    cfg, tensors = found
    trained = {t.name for t in tensors}
    return [(f"{key}_target", _no_low_rank_weight(v, key, cfg, trained)) for key in NAMES
            if v[f"use_{key}"] and not low_rank_weights(cfg, v[f"{key}_target"], trained)]


ADAM_MINI_ZERO = ("Adam-mini needs zero_stage 0: it keeps one second moment per row or attention head of each "
                  "weight matrix, but ZeRO {stage} hands the optimizer flat slices of the parameters that cut rows "
                  "and heads apart; {fix} (data parallel; the memory plan: {plan}), or remove use_adam_mini")
_OTHER_OPTIMIZERS = (("use_muon", "Muon"), ("use_galore", "GaLore"), ("use_apollo", "APOLLO"))


@rule("use_adam_mini", "zero_stage", "deepspeed", "finetuning_type", "use_muon", "use_galore", "use_apollo",
      "loraplus_lr_ratio")
def adam_mini_fits(ctx: Context) -> list[tuple[str, str]]:
    """Adam-mini (pipeline.train.adam_mini) steps whole matrices by row and head: ZeRO 0 only (a deepspeed JSON's
    stage: train's preflight), and full or freeze fine-tuning: its blocks are read from the module names, and
    LoRA's or OFT's small matrices under q_proj, v_proj, ... are no rows or heads of those weights (LLaMA-Factory
    passes them in, and adam_mini cuts q/k's into blocks of hidden_size^2 / num_attention_heads elements: a view
    that fails for most shapes). One optimizer at a time: LLaMA-Factory silently prefers GaLore, APOLLO and
    LoRA+ to it, and it to Muon."""
    v = ctx.values
    if not v["use_adam_mini"]:
        return []
    problems = []
    problems += whole_matrices_only(ctx, "use_adam_mini", ADAM_MINI_ZERO)
    if v["finetuning_type"] in ("lora", "oft"):
        method = "LoRA" if v["finetuning_type"] == "lora" else "OFT"
        problems.append(("use_adam_mini", f"given true with finetuning_type: {v['finetuning_type']}: Adam-mini's "
                                          "blocks are rows and attention heads of whole weight matrices, which "
                                          f"{method} freezes (LLaMA-Factory hands it {method}'s small matrices, "
                                          "where its per-head view fails for most shapes); set finetuning_type: "
                                          "full (or freeze), or remove use_adam_mini"))
    for key, name in _OTHER_OPTIMIZERS:
        if v[key]:
            problems.append((key, f"given true with use_adam_mini: true: {name} and Adam-mini are two optimizers; "
                                  "keep one of the two keys"))
    if v["loraplus_lr_ratio"] is not None:
        problems.append(("loraplus_lr_ratio", f"given {show(v['loraplus_lr_ratio'])} with use_adam_mini: true: "
                                              "LoRA+ and Adam-mini are two optimizers (LLaMA-Factory silently "
                                              "trains with LoRA+'s AdamW); keep one of the two keys"))
    return problems


BADAM_ZERO = ("BAdam needs zero_stage 0: it switches which decoder layer has gradients between optimizer steps, "
              "which ZeRO {stage}'s flat partitions, built once over the trainable weights, do not follow "
              "(LLaMA-Factory's BAdam re-partitions DeepSpeed's ZeRO-3 internals at each switch; that is not done "
              "here); {fix} (data parallel), or remove use_badam")


@rule("use_badam", "zero_stage", "deepspeed", "finetuning_type", "use_muon", "use_galore", "use_apollo",
      "use_adam_mini", "badam_mode", "badam_switch_mode", "badam_start_block", "badam_switch_interval",
      "world_size", "weight_decay")
def badam_fits(ctx: Context) -> list[tuple[str, str]]:
    """BAdam (pipeline.train.badam) at ZeRO 0 (a deepspeed JSON's stage: train's preflight) on a full fine-tune,
    one optimizer at a time; layer mode: fixed needs its block, an interval of at least 1; ratio mode: _ratio."""
    v = ctx.values
    if not v["use_badam"]:
        return []
    problems = []
    problems += whole_matrices_only(ctx, "use_badam", BADAM_ZERO)
    if v["finetuning_type"] != "full":
        problems.append(("use_badam", f"given true with finetuning_type: {v['finetuning_type']}: BAdam trains whole "
                                      "decoder layers in turn, overriding which weights the method trains "
                                      "(LLaMA-Factory refuses it with lora); set finetuning_type: full, or remove "
                                      "use_badam"))
    for other, name, theirs in (("use_muon", "Muon", "silently builds BAdam's"),
                                ("use_galore", "GaLore", "refuses the two together"),
                                ("use_apollo", "APOLLO", "refuses the two together"),
                                ("use_adam_mini", "Adam-mini", "silently builds BAdam's")):
        if v[other]:
            problems.append((other, f"given true with use_badam: true: {name} and BAdam are two optimizers "
                                    f"(LLaMA-Factory {theirs}); keep one of the two keys"))
    if v["badam_mode"] == "ratio":
        return problems + _ratio(v)
    interval = v["badam_switch_interval"]
    if interval < 1:
        problems.append(("badam_switch_interval", f"given {interval}, expected an integer >= 1 (steps per layer): "
                                                  "LLaMA-Factory documents -1 as 'never switch', but badam then "
                                                  f"switches after every step ((n + 1) % {interval} is 0 for every "
                                                  "n); to train one layer throughout set badam_switch_mode: fixed "
                                                  "with badam_start_block"))
    if v["badam_switch_mode"] == "fixed" and v["badam_start_block"] is None:
        problems.append(("badam_switch_mode", "given 'fixed' without badam_start_block: fixed trains one decoder "
                                              "layer, which badam_start_block names (badam stops there without "
                                              "it); set badam_start_block: <layer index>"))
    return problems


def _ratio(v: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Ratio mode (pipeline.train.badam.RatioAdam) on one rank, as LLaMA-Factory allows it, and without weight
    decay, which badam's sparse Adam never applies (LLaMA-Factory passes it and it is silently dropped)."""
    problems = []
    if v["world_size"] > 1:
        problems.append(("badam_mode", f"given 'ratio' on {v['world_size']} ranks: LLaMA-Factory refuses ratio-wise "
                                       "BAdam in distributed training (badam's masked gradients are not reduced "
                                       "across ranks); train on one rank, or set badam_mode: layer"))
    if v["weight_decay"]:
        problems.append(("weight_decay", f"given {show(v['weight_decay'])} with badam_mode: ratio: badam's sparse "
                                         "Adam applies no weight decay (LLaMA-Factory drops it silently); set "
                                         "weight_decay: 0, or badam_mode: layer"))
    return problems


@rule("use_badam", "badam_start_block", "model_name_or_path", "badam_mode")
def badam_start_block_in_model(ctx: Context) -> list[tuple[str, str]]:
    """badam_start_block names a decoder layer of the model (badam fails past the last one): said at the key when
    the model is on disk, else when train builds the optimizer (pipeline.train.badam)."""
    v = ctx.values
    if not v["use_badam"] or v["badam_start_block"] is None or v["badam_mode"] == "ratio":
        return []
    from pipeline.recipe.modelinfo import model_info

    info = model_info(v["model_name_or_path"])
    if info is None or v["badam_start_block"] < info.n_layer:
        return []
    return [("badam_start_block", f"given {v['badam_start_block']}, but {v['model_name_or_path']} has {info.n_layer} "
                                  f"decoder layers (blocks 0 to {info.n_layer - 1}); name one of them")]


ADAFACTOR_ZERO = ("Adafactor needs zero_stage 0: it keeps each weight matrix's second moment as the means over its rows "
                  "and its columns, but ZeRO {stage} hands the optimizer flat slices of the parameters that cut the "
                  "matrices apart (transformers' Adafactor would then keep a second moment per element: another "
                  "optimizer); {fix} (data parallel; the memory plan: {plan}), or set optim: adamw_torch")
# optim sgd / adagrad / rmsprop / adafactor beside an optimizer key: what LLaMA-Factory 0.9.5 does with the two
# (train/trainer_utils.py create_custom_optimizer: its own optimizer first; GaLore picks its class by optim, APOLLO
# knows adamw_torch alone, BAdam's layer mode wraps optim's class, its ratio mode and Adam-mini and Muon ignore optim)
_OPTIM_WITH = (("use_muon", "Muon", "builds Muon's and silently ignores optim"),
               ("use_galore", "GaLore", "builds galore_torch's GaLoreAdafactor for adafactor, not implemented here, "
                                        "and stops with NotImplementedError for the others"),
               ("use_apollo", "APOLLO", "stops with NotImplementedError: its APOLLO takes adamw_torch alone"),
               ("use_adam_mini", "Adam-mini", "builds Adam-mini's and silently ignores optim"),
               ("use_badam", "BAdam", "wraps optim's class in badam's BlockOptimizer in layer mode and ignores it in "
                                      "ratio mode; BAdam here steps its layers by AdamW"))


def zero_zero_settings(v: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(key, its value, why) for each setting of the recipe that needs ZeRO 0 (whole matrices): train's preflight
    says it where a deepspeed JSON sets the stage."""
    settings = [(key, "true", why) for key, why in (("use_muon", MUON_ZERO), ("use_galore", GALORE_ZERO),
                                                   ("use_apollo", APOLLO_ZERO), ("use_adam_mini", ADAM_MINI_ZERO),
                                                   ("use_badam", BADAM_ZERO)) if v[key]]
    return settings + ([("optim", "adafactor", ADAFACTOR_ZERO)] if v["optim"] == "adafactor" else [])


@rule("optim", "zero_stage", "deepspeed", "use_muon", "use_galore", "use_apollo", "use_adam_mini", "use_badam")
def optim_fits(ctx: Context) -> list[tuple[str, str]]:
    """optim sgd, adagrad, rmsprop (elementwise: any ZeRO stage) and adafactor (ZeRO 0: it factors whole matrices;
    a deepspeed JSON's stage: train's preflight) are built as transformers' Trainer builds them, with its weight decay
    groups (and LoRA+'s, as LLaMA-Factory's LoRA+ takes optim's class). Beside another optimizer's key the recipe asks
    for two optimizers, which LLaMA-Factory resolves by dropping one without a word or by stopping: said instead."""
    v = ctx.values
    if v["optim"] not in OTHER_OPTIMS:
        return []
    name, problems = OTHER_OPTIMS[v["optim"]], []
    if v["optim"] == "adafactor":
        problems += whole_matrices_only(ctx, "optim", ADAFACTOR_ZERO, given="adafactor")
    for key, other, theirs in _OPTIM_WITH:
        if v[key]:
            problems.append((key, f"given true with optim: {v['optim']}: {other} and {name} are two optimizers "
                                  f"(LLaMA-Factory {theirs}); keep one: remove {key}, or set optim: adamw_torch"))
    return problems


OPTIM_ARGS_EXPECTED = ("expected comma-separated key=value pairs as transformers' Trainer reads them, such as "
                       "'momentum=0.9,nesterov=True' for optim: sgd")


@rule("optim_args", "optim")
def optim_args_parse(ctx: Context) -> list[tuple[str, str]]:
    """optim_args as transformers' Trainer parses it (optimizer_state.parse_optim_args / optim_kwargs): a pair that
    is not key=value, or a number its float() refuses, stops transformers with a ValueError; said at the key instead.
    A negative number torch's constructor refuses (every key it reads but SGD's dampening), and SGD's nesterov
    without momentum or with dampening (torch: "Nesterov momentum requires a momentum and zero dampening"), too."""
    v = ctx.values
    try:
        kwargs = optim_kwargs(v["optim"], v["optim_args"])
    except ValueError as e:
        return [("optim_args", f"given {show(v['optim_args'])}: {e}; {OPTIM_ARGS_EXPECTED}")]
    problems = [("optim_args", f"given {show(v['optim_args'])}: {key} is {value:g}, torch's "
                               f"{OTHER_OPTIMS[v['optim']]} takes {key} >= 0")
                for key, value in kwargs.items() if OPTIM_ARGS_READ[v["optim"]][key] is float and key != "dampening"
                and not value >= 0]
    if kwargs.get("nesterov") and (not kwargs.get("momentum") or kwargs.get("dampening")):
        problems.append(("optim_args", f"given {show(v['optim_args'])}: torch's SGD takes nesterov only with a "
                                       "momentum above 0 and dampening 0 (its default); add momentum=0.9, or "
                                       "remove nesterov"))
    return problems
