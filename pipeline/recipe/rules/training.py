"""Rules on how the run trains: precision (fp16, bf16, pure_bf16), its length (max_steps, num_train_epochs), warmup
(warmup_ratio, warmup_steps), batches against the built data (per_device_train_batch_size,
gradient_accumulation_steps), something to do (do_train, do_eval, do_predict), DeepSpeed offload (zero_stage,
offload_optimizer, offload_param), the schedule (lr_scheduler_type, lr_scheduler_kwargs, min_lr_ratio), gradient
checkpointing, and sft's weighted losses (use_dft_loss, use_eaft_loss, eaft_alpha, use_asft_loss, asft_alpha). The
client optimizers' rules (use_muon, use_galore, use_apollo, use_adam_mini, use_badam): pipeline.recipe.rules.optimizers.
"""
from __future__ import annotations

from pipeline.recipe import lr_kwargs
from pipeline.recipe.check import show
from pipeline.recipe.rules import core
from pipeline.recipe.rules.core import READS_BUILT_DATA, RUNS_HERE, Context, rebuilt_first, rule
from pipeline.recipe.steps import batches_per_step


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


@rule("per_device_train_batch_size", "gradient_accumulation_steps", "ppo_buffer_size", "dataset", "dataset_dir",
      "stage", "overwrite_cache", "do_train", commands=READS_BUILT_DATA)
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
                     f"{ctx.given('per_device_train_batch_size')}, but the {n} training examples do not fill one batch per rank (world size "
                     f"{world}; incomplete batches are dropped): lower per_device_train_batch_size or add data")]
        accumulation, per_step = ctx.values["gradient_accumulation_steps"], batches_per_step(ctx.values)
        if per_step != accumulation and batches >= accumulation:  # stage ppo: the buffer is what does not fit
            return [("ppo_buffer_size",
                     f"{ctx.given('ppo_buffer_size')}, but the {n} training examples make only {batches} "
                     f"micro-batches per rank (per_device_train_batch_size {micro} x world size {world}) and a PPO "
                     f"step draws gradient_accumulation_steps {accumulation} x ppo_buffer_size = {per_step}: no PPO "
                     "step would happen; lower ppo_buffer_size or the batch size")]
        return [("gradient_accumulation_steps",
                 f"{ctx.given('gradient_accumulation_steps')}, but the {n} training examples make only "
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
