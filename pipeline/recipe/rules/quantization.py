"""Rules on QLoRA's keys (quantization_bit, quantization_method; pipeline.model.quantize) against what they read
besides: the fine-tuning method (finetuning_type), PiSSA (pissa_init), a sparse MoE model
(model_name_or_path) and the ZeRO stage (zero_stage, deepspeed: a deepspeed JSON's stage is train's preflight,
quantization_zero3). A pre-quantized checkpoint (config.json with a quantization_config) other than a bitsandbytes one
is refused where every config.json is read (pipeline.model.families._quantized); a bitsandbytes one's keys are
derived from it (resolve._derive_stored_quantization, rules.prequantized), and these rules' messages then name the
checkpoint, not a quantization_bit the recipe does not set (quantized_base).

Every stage runs on a quantized base, as in LLaMA-Factory (its parser checks no stage): the policy is the 4/8-bit base
+ the adapter; dpo / kto / ppo's reference the same base with the adapter off (pipeline.train.preference.
AdapterReference: no second model, as LLaMA-Factory's create_ref_model gives TRL None for LoRA), a ref_model or a full
reward model loaded unquantized (build.load_ref_model; LLaMA-Factory's ref_ / reward_model_quantization_bit, refused
here, left unset); rm's score head and ppo's value head unquantized beside it; ppo's lora reward adapter beside the
4/8-bit base, not folded into it (train.ppo.load_reward_model).
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Mapping

from pipeline.recipe.check import show
from pipeline.recipe.rules.core import Context, rule

# LLaMA-Factory (hparams/parser.py _verify_model_args): "Quantization is only compatible with the LoRA or OFT method."
FULL_REFUSED = ("a quantized base cannot train: its 4/8-bit weights are frozen integer codes ({refused}); set "
                "finetuning_type: lora (or oft), or {fix}")


class Quantizer(Enum):
    """What quantizes the base, which decides where a full / freeze recipe on it is refused (the value: which
    reference refuses it too, quoted in the message)."""

    # the recipe's quantization_bit: LLaMA-Factory refuses it with full / freeze in every command
    RECIPE = "LLaMA-Factory refuses it too: 'Quantization is only compatible with the LoRA or OFT method.'"
    # a pre-quantized checkpoint leaves LLaMA-Factory's quantization_bit unset: transformers' Trainer refuses training
    # it (trainer_utils.py validate_quantization_for_training), every other command loads it as stored
    CHECKPOINT = "transformers' Trainer refuses it too: 'You cannot perform fine-tuning on purely quantized models.'"


@dataclass(frozen=True)
class QuantizedBase:
    """How a message names what quantizes the base (`given`), what does (`source`) and how to do without it (`fix`)."""

    given: str
    source: Quantizer
    fix: str


# LLaMA-Factory's bnb 4-bit under ZeRO 3 needs bnb_4bit_quant_storage (model_utils/quantization.py) so that ZeRO can
# partition the packed weights as floats; ours keeps uint8 storage and its quant state beside the tensor.
ZERO3_REFUSED = ("ZeRO-3 would partition the quantized weights apart from their quantization constants (LLaMA-Factory "
                 "needs bitsandbytes' quant_storage for it, not implemented here); {fix}: ZeRO 0-2 keep the 4/8-bit "
                 "base whole on every rank")


# the commands that train a recipe or read what its training run writes (merge): a full / freeze recipe on a
# pre-quantized checkpoint is refused there; validate and plan check a recipe for what it runs, so there too unless it
# is a benchmark recipe (task: LLaMA-Factory's eval recipe, which trains nothing), and eval without a task
# (output_dir/model, which no run of it can write). Its chat, eval with task and export load the stored model as it
# is, as LLaMA-Factory's do (quantization_bit unset, its _verify_model_args checks nothing; get_eval_args loads the
# model untrainable, hparams/parser.py:572-590); the recipe's own quantization_bit is refused with full / freeze in
# every command, as LLaMA-Factory 0.9.5 refuses it in get_train_args, get_infer_args and get_eval_args
# (hparams/parser.py: 416, 558, 583 call _verify_model_args: "Quantization is only compatible with the LoRA or OFT
# method.", :190).
TRAINS = ("train", "merge", None)
CHECKS_WHAT_RUNS = ("validate", "plan", "eval")  # with a task: the benchmark; without: training / its model


def needs_training(command: str | None, task: Any) -> bool:
    """Whether `command` trains the recipe, reads its training run's model (TRAINS; eval without a task compares that
    model with the base) or checks it for either (validate, plan of a recipe without a task)."""
    return command in TRAINS or (command in CHECKS_WHAT_RUNS and task is None)


def quantized_base(v: Mapping[str, Any]) -> QuantizedBase:
    """What quantizes the base: the recipe's quantization_bit; or a pre-quantized bitsandbytes checkpoint (its
    quantization_bit derived by resolve._derive_stored_quantization, or set to the same value), whose codes no recipe
    key removes: its fix names the unquantized checkpoint, as a 'remove quantization_bit' would name a key that changes
    nothing (or that the recipe does not even set)."""
    from pipeline.recipe.modelinfo import stored_quantization

    stored = stored_quantization(v["model_name_or_path"])
    if stored is None:
        return QuantizedBase(f"with quantization_bit: {v['quantization_bit']}", Quantizer.RECIPE,
                             "remove quantization_bit")
    return QuantizedBase(f"with model_name_or_path: {v['model_name_or_path']}, a pre-quantized bitsandbytes checkpoint"
                         f" stored as {stored.describe()}", Quantizer.CHECKPOINT,
                         "point model_name_or_path at the unquantized checkpoint it was made from")


def quantization_zero3(v: Mapping[str, Any]) -> str | None:
    """Why quantization_bit does not run at this ZeRO stage (3), or None: the rule's and train's preflight's words."""
    if v["quantization_bit"] is None or v["zero_stage"] != 3:
        return None
    return ZERO3_REFUSED


@rule("quantization_bit", "quantization_method", "finetuning_type", "pissa_init", "zero_stage", "deepspeed",
      "model_name_or_path", "task")
def quantization_fits(ctx: Context) -> list[tuple[str, str]]:
    """quantization_bit (QLoRA) trains an adapter (lora, oft) on a frozen bitsandbytes base, in every stage, at ZeRO
    0-2; everything else it is combined with is said here, one message per key."""
    v = ctx.values
    if v["quantization_bit"] is None:
        return []
    base = quantized_base(v)
    given = base.given
    problems = []
    if v["quantization_method"] != "bnb":
        problems.append(("quantization_method", f"given {show(v['quantization_method'])} {given}: bnb (bitsandbytes) "
                                                "is the one quantizer implemented here; set quantization_method: bnb"))
    if v["finetuning_type"] not in ("lora", "oft") and (base.source is Quantizer.RECIPE
                                                        or needs_training(ctx.command, v["task"])):
        problems.append(("finetuning_type", f"given {v['finetuning_type']} {given}: "
                                            + FULL_REFUSED.format(refused=base.source.value, fix=base.fix)))
    if v["pissa_init"]:
        problems.append(("pissa_init", f"given true {given}: PiSSA's SVD needs the unquantized weights (LLaMA-Factory: "
                                       "'Cannot initialize PiSSA adapter on quantized models.'); remove pissa_init"))
    from pipeline.model.quant_layout import SPARSE_MOE_REFUSED
    from pipeline.recipe.modelinfo import model_info

    info = model_info(v["model_name_or_path"])
    if info is not None and info.config.n_experts:  # quantize_model's refusal at load, said before the run
        problems.append(("quantization_bit", f"given {v['quantization_bit']} with model_name_or_path: "
                                             f"{v['model_name_or_path']}: {SPARSE_MOE_REFUSED}"))
    if v["deepspeed"] is None and (why := quantization_zero3(v)):
        problems.append(("zero_stage", f"given 3 {given}: " + why.format(fix="set zero_stage: 2 (or lower)")))
    return problems
