"""Rules on the fine-tuning method: LoRA's keys and targets (finetuning_type, lora_*, use_rslora, use_dora,
additional_target, loraplus_lr_ratio), PiSSA (pissa_init), LLaMA Pro (use_llama_pro), and freeze's layers and
modules (freeze_trainable_layers, freeze_trainable_modules, freeze_extra_modules), OFT (finetuning_type: oft,
oft_rank, oft_block_size, oft_target, module_dropout).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from pipeline.names import split_names, trains_adapter, uses_reference
from pipeline.recipe.check import show
from pipeline.recipe.rules.core import Context, rule


LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "use_dora",
             "additional_target", "loraplus_lr_ratio")
ADAPTER_KEYS = ("lora_target", "additional_target")  # which modules an adapter takes: OFT reads them too (as LF does)
OFT_KEYS = ("oft_rank", "oft_block_size", "oft_target", "module_dropout")


@rule("finetuning_type", *LORA_KEYS)
def lora_keys_need_lora(ctx: Context) -> list[tuple[str, str]]:
    kind = ctx.values["finetuning_type"]
    if kind == "lora":
        return []
    shared = ADAPTER_KEYS if kind == "oft" else ()
    return [(key, f"is a LoRA setting but finetuning_type is {kind}; remove it or set finetuning_type: lora")
            for key in LORA_KEYS if ctx.set_here(key) and key not in shared]


@rule("finetuning_type", *OFT_KEYS)
def oft_keys_need_oft(ctx: Context) -> list[tuple[str, str]]:
    kind = ctx.values["finetuning_type"]
    if kind == "oft":
        return []
    return [(key, f"is an OFT setting but finetuning_type is {kind}; remove it or set finetuning_type: oft")
            for key in OFT_KEYS if ctx.set_here(key)]


@rule("finetuning_type", "oft_rank", "oft_block_size")
def oft_rank_or_block_size(ctx: Context) -> list[tuple[str, str]]:
    """PEFT's OFTConfig takes the number of blocks (r) or their size, the other 0; LLaMA-Factory passes both keys,
    so oft_rank alone (with the default oft_block_size 32) is PEFT's ValueError there."""
    v = ctx.values
    if v["finetuning_type"] != "oft" or (v["oft_rank"] == 0) != (v["oft_block_size"] == 0):
        return []
    if v["oft_rank"] == 0:
        return [("oft_block_size", "is 0 and so is oft_rank; give one of them (the number of blocks, oft_rank, or "
                                   "their size, oft_block_size: 32 is LLaMA-Factory's default)")]
    return [("oft_rank", f"given {v['oft_rank']} with oft_block_size {v['oft_block_size']}; OFT takes one of them, "
                         "the other 0 (PEFT refuses both: LLaMA-Factory passes the default oft_block_size 32 along): "
                         "add oft_block_size: 0 to give the number of blocks, or remove oft_rank")]


@rule("finetuning_type", "oft_target", "lora_target")
def oft_target_is_lora_target(ctx: Context) -> list[tuple[str, str]]:
    """LLaMA-Factory (0.9.5 and main) parses oft_target but gives PEFT lora_target's modules: a recipe whose
    oft_target names others would train other modules than it says, there and here alike."""
    from pipeline.names import split_names

    v = ctx.values
    given, used = split_names(v["oft_target"]), split_names(v["lora_target"])
    if v["finetuning_type"] != "oft" or not ctx.set_here("oft_target") or given == used:
        return []
    return [("oft_target", f"given {', '.join(given)}, but OFT takes lora_target's modules ({', '.join(used)}): "
                           "LLaMA-Factory reads oft_target and never uses it; set "
                           "lora_target to the modules OFT should rotate (and oft_target the same, or remove it)")]


@rule("finetuning_type", "model_name_or_path")
def oft_needs_linear_layers(ctx: Context) -> list[tuple[str, str]]:
    """GPT-2's projections are Conv1D in transformers, which PEFT's OFT cannot wrap (config.OFT_NO_CONV1D): refused,
    as PEFT refuses it."""
    if ctx.values["finetuning_type"] != "oft":
        return []
    from pipeline.recipe.modelinfo import model_info

    from pipeline.model.families import FAMILIES

    info = model_info(ctx.values["model_name_or_path"])
    if info is None or not FAMILIES[info.config.family].conv1d:
        return []
    from pipeline.model.config import OFT_NO_CONV1D

    return [("finetuning_type", f"is oft but the model is GPT-2, whose projections are Conv1D in transformers: "
                                f"{OFT_NO_CONV1D}; use lora, or a Llama / Qwen model")]



@rule("moe_aux_loss_coef", "stage", "model_name_or_path")
def moe_aux_loss_stages(ctx: Context) -> list[tuple[str, str]]:
    """The router's aux loss is added to stage pt / sft's loss (pipeline.train.loop); in dpo / kto / ppo, where
    LLaMA-Factory's trainers (TRL's) add it to their own losses, it is not implemented: refused on a MoE model
    rather than trained without it. Stage rm takes it without effect (notices.moe_aux_loss_notice): no router term
    reaches a reward model's loss in LLaMA-Factory or transformers; nor does any stage's on a family LLaMA-Factory
    sets no output_router_logits for or whose model computes none (MoeKeys.router_loss: gpt-oss; GLM-4.5 and
    DeepSeek-V3, balanced by the router's correction bias), which trains every stage without it."""
    v = ctx.values
    if not v["moe_aux_loss_coef"] or v["stage"] in ("pt", "sft", "rm"):
        return []
    from pipeline.recipe.modelinfo import model_info

    info = model_info(v["model_name_or_path"])
    if info is None or not info.config.n_experts or not info.config.hf.moe.router_loss:
        return []
    return [("moe_aux_loss_coef", f"given {v['moe_aux_loss_coef']}: the router's load-balancing loss is added in "
                                  f"stages pt and sft only, not stage {v['stage']}; remove moe_aux_loss_coef (or "
                                  "set it to null) to train this stage without it")]


@rule("model_name_or_path", "finetuning_type", "lora_target", "additional_target", "context_length", "use_llama_pro",
      "freeze_trainable_layers")
def lora_targets_exist(ctx: Context) -> list[tuple[str, str]]:
    if not trains_adapter(ctx.values["finetuning_type"]):
        return []
    from pipeline.recipe.modelinfo import model_info

    info = model_info(ctx.values["model_name_or_path"])
    if info is None:
        return []
    from pipeline.errors import UserError
    from pipeline.model.config import additional_target_modules, lora_target_modules, trainable_tensors

    problems = []
    for key, check in (("lora_target", lora_target_modules), ("additional_target", additional_target_modules)):
        try:
            check(info.config, ctx.values[key])
        except UserError as err:
            problems += [(key, m.removeprefix(f"{key}: ")) for m in err.messages]
    if not problems:  # how PEFT builds lora_target beside additional_target (config.adapted): can it?
        try:
            v = ctx.values
            trainable_tensors(info.config, v["finetuning_type"], lora_target=v["lora_target"],
                              freeze_trainable_layers=v["freeze_trainable_layers"],
                              additional_target=v["additional_target"], use_llama_pro=bool(v["use_llama_pro"]))
        except UserError as err:
            for message in err.messages:
                key = next((k for k in ADAPTER_KEYS if message.startswith(f"{k}: ")), "lora_target")
                problems.append((key, message.removeprefix(f"{key}: ")))
    return problems


@rule("model_name_or_path", "finetuning_type", "lora_target", "lora_dropout", "use_dora", "pissa_init")
def expert_lora_settings(ctx: Context) -> list[tuple[str, str]]:
    """LoRA on a MoE model's experts and routers (pipeline.model.expert_lora) is PEFT's ParamWrapper on the fused expert
    tensors and the router's weight, which raises for lora_dropout other than 0 and for DoRA
    (peft/tuners/lora/layer.py:2366-2373), reads no PiSSA start (its pissa_init reads the base layer's `weight`, which
    the experts module has not) and is LoRA only (PEFT converts expert names for LoRA alone). quantization_bit is not
    said here: rules.quantization refuses it on every sparse MoE model (one message per key)."""
    v = ctx.values
    if not trains_adapter(v["finetuning_type"]):
        return []
    from pipeline.recipe.modelinfo import model_info

    info = model_info(v["model_name_or_path"])
    if info is None or not info.config.n_experts:
        return []
    from pipeline.errors import UserError
    from pipeline.model.config import (all_linear_names, expert_names, layout, lora_candidates, lora_target_modules,
                                       router_name)
    from pipeline.model.expert_lora import expert_of, router_of

    try:
        experts = [m.name for m in lora_target_modules(info.config, v["lora_target"])
                   if expert_of(m.name) or router_of(m.name)]
    except UserError:  # lora_targets_exist says it
        return []
    if not experts:
        return []
    fam = info.config.hf
    named = split_names(v["lora_target"])
    experts_named = [n for n in named if n in expert_names(fam)]
    routers_named = [n for n in named if n == router_name(fam)]
    # what lora_target names and what PEFT wraps for it: the experts' fused tensors, the router's weight, or both
    said = []
    if experts_named:
        said.append((f"the MoE experts ({', '.join(experts_named)})", "transformers 5's fused expert tensors"))
    if routers_named:
        said.append((f"the MoE router ({', '.join(routers_named)})", "the router's weight"))
    said = said or [("MoE experts or routers", "transformers 5's fused expert tensors or the router's weight")]
    why = (f"lora_target names {' and '.join(n for n, _ in said)}, which PEFT 0.21 adapts as its ParamWrapper on"
           f" {' and '.join(w for _, w in said)}")
    out = f"take {', '.join(experts_named + routers_named) or 'the expert and router names'} out of lora_target"
    oft = why + " for LoRA only: set finetuning_type: lora, or " + out
    if "all" in split_names(v["lora_target"]):  # the expert names come from LLaMA-Factory's expansion
        found = all_linear_names(fam, lora_candidates(m.name for m in layout(info.config) if m.kind == "linear"))
        mlp = [n for n in found if n in expert_names(fam)]
        why = (f"lora_target: all is {', '.join(found)} on this model (LLaMA-Factory's find_all_linear_modules: the"
               f" dense block's or shared experts' Linears bring {', '.join(mlp)}), which PEFT 0.21 moves onto the MoE"
               " experts, adapted as its ParamWrapper on transformers 5's fused expert tensors")
        out = f"name the others instead of all (lora_target: {','.join(n for n in found if n not in mlp)})"
        oft = (f"lora_target: all is {', '.join(found)} on this model (LLaMA-Factory's find_all_linear_modules), and"
               f" PEFT's OFT (no MoE conversion: LoRA only) adapts the dense block's and shared experts' Linears of"
               f" the names {', '.join(mlp)}, which take no adapter here: {out}, or set finetuning_type: lora")
    wrong = [("finetuning_type", v["finetuning_type"] == "oft", f"given oft; {oft}"),
             ("lora_dropout", bool(v["lora_dropout"]), f"given {v['lora_dropout']}; {why}, which refuses dropout"
              " (it cannot apply it to the input of one expert's weights): set lora_dropout: 0"),
             ("use_dora", bool(v["use_dora"]), f"given true; {why}, which refuses DoRA: remove use_dora, or {out}"),
             ("pissa_init", bool(v["pissa_init"]), f"given true; {why}, which has no PiSSA start (its pissa_init"
              f" reads a weight the experts module has not): remove pissa_init, or {out}")]
    return [(key, message) for key, bad, message in wrong if bad]


@rule("finetuning_type", "pissa_init", "use_dora", "adapter_name_or_path", "stage", "pref_loss", "ref_model",
      "use_asft_loss")
def pissa_starts_a_lora(ctx: Context) -> list[tuple[str, str]]:
    """PiSSA starts a new LoRA from the base's singular vectors and trains on the residual base: it needs a LoRA to
    start (LLaMA-Factory and PEFT refuse the rest), and a dpo / kto / ASFT reference that is not the adapters-off
    (residual) model."""
    v = ctx.values
    if not v["pissa_init"]:
        return []
    if v["finetuning_type"] != "lora":
        why = f"finetuning_type is {v['finetuning_type']}; PiSSA initialises LoRA matrices: set finetuning_type: lora"
    elif v["use_dora"]:
        why = "use_dora is true; PEFT does not combine PiSSA with DoRA: choose one (remove pissa_init or use_dora)"
    elif v["adapter_name_or_path"]:
        why = (f"adapter_name_or_path is set ({v['adapter_name_or_path']}); an adapter you continue starts from its own"
               " values, so there is nothing for PiSSA to initialise: remove pissa_init or adapter_name_or_path")
    elif v["stage"] == "sft" and v["use_asft_loss"] and v["ref_model"] is None:
        why = ("use_asft_loss's KL term scores against the model with its adapter off, which under PiSSA is the "
               "residual base, not the model you started from (LLaMA-Factory has no reference under LoRA: its ASFT "
               "step fails there): set ref_model to the base checkpoint, or remove pissa_init or use_asft_loss")
    elif v["ref_model"] is None and uses_reference(v["stage"], v["pref_loss"]):
        loss = f"stage dpo's pref_loss {v['pref_loss']}" if v["stage"] == "dpo" else "stage kto's loss"
        why = (f"{loss} scores against the model with its adapter off, which under PiSSA is the residual base, not the"
               " model you started from (LLaMA-Factory refuses PiSSA with a reference model too): set ref_model to the "
               "base checkpoint" + (", use pref_loss orpo or simpo," if v["stage"] == "dpo" else "") +
               " or remove pissa_init")
    else:
        return []
    return [("pissa_init", f"is true but {why}")]


@rule("finetuning_type", "use_llama_pro")
def llama_pro_needs_freeze_or_lora(ctx: Context) -> list[tuple[str, str]]:
    """LLaMA Pro trains only the expanded blocks (freeze: in full; lora / oft: the adapter on lora_target inside
    them, LLaMA-Factory's find_expanded_modules for either); full trains everything (LLaMA-Factory refuses it too)."""
    kind = ctx.values["finetuning_type"]
    if ctx.values["use_llama_pro"] and kind not in ("freeze", "lora", "oft"):
        return [("use_llama_pro", f"is true but finetuning_type is {kind}; LLaMA Pro trains only the blocks `python "
                                  "-m pipeline expand` inserted: set finetuning_type: freeze (or lora), or remove "
                                  "use_llama_pro")]
    return []


@rule("finetuning_type", "use_llama_pro", "lora_target", "additional_target", "model_name_or_path",
      "freeze_trainable_layers", "stage", "resize_vocab", "context_length", "oft_rank", "oft_block_size")
def llama_pro_oft_can_train(ctx: Context) -> list[tuple[str, str]]:
    """OFT turns a layer's input (W R), so a zero weight stays zero whatever R is and passes no gradient back, to
    its own rotation or to any module before it. `expand` zeroes the expanded blocks' o_proj and down_proj: an
    attention module there trains only where its block's o_proj is non-zero in the checkpoint, an MLP one where its
    down_proj is, which is never so in a checkpoint `expand` just wrote, and becomes so once the blocks were trained
    (a freeze or LoRA use_llama_pro run's merged model). A module trained in full beside OFT (additional_target,
    or what the recipe always trains: rm's score head, the embeddings resize_vocab grows) is another matter: a zero
    o_proj / down_proj trained in full gets a gradient (its input times the output's), and then moves what sits
    behind it; any module outside the expanded blocks trains. LLaMA-Factory applies OFT there all the same (a
    grad_norm of 0 for the whole run where nothing trains); refused here only when nothing the recipe trains
    (recipe_tensors, plan's list) would ever move, read from the weights."""
    v = ctx.values
    if not (v["use_llama_pro"] and v["finetuning_type"] == "oft") or not llama_pro_stalled(v):
        return []
    return [("use_llama_pro", f"is true with finetuning_type oft, but in {v['model_name_or_path']} the expanded "
                              "blocks' output projections behind lora_target's modules (o_proj for attention, "
                              "down_proj for the MLP) are zero, as `python -m pipeline expand` writes them: OFT "
                              "rotates a layer's input, a rotated zero weight stays zero and passes no gradient back, "
                              "so nothing this recipe trains would ever move (LLaMA-Factory runs it with a grad_norm "
                              "of 0); train the expanded blocks first (finetuning_type: freeze, or lora, with "
                              "use_llama_pro) and OFT their merged model, train those projections in full beside OFT "
                              "(additional_target: o_proj,down_proj, every block's, as PEFT's modules_to_save, with a "
                              "lora_target that leaves them out), or use finetuning_type: lora here")]


@rule("finetuning_type", "use_llama_pro", "lora_target", "pissa_init", "use_dora", "adapter_name_or_path",
      "model_name_or_path", "freeze_trainable_layers", "additional_target", "stage", "resize_vocab", "context_length")
def llama_pro_lora_can_train(ctx: Context) -> list[tuple[str, str]]:
    """LoRA on LLaMA Pro's blocks moves only through their output projections: `expand` zeroes o_proj and down_proj
    (GPT-2's c_proj), so the block adds nothing to the residual and every LoRA before them gets a zero gradient until
    theirs move. Without them in lora_target, under PiSSA (the singular vectors of a zero weight: A = B = 0) or
    under DoRA (its magnitude divides by the zero weight's norm: NaN) nothing would train; LLaMA-Factory and PEFT
    run such a recipe all the same (grad_norm 0, or a NaN loss), so it is refused here, saying why. Without the
    projections in lora_target the run still trains where they are trained in full (additional_target) or already
    non-zero in the checkpoint (llama_pro_stalled reads the weights)."""
    v = ctx.values
    if not (v["use_llama_pro"] and v["finetuning_type"] == "lora") or v["adapter_name_or_path"]:
        return []
    zeroed = "the expanded blocks' o_proj and down_proj (GPT-2's c_proj) are zero, as `python -m pipeline expand` " \
             "writes them"
    if (v["pissa_init"] or v["use_dora"]) and zero_projections(v) == set():
        return []  # the expanded blocks were trained (a use_llama_pro run's merged model): nothing is zero there
    if v["pissa_init"]:
        return [("pissa_init", f"is true with use_llama_pro, but {zeroed}: PiSSA starts their LoRA from the singular "
                               "vectors of a zero weight (A = B = 0), and no LoRA in those blocks would ever get a "
                               "gradient; remove pissa_init")]
    if v["use_dora"]:
        return [("use_dora", f"is true with use_llama_pro, but {zeroed}: DoRA divides by each weight's norm, so with "
                             "them the loss is NaN from the first step (PEFT's too), and without them nothing "
                             "trains; remove use_dora")]
    if llama_pro_stalled(v):
        return [("lora_target", f"given {v['lora_target']!r}, which leaves out the output projections, but {zeroed}: the blocks "
                                "add nothing to the residual until those move, so LoRA on the other modules gets no "
                                "gradient and nothing trains; add o_proj and down_proj (GPT-2: c_proj), or use all, or "
                                "train them in full (additional_target: o_proj,down_proj)")]
    return []


def llama_pro_stalled(v: Mapping[str, Any]) -> bool:
    """Whether nothing a use_llama_pro LoRA / OFT recipe trains would ever move, read from the checkpoint's weights.

    `expand` zeroes the expanded blocks' o_proj and down_proj, so a module of such a block reaches the residual
    only through a projection that is zero until it moves (pipeline.model.expand.output_projection). The
    projection moves when it is trained in full (additional_target, PEFT's modules_to_save: its gradient is its
    input times the output's) or carries a LoRA (B A x adds to a zero W x: B gets a gradient); an OFT rotation of a
    zero weight stays zero (W R) and gets none. Anything outside the expanded blocks trains, and so does everything
    once the checkpoint's projections are non-zero (a freeze or LoRA use_llama_pro run's merged model). False when
    the model or the recipe's tensors (recipe_tensors, plan's list) cannot be read here: other rules say why."""
    from pipeline.model.expand import nonzero_outputs, output_projection
    from pipeline.recipe.modelinfo import recipe_tensors

    found = expansion(v)
    tensors = recipe_tensors(v, found[0]) if found is not None else None
    if tensors is None:
        return False
    info, folder, blocks = found
    behind = set()  # the zero-at-start projections the trained modules need non-zero
    for tensor in tensors[1]:
        module = tensor.name.rsplit(".", 2 if tensor.adapter else 1)[0]  # X.oft.weight, X.lora.A; X.weight / X.bias
        projection = output_projection(module, info.config.post_norm)
        if projection is None or module.split(".")[1] not in blocks:
            return False  # outside the expanded blocks (or a part of one not known here): it trains
        if module == projection and (not tensor.adapter or v["finetuning_type"] == "lora"):
            return False  # the projection itself trained in full, or its LoRA: it moves
        behind.add(projection)
    moving = nonzero_outputs(folder, behind)
    return moving is not None and bool(behind) and not moving


def expansion(v: Mapping[str, Any]) -> tuple[Any, Path, set[str]] | None:
    """(the model's info, its folder, the expanded blocks' indices as strings) of a use_llama_pro recipe, or None
    when the model cannot be read here or freeze_trainable_layers does not fit it (their own rules say so)."""
    from pipeline.errors import UserError
    from pipeline.model.config import llama_pro_blocks
    from pipeline.recipe.modelinfo import model_folder, model_info

    info, folder = model_info(v["model_name_or_path"]), model_folder(v["model_name_or_path"])
    if info is None or folder is None:
        return None
    try:
        return info, folder, {str(i) for i in llama_pro_blocks(info.n_layer, v["freeze_trainable_layers"])}
    except UserError:
        return None


def zero_projections(v: Mapping[str, Any]) -> set[str] | None:
    """The expanded blocks' output projections (our names) that are zero in the checkpoint - all of them where
    `expand` just wrote it, none once the blocks were trained - or None when that cannot be read here."""
    from pipeline.model.expand import ZEROED, nonzero_outputs

    found = expansion(v)
    if found is None:
        return None
    _, folder, blocks = found
    projections = {f"layers.{b}.{name}" for b in blocks for name in ZEROED}
    moving = nonzero_outputs(folder, projections)
    return None if moving is None else projections - moving


def counts_blocks(values: Mapping[str, Any]) -> bool:
    """Whether freeze_trainable_layers means something: under freeze, and under lora / oft with use_llama_pro (the
    number of expanded blocks, as LLaMA-Factory reads it there)."""
    kind = values["finetuning_type"]
    return kind == "freeze" or (trains_adapter(kind) and bool(values["use_llama_pro"]))


@rule("finetuning_type", "freeze_trainable_layers", "use_llama_pro")
def freeze_key_needs_freeze(ctx: Context) -> list[tuple[str, str]]:
    kind = ctx.values["finetuning_type"]
    if not counts_blocks(ctx.values) and ctx.set_here("freeze_trainable_layers"):
        return [("freeze_trainable_layers", "only applies to finetuning_type: freeze (or lora / oft with "
                                            f"use_llama_pro), but finetuning_type is {kind}; remove it or set "
                                            "finetuning_type: freeze")]
    return []


@rule("finetuning_type", "freeze_trainable_layers", "model_name_or_path", "use_llama_pro")
def freeze_layers_within_model(ctx: Context) -> list[tuple[str, str]]:
    if not counts_blocks(ctx.values):
        return []
    from pipeline.recipe.modelinfo import model_info

    model = ctx.values["model_name_or_path"]
    info = model_info(model)
    n = ctx.values["freeze_trainable_layers"]
    if info is None:
        return [] if n or ctx.values["use_llama_pro"] else [
            ("freeze_trainable_layers", "given 0, which trains no block: expected the number of last blocks to "
                                        "train (or minus the number of first ones), e.g. 2 or -2")]
    if ctx.values["use_llama_pro"]:
        from pipeline.model.config import llama_pro_problem

        problem = llama_pro_problem(info.n_layer, n)
        return [("freeze_trainable_layers", f"{problem}; with use_llama_pro it is the --num-expand that `python -m "
                                            f"pipeline expand` added to {model} (is it the expanded checkpoint?)")
                ] if problem else []
    from pipeline.model.config import freeze_layers_problem

    problem = freeze_layers_problem(info.n_layer, n)
    return [("freeze_trainable_layers", f"{problem} ({model} has {info.n_layer} transformer blocks)")] if problem else []


FREEZE_MODULE_KEYS = ("freeze_trainable_modules", "freeze_extra_modules")


def _freeze_modules_given(values: Mapping[str, Any]) -> list[str]:
    """The freeze module keys set to something else than their defaults (all / null)."""
    return [key for key, default in zip(FREEZE_MODULE_KEYS, ("all", None)) if values[key] != default]


@rule("finetuning_type", *FREEZE_MODULE_KEYS)
def freeze_modules_need_freeze(ctx: Context) -> list[tuple[str, str]]:
    """LLaMA-Factory reads these keys under freeze only; elsewhere a value would silently mean nothing."""
    kind = ctx.values["finetuning_type"]
    if kind == "freeze":
        return []
    return [(key, f"given {show(ctx.values[key])}, but it only applies to finetuning_type: freeze (here {kind}); "
                  "remove it" + (" (lora: lora_target / additional_target pick modules)" if kind == "lora" else ""))
            for key in _freeze_modules_given(ctx.values)]


@rule("finetuning_type", "model_name_or_path", "stage", *FREEZE_MODULE_KEYS)
def freeze_modules_in_model(ctx: Context) -> list[tuple[str, str]]:
    """Each name must be one of the model's modules, as LLaMA-Factory's ValueError demands: checked here, before
    the model loads, with the valid names listed (in transformers' names for the checkpoint's family)."""
    if ctx.values["finetuning_type"] != "freeze" or not _freeze_modules_given(ctx.values):
        return []
    from pipeline.model.config import freeze_module_problems
    from pipeline.recipe.modelinfo import model_info

    info = model_info(ctx.values["model_name_or_path"])
    if info is None:
        return []
    cfg = info.config.replace(num_labels=1) if ctx.values["stage"] == "rm" else info.config
    return freeze_module_problems(cfg, *(ctx.values[key] for key in FREEZE_MODULE_KEYS))
