"""Rules on how the run trains: precision (fp16, bf16, pure_bf16), its length (max_steps, num_train_epochs), warmup
(warmup_ratio, warmup_steps), batches against the built data (per_device_train_batch_size,
gradient_accumulation_steps), something to do (do_train, do_eval, do_predict), DeepSpeed offload and the client
optimizers (zero_stage, offload_optimizer, offload_param, use_muon, use_galore, use_apollo, use_adam_mini,
use_badam), the schedule (lr_scheduler_type, lr_scheduler_kwargs, min_lr_ratio), gradient checkpointing, and sft's
weighted losses (use_dft_loss, use_eaft_loss, eaft_alpha, use_asft_loss, asft_alpha).
"""
from __future__ import annotations

from typing import Any, Mapping

from pipeline.recipe import lr_kwargs
from pipeline.recipe.check import show
from pipeline.recipe.rules import core
from pipeline.recipe.rules.core import READS_BUILT_DATA, RUNS_HERE, Context, rebuilt_first, rule


@rule("fp16", "bf16")
def fp16_and_bf16(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["fp16"] and ctx.values["bf16"]:
        key = "fp16" if ctx.sort_key("fp16") >= ctx.sort_key("bf16") else "bf16"
        return [(key, "fp16 and bf16 are both true; choose one (bf16 on Ampere or newer GPUs and on CPU, "
                      "fp16 on older GPUs)")]
    return []


@rule("fp16", commands=RUNS_HERE)
def fp16_needs_cuda(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["fp16"] and not core.cuda_available():  # looked up when the rule runs: tests stub it there
        return [("fp16", "fp16 needs a CUDA GPU and this machine has none; use bf16 on CPU "
                         "(bf16: true, fp16: false) or neither for fp32")]
    return []


PURE_BF16_ZERO3 = ("pure_bf16 does not run under ZeRO 3: LLaMA-Factory refuses the two (\"`pure_bf16` is "
                   "incompatible with DeepSpeed ZeRO-3\"); {fix}, or use bf16: true (mixed precision: fp32 master "
                   "weights and optimizer states) with ZeRO 3")
PURE_BF16_OFFLOAD = ("pure_bf16 with offload_optimizer: DeepSpeed keeps bf16 master weights only for its own compiled "
                     "CPU Adam when the optimizer is offloaded, and the optimizer here is torch's AdamW; set "
                     "offload_optimizer: none, or use bf16: true (fp32 masters) with the offload")


@rule("pure_bf16", "bf16", "fp16", "zero_stage", "deepspeed", "offload_optimizer")
def pure_bf16_fits(ctx: Context) -> list[tuple[str, str]]:
    """pure_bf16 (pipeline.recipe.precision.precision): alone among the precision keys, ZeRO 0-2 (a deepspeed JSON's
    stage and offload: train's preflight), no optimizer offload. bf16 beside it is refused, not merged: here bf16 is
    DeepSpeed's mixed precision with fp32 masters, and LLaMA-Factory with both adds torch autocast over the bf16
    model, which this pipeline does not run."""
    v = ctx.values
    if not v["pure_bf16"]:
        return []
    problems = []
    for key, why in (("bf16", "mixed precision with fp32 master weights, which pure_bf16 trains without (and "
                              "LLaMA-Factory with both runs its bf16 model under torch autocast, not done here)"),
                     ("fp16", "float16, and pure_bf16 trains the weights in bfloat16")):
        if v[key]:
            problems.append((key, f"given true with pure_bf16: true: {key} is {why}; keep one of the two keys"))
    if v["deepspeed"] is None and v["zero_stage"] == 3:
        problems.append(("zero_stage", "given 3 with pure_bf16: true: "
                                       + PURE_BF16_ZERO3.format(fix="set zero_stage: 2 (or lower)")))
    if v["deepspeed"] is None and v["offload_optimizer"] != "none" and v["zero_stage"] in (1, 2):
        problems.append(("offload_optimizer", f"given {v['offload_optimizer']} with pure_bf16: true: "
                                              + PURE_BF16_OFFLOAD))
    return problems


@rule("max_steps", "num_train_epochs", commands=("train", "plan", "validate", None))
def training_length(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["max_steps"] is None and ctx.values["num_train_epochs"] is None:
        return [("num_train_epochs", "given null and max_steps is unset, so the run has no length; "
                                     "set one (e.g. num_train_epochs: 3, the default)")]
    return []


@rule("warmup_ratio", "warmup_steps")
def warmup_once(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["warmup_ratio"] is not None and ctx.values["warmup_steps"] is not None:
        key = "warmup_steps" if ctx.sort_key("warmup_steps") >= ctx.sort_key("warmup_ratio") else "warmup_ratio"
        return [(key, f"warmup_ratio ({ctx.values['warmup_ratio']}) and warmup_steps "
                      f"({ctx.values['warmup_steps']}) are both set; keep one")]
    return []


@rule("per_device_train_batch_size", "gradient_accumulation_steps", "dataset", "dataset_dir", "stage",
      "overwrite_cache", "do_train", commands=READS_BUILT_DATA)
def enough_batches(ctx: Context) -> list[tuple[str, str]]:
    """The training split fills an optimizer step; not asked when nothing trains (do_train: false evaluates only,
    as LLaMA-Factory's examples/extras/nlg_eval recipe does, whatever the size of the train split)."""
    n = ctx.values["num_train_examples"]
    if n is None or not ctx.values["do_train"] or rebuilt_first(ctx):
        return []
    if n == 0:
        return [("dataset", "the built training split is empty; add data or lower val_size")]
    if ctx.values["steps_per_epoch"] == 0:
        micro, world = ctx.values["per_device_train_batch_size"], ctx.values["world_size"]
        batches = n // (micro * world)  # the train loader drops the last incomplete batch
        if batches == 0:
            return [("per_device_train_batch_size",
                     f"given {micro}, but the {n} training examples do not fill one batch per rank (world size "
                     f"{world}; incomplete batches are dropped): lower per_device_train_batch_size or add data")]
        return [("gradient_accumulation_steps",
                 f"given {ctx.values['gradient_accumulation_steps']}, but the {n} training examples make only "
                 f"{batches} micro-batches per rank (per_device_train_batch_size {micro} x world size {world}): "
                 "no optimizer step would happen; lower gradient_accumulation_steps or the batch size")]
    return []


@rule("do_train", "do_eval", "do_predict", commands=("train",))
def something_to_do(ctx: Context) -> list[tuple[str, str]]:
    if not ctx.values["do_train"] and not ctx.values["do_eval"] and not ctx.values["do_predict"]:
        return [("do_train", "is false and neither do_eval nor do_predict is true: the train command would do "
                             "nothing; set do_train: true, or do_eval/do_predict to evaluate the model")]
    return []


@rule("zero_stage", "offload_optimizer", "offload_param", "deepspeed")
def offload_needs_zero(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["deepspeed"] is not None:
        return []  # the user's JSON decides; dsconfig checks it
    stage, problems = ctx.values["zero_stage"], []
    if ctx.values["offload_param"] != "none" and stage != 3:
        problems.append(("offload_param", f"offloading parameters needs zero_stage: 3 (zero_stage is {stage})"))
    if ctx.values["offload_optimizer"] != "none" and stage == 0:
        problems.append(("offload_optimizer", "offloading optimizer states needs zero_stage 1, 2 or 3 "
                                              "(zero_stage is 0)"))
    for key in ("offload_optimizer", "offload_param"):
        if ctx.values[key] == "nvme":
            problems.append((key, "nvme offload needs an nvme_path: give a deepspeed JSON with "
                                  f"zero_optimization.{key}.nvme_path, or use cpu"))
    return problems


def whole_matrices_only(v: Mapping[str, Any], key: str, why: str) -> list[tuple[str, str]]:
    """The ZeRO-0 client optimizers (Muon, GaLore, APOLLO, Adam-mini, BAdam) refused at the recipe's ZeRO 1-3 with
    their reason `why` ({stage}, {fix}); a deepspeed JSON's stage is train's preflight (the file's line there)."""
    if v["deepspeed"] is None and v["zero_stage"] != 0:
        return [("zero_stage", f"given {v['zero_stage']} with {key}: true: "
                               + why.format(stage=v["zero_stage"], fix="set zero_stage: 0"))]
    return []


MUON_ZERO = ("Muon needs zero_stage 0: it orthogonalizes each weight matrix's whole update, but ZeRO {stage} hands "
             "the optimizer flat slices of the parameters that cut the matrices apart (DeepSpeed's own Muon, which "
             "works on those slices, computes another update than LLaMA-Factory's: docs/training.md); {fix} (data "
             "parallel; the memory plan: `make plan`), or remove use_muon")


@rule("use_muon", "zero_stage", "deepspeed", "loraplus_lr_ratio")
def muon_fits(ctx: Context) -> list[tuple[str, str]]:
    """Muon (pipeline.train.muon) steps whole matrices: ZeRO 0 only (a deepspeed JSON's stage: train's preflight).
    With loraplus_lr_ratio, LLaMA-Factory builds LoRA+'s AdamW and silently drops use_muon; asking for both is a
    mistake either way, so it is said rather than copied."""
    if not ctx.values["use_muon"]:
        return []
    problems = []
    problems += whole_matrices_only(ctx.values, "use_muon", MUON_ZERO)
    if ctx.values["loraplus_lr_ratio"] is not None:
        problems.append(("loraplus_lr_ratio", f"given {show(ctx.values['loraplus_lr_ratio'])} with use_muon: true: "
                                              "LoRA+ and Muon are two optimizers (LLaMA-Factory silently trains with "
                                              "LoRA+'s AdamW and ignores use_muon); keep one of the two keys"))
    return problems


_LOW_RANK_ZERO = ("{name} needs zero_stage 0: {why}, but ZeRO {{stage}} hands the optimizer flat slices of the "
                  "parameters that cut the matrices apart (LLaMA-Factory refuses GaLore and APOLLO under any "
                  "DeepSpeed); {{fix}} (data parallel; the memory plan: `make plan`), or remove use_{key}")
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
    problems += whole_matrices_only(v, f"use_{key}", zero)
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


ADAM_MINI_ZERO = ("Adam-mini needs zero_stage 0: it keeps one second moment per row or attention head of each "
                  "weight matrix, but ZeRO {stage} hands the optimizer flat slices of the parameters that cut rows "
                  "and heads apart; {fix} (data parallel; the memory plan: `make plan`), or remove use_adam_mini")
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
    problems += whole_matrices_only(v, "use_adam_mini", ADAM_MINI_ZERO)
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
      "use_adam_mini", "badam_mode", "badam_switch_mode", "badam_start_block", "badam_switch_interval")
def badam_fits(ctx: Context) -> list[tuple[str, str]]:
    """BAdam (pipeline.train.badam): layer mode at ZeRO 0 (a deepspeed JSON's stage: train's preflight) on a full
    fine-tune, one optimizer at a time; ratio mode refused; fixed needs its block; an interval of at least 1."""
    v = ctx.values
    if not v["use_badam"]:
        return []
    problems = []
    problems += whole_matrices_only(v, "use_badam", BADAM_ZERO)
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
    interval = v["badam_switch_interval"]
    if interval < 1:
        problems.append(("badam_switch_interval", f"given {interval}, expected an integer >= 1 (steps per layer): "
                                                  "LLaMA-Factory documents -1 as 'never switch', but badam then "
                                                  f"switches after every step ((n + 1) % {interval} is 0 for every "
                                                  "n); to train one layer throughout set badam_switch_mode: fixed "
                                                  "with badam_start_block"))
    if v["badam_mode"] == "ratio":
        problems.append(("badam_mode", "given 'ratio' with use_badam: true: ratio-wise BAdam (a sparse mask over "
                                       "every weight's gradient) is not implemented here; use badam_mode: layer"))
    if v["badam_switch_mode"] == "fixed" and v["badam_start_block"] is None:
        problems.append(("badam_switch_mode", "given 'fixed' without badam_start_block: fixed trains one decoder "
                                              "layer, which badam_start_block names (badam stops there without "
                                              "it); set badam_start_block: <layer index>"))
    return problems


@rule("use_badam", "badam_start_block", "model_name_or_path")
def badam_start_block_in_model(ctx: Context) -> list[tuple[str, str]]:
    """badam_start_block names a decoder layer of the model (badam fails past the last one): said at the key when
    the model is on disk, else when train builds the optimizer (pipeline.train.badam)."""
    v = ctx.values
    if not v["use_badam"] or v["badam_start_block"] is None:
        return []
    from pipeline.recipe.modelinfo import model_info

    info = model_info(v["model_name_or_path"])
    if info is None or v["badam_start_block"] < info.n_layer:
        return []
    return [("badam_start_block", f"given {v['badam_start_block']}, but {v['model_name_or_path']} has {info.n_layer} "
                                  f"decoder layers (blocks 0 to {info.n_layer - 1}); name one of them")]


@rule("lr_scheduler_type", "lr_scheduler_kwargs", "min_lr_ratio", "learning_rate")
def scheduler_kwargs(ctx: Context) -> list[tuple[str, str]]:
    """transformers' lr_scheduler_kwargs: cosine_with_min_lr's floor (resolve derived min_lr_ratio from it), refused
    where no schedule here reads them, or where they contradict a min_lr_ratio the recipe sets too."""
    schedule, kwargs = ctx.values["lr_scheduler_type"], ctx.values["lr_scheduler_kwargs"]
    try:
        ratio = lr_kwargs.floor_ratio(schedule, kwargs, ctx.values["learning_rate"])
    except (ValueError, TypeError) as err:
        return [("lr_scheduler_kwargs", f"given {show(kwargs)}: {err}")]
    user_floor = ctx.origins["min_lr_ratio"].kind in ("file", "cli")
    if ratio is not None and user_floor and ctx.values["min_lr_ratio"] != ratio:
        return [("min_lr_ratio", (f"is {ctx.values['min_lr_ratio']:g} but lr_scheduler_kwargs give a floor of "
                                  f"{ratio:g} of learning_rate; they set the same floor: keep one"))]
    if schedule == lr_kwargs.SCHEDULE and ratio is None and not user_floor:
        return [("lr_scheduler_type", (f"{lr_kwargs.SCHEDULE} needs its floor, as in transformers: set "
                                       f"lr_scheduler_kwargs: {lr_kwargs.EXAMPLE} (or min_lr_ratio: 0.1)"))]
    return []


@rule("gradient_checkpointing", "disable_gradient_checkpointing")
def checkpointing_switches_agree(ctx: Context) -> list[tuple[str, str]]:
    on = ctx.values["gradient_checkpointing"]
    disabled = ctx.values["disable_gradient_checkpointing"]
    if on is not None and ctx.origins["disable_gradient_checkpointing"].kind in ("file", "cli") and disabled == on:
        return [("gradient_checkpointing", f"is {str(on).lower()} but disable_gradient_checkpointing is also "
                                           f"{str(on).lower()}; they are the same switch inverted: keep one")]
    return []


@rule("stage", "use_dft_loss", "use_eaft_loss", "label_smoothing_factor")
def one_sft_loss(ctx: Context) -> list[tuple[str, str]]:
    """One loss at a time: LLaMA-Factory's sft trainer installs DFT, else EAFT (an elif), as transformers'
    compute_loss_func, which Trainer.compute_loss uses instead of its label smoother. Set beside the one that
    wins, use_eaft_loss or label_smoothing_factor would be ignored without a word. (Other stages refuse
    use_*_loss already: stages.STAGE_ONLY.)"""
    values = ctx.values
    if values["stage"] != "sft":
        return []
    winner = next((key for key in ("use_dft_loss", "use_eaft_loss") if values[key]), None)
    if winner is None:
        return []
    ignored = [key for key in ("use_eaft_loss", "label_smoothing_factor") if key != winner and values[key]]
    return [(key, f"given {show(values[key])} together with {ctx.where(winner)} true: LLaMA-Factory trains "
                  f"{winner}'s loss then and ignores {key} (its sft trainer takes use_dft_loss before "
                  "use_eaft_loss, and either replaces transformers' label smoother); set one of them")
            for key in ignored]


ALPHA_SWITCH = {"eaft_alpha": ("use_eaft_loss", "EAFT"), "asft_alpha": ("use_asft_loss", "ASFT")}


@rule("use_eaft_loss", "eaft_alpha", "use_asft_loss", "asft_alpha")
def alpha_needs_its_loss(ctx: Context) -> list[tuple[str, str]]:
    """eaft_alpha without use_eaft_loss (asft_alpha without use_asft_loss) would be ignored without a word. Written
    at all, its default included, it is refused, as the project refuses every setting of a feature that is off
    (lora_rank: 8 under full, pref_beta / kto_*_weight outside their stages, freeze_trainable_layers outside freeze):
    written, it says its author thinks the feature is on. Only on/off switches (use_*_loss, packing,
    train_on_prompt: stages.STAGE_ONLY) pass at their off value, which asks for nothing; LLaMA-Factory's webui
    writes lora / pref keys only for their methods and never writes eaft_alpha or asft_alpha."""
    return [(alpha, f"given {show(ctx.values[alpha])}, but it only weighs the {loss} loss and {switch} is not "
                    f"true; remove it or set {switch}: true")
            for alpha, (switch, loss) in ALPHA_SWITCH.items() if ctx.set_here(alpha) and not ctx.values[switch]]


ASFT_CRASHES = {  # what LLaMA-Factory 0.9.5 does with each key beside use_asft_loss (train/sft/trainer.py)
    "use_dft_loss": "its compute_loss then hands the reference's logits to the DFT loss as num_items_in_batch, and "
                    "the step fails",
    "use_eaft_loss": "its compute_loss then hands the reference's logits to the EAFT loss as num_items_in_batch, "
                     "and the step fails",
    "label_smoothing_factor": "its compute_loss then computes the ASFT loss alone and ignores the label smoother",
    "compute_accuracy": "its compute_loss returns the ASFT loss without the logits transformers' evaluation "
                        "unpacks, and the evaluation fails",
}


@rule("stage", "use_asft_loss", *ASFT_CRASHES)
def asft_alone(ctx: Context) -> list[tuple[str, str]]:
    """use_asft_loss is a loss of its own: beside another sft loss LLaMA-Factory fails or ignores one, and its
    evaluation has no logits for token accuracy. Said at the other key's line."""
    values = ctx.values
    if values["stage"] != "sft" or not values["use_asft_loss"]:
        return []
    return [(key, f"given {show(values[key])} together with {ctx.where('use_asft_loss')} true: LLaMA-Factory's "
                  f"sft trainer takes use_asft_loss first in compute_loss, and {why}; set one of them")
            for key, why in ASFT_CRASHES.items() if values[key]]
