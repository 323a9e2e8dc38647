"""Rules on a pre-quantized bitsandbytes checkpoint (model_name_or_path with a 4-bit or 8-bit quantization_config, the
hub's unsloth/*-bnb-4bit) against QLoRA's keys (quantization_bit, quantization_type, double_quantization): its stored codes
are the base. resolve derives the keys the recipe leaves at their defaults from the checkpoint
(resolve._derive_stored_quantization); a value the recipe sets otherwise is refused here. Tokens the recipe adds are
refused where the checkpoint stores its output head quantized, and stage rm's training of a reward model's score head
stored so, as the load refuses them.
"""
from __future__ import annotations

from typing import Any, Mapping

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


@rule("model_name_or_path", "stage", "tie_word_embeddings", "add_tokens", "add_special_tokens", "new_special_tokens",
      "new_special_tokens_config")
def added_tokens_fit_the_head(ctx: Context) -> list[tuple[str, str]]:
    """Added tokens on a checkpoint whose output head is stored quantized: the load refuses them
    (pipeline.model.build.refuse_quantized_head, by the same decision quant_layout.quantized_head and words), said
    here so that validate and plan do, not train after the data is built."""
    from pipeline.data.added_tokens import TokenNames
    from pipeline.errors import UserError
    from pipeline.model.quant_layout import QUANTIZED_HEAD_REFUSED

    v = ctx.values
    try:
        adds = bool(TokenNames.of(v))
    except UserError:  # an unreadable new_special_tokens_config: token_config_readable says so
        return []
    if not adds or stored_head(v) != "lm_head":
        return []
    return [("model_name_or_path", QUANTIZED_HEAD_REFUSED.format(name=v["model_name_or_path"]))]


@rule("model_name_or_path", "stage", "tie_word_embeddings", "task")
def score_head_trains(ctx: Context) -> list[tuple[str, str]]:
    """stage rm on a reward model whose score head the checkpoint stores quantized: training it is refused at load
    (pipeline.model.build.build_model, the same decision and words), said here for the commands that train or check
    a recipe that does (quantization.needs_training); those that only load the stored model (export) pass."""
    from pipeline.model.quant_layout import SCORE_HEAD_REFUSED
    from pipeline.recipe.rules.quantization import needs_training

    v = ctx.values
    if not needs_training(ctx.command, v["task"]) or stored_head(v) != "score":
        return []
    return [("model_name_or_path", SCORE_HEAD_REFUSED.format(name=v["model_name_or_path"]))]


def stored_head(v: Mapping[str, Any]) -> str | None:
    """The output head of the recipe's model that its pre-quantized checkpoint stores quantized
    (pipeline.model.quant_layout.quantized_head, on the config as pipeline.model.build.recipe_config sets it: stage
    rm's num_labels, tie_word_embeddings); None where none is, or the checkpoint cannot be read here."""
    from pipeline.model.quant_layout import quantized_head
    from pipeline.recipe.modelinfo import model_info, stored_quantization

    info = model_info(v["model_name_or_path"])
    if info is None:
        return None
    cfg = info.config.replace(num_labels=1 if v["stage"] == "rm" else info.config.num_labels)
    if v["tie_word_embeddings"] is not None:
        cfg = cfg.replace(tie_weights=bool(v["tie_word_embeddings"]))
    return quantized_head(stored_quantization(v["model_name_or_path"]), cfg, scored=bool(info.config.num_labels))
