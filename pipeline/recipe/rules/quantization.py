"""Rules on QLoRA's keys (quantization_bit, quantization_method; pipeline.model.quantize) against what they read
besides: the fine-tuning method (finetuning_type), the stage, PiSSA (pissa_init) and the ZeRO stage (zero_stage,
deepspeed: a deepspeed JSON's stage is train's preflight, quantization_zero3); and a pre-quantized checkpoint
(model_name_or_path whose config.json has a quantization_config), whose stored codes are not read here.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from pipeline.recipe.check import show
from pipeline.recipe.rules.core import Context, rule

QLORA_STAGES = ("pt", "sft")
# LLaMA-Factory (hparams/parser.py _verify_model_args): "Quantization is only compatible with the LoRA or OFT method."
FULL_REFUSED = ("a quantized base cannot train: its 4/8-bit weights are frozen integer codes (LLaMA-Factory refuses "
                "it too: 'Quantization is only compatible with the LoRA or OFT method.'); set finetuning_type: lora "
                "(or oft), or remove quantization_bit")
# LLaMA-Factory's bnb 4-bit under ZeRO 3 needs bnb_4bit_quant_storage (model_utils/quantization.py) so that ZeRO can
# partition the packed weights as floats; ours keeps uint8 storage and its quant state beside the tensor.
ZERO3_REFUSED = ("ZeRO-3 would partition the quantized weights apart from their quantization constants (LLaMA-Factory "
                 "needs bitsandbytes' quant_storage for it, not implemented here); {fix}: ZeRO 0-2 keep the 4/8-bit "
                 "base whole on every rank")


def quantization_zero3(v: Mapping[str, Any]) -> str | None:
    """Why quantization_bit does not run at this ZeRO stage (3), or None: the rule's and train's preflight's words."""
    if v["quantization_bit"] is None or v["zero_stage"] != 3:
        return None
    return ZERO3_REFUSED


@rule("quantization_bit", "quantization_method", "finetuning_type", "stage", "pissa_init", "zero_stage", "deepspeed")
def quantization_fits(ctx: Context) -> list[tuple[str, str]]:
    """quantization_bit (QLoRA) trains an adapter (lora, oft) on a frozen bitsandbytes base, for stages pt and sft,
    at ZeRO 0-2; everything else it is combined with is said here, one message per key."""
    v = ctx.values
    if v["quantization_bit"] is None:
        return []
    given = f"with quantization_bit: {v['quantization_bit']}"
    problems = []
    if v["quantization_method"] != "bnb":
        problems.append(("quantization_method", f"given {show(v['quantization_method'])} {given}: bnb (bitsandbytes) "
                                                "is the one quantizer implemented here; set quantization_method: bnb"))
    if v["finetuning_type"] not in ("lora", "oft"):
        problems.append(("finetuning_type", f"given {v['finetuning_type']} {given}: {FULL_REFUSED}"))
    if v["stage"] not in QLORA_STAGES:
        problems.append(("quantization_bit", f"given {v['quantization_bit']} with stage: {v['stage']}: QLoRA is "
                                             f"implemented for stages {', '.join(QLORA_STAGES)}; train stage "
                                             f"{v['stage']} on an unquantized base (remove quantization_bit)"))
    if v["pissa_init"]:
        problems.append(("pissa_init", f"given true {given}: PiSSA's SVD needs the unquantized weights (LLaMA-Factory: "
                                       "'Cannot initialize PiSSA adapter on quantized models.'); remove pissa_init"))
    if v["deepspeed"] is None and (why := quantization_zero3(v)):
        problems.append(("zero_stage", f"given 3 {given}: " + why.format(fix="set zero_stage: 2 (or lower)")))
    return problems


def stored_quantization(name_or_path: str | None) -> dict[str, Any] | None:
    """config.json's quantization_config of a checkpoint folder (a path or a cached hub snapshot), or None."""
    from pipeline.recipe.modelinfo import model_folder

    folder = model_folder(name_or_path)
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8")) if folder is not None else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # model_exists says what is wrong with it
    found = raw.get("quantization_config") if isinstance(raw, dict) else None
    return found if isinstance(found, dict) else None


@rule("model_name_or_path", "quantization_bit")
def checkpoint_not_prequantized(ctx: Context) -> list[tuple[str, str]]:
    """A checkpoint saved quantized (the hub's unsloth/*-bnb-4bit, GPTQ, AWQ) holds packed integer codes under the
    Linears' names: said here, with the fix, instead of a shape mismatch for every Linear when the weights are read."""
    found = stored_quantization(ctx.values["model_name_or_path"])
    if found is None:
        return []
    method = found.get("quant_method", "unknown")
    bits = 4 if found.get("load_in_4bit") else 8 if found.get("load_in_8bit") else found.get("bits")
    fix = (f"point model_name_or_path at the unquantized checkpoint it was made from and set quantization_bit: {bits} "
           "to quantize it at load (bitsandbytes; the same quantization of the same weights)"
           if method == "bitsandbytes" else "point model_name_or_path at the unquantized checkpoint it was made from"
           + (" (quantization_bit quantizes it with bitsandbytes at load)" if ctx.values["quantization_bit"] is None
              else ""))
    return [("model_name_or_path", f"{ctx.values['model_name_or_path']} is a pre-quantized checkpoint (config.json "
                                   f"quantization_config: quant_method {method}"
                                   + (f", {bits}-bit" if bits else "") + "), whose stored quantized weights are not "
                                   f"read here; {fix}")]
