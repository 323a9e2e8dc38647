"""Rules on a pre-quantized bitsandbytes checkpoint (model_name_or_path with a 4-bit or 8-bit quantization_config, the
hub's unsloth/*-bnb-4bit) against QLoRA's keys (quantization_bit, quantization_type, double_quantization): its stored codes
are the base. resolve derives the keys the recipe leaves at their defaults from the checkpoint
(resolve._derive_stored_quantization); a value the recipe sets otherwise is refused here.
"""
from __future__ import annotations

from pipeline.recipe.check import show
from pipeline.recipe.rules.core import Context, rule

# LLaMA-Factory's configure_quantization (model/model_utils/quantization.py) for a PTQ-quantized model
IGNORED_THERE = "LLaMA-Factory ignores it there: '`quantization_bit` will not affect on the PTQ-quantized models.'"


@rule("model_name_or_path", "quantization_bit", "quantization_type", "double_quantization")
def stored_quantization_matches(ctx: Context) -> list[tuple[str, str]]:
    """Each quantization key the recipe sets to another value than the checkpoint stores: the checkpoint's codes are
    not quantized again, so the recipe's value would not be the model that trains."""
    from pipeline.model.quant_layout import stored_keys
    from pipeline.recipe.modelinfo import stored_quantization

    v = ctx.values
    stored = stored_quantization(v["model_name_or_path"])
    if stored is None:
        return []
    problems = []
    for key, value in stored_keys(stored):
        if v[key] == value or ctx.origins[key].kind not in ("file", "cli"):
            continue
        problems.append((key, f"given {show(v[key])} with model_name_or_path: {v['model_name_or_path']}, a"
                              f" pre-quantized bitsandbytes checkpoint stored as {stored.describe()}: its codes are"
                              f" the base and are not quantized again ({IGNORED_THERE}); remove {key} (it is read"
                              f" from the checkpoint's quantization_config: {show(value)}), or point"
                              " model_name_or_path at the unquantized checkpoint to quantize it as the recipe says"))
    return problems
