"""The recipe key `rope_scaling` as LLaMA-Factory applies it (src/llamafactory/model/model_utils/rope.py,
configure_rope, unchanged from 0.9.5 to its main branch).

When cutoff_len exceeds the model's window (a scaling's original_max_position_embeddings, else the context
length), the factor is ceil(cutoff_len / window), the config's rope_scaling becomes that type with that factor
(yarn, llama3 and dynamic with the window as original_max_position_embeddings; llama3 with Llama 3.1's low /
high frequency factors 1 and 4) and the context length becomes window x factor; a scaling the checkpoint has is
replaced, as there. Otherwise nothing changes (LLaMA-Factory: "Disabling rope scaling"). Torch-free: resolve,
the recipe rules and notices compute it too, from the same function.

dynamic is transformers' dynamic NTK (pipeline.model.rope): it rescales only sequences longer than
max_position_embeddings, which LLaMA-Factory has just raised to window x factor >= cutoff_len. So training and
evaluation run the plain frequencies, and only generation past window x factor (or a longer input) rescales.
"""
from __future__ import annotations

import math
from typing import NamedTuple

from pipeline.errors import UserError, article
from pipeline.model.config import ModelConfig

DYNAMIC_NOTICE = ("; dynamic NTK rescales only sequences longer than that context (transformers' rule, as "
                  "LLaMA-Factory runs it): training and evaluation within cutoff_len keep the model's frequencies, "
                  "generation past the context rescales them per forward")


class RopePlan(NamedTuple):
    """The config a recipe's rope_scaling gives, and the window it was measured against."""

    config: ModelConfig
    window: int
    applied: bool


def recipe_rope(cfg: ModelConfig, kind: str | None, cutoff_len: int) -> RopePlan:
    """cfg with LLaMA-Factory's scaling of type `kind` for inputs of cutoff_len tokens (None: cfg as it is)."""
    window = int((cfg.rope_scaling or {}).get("original_max_position_embeddings") or cfg.context_length)
    if kind is None:
        return RopePlan(cfg, window, False)
    if cfg.positions != "rope":
        raise UserError(f"rope_scaling: given {kind!r}, but {article(cfg.family)} {cfg.family} model has learned positions (no rotary "
                        "embedding to scale); remove the key")
    allowed = cfg.hf.rope_types
    if allowed and kind not in allowed:  # Phi3Config.validate_rope raises on any other type (and reads yarn as longrope)
        raise UserError(f"rope_scaling: given {kind!r}, but {cfg.hf.architecture} runs only rope types"
                        f" {', '.join(allowed)} (transformers refuses the others; LongRoPE's factors come with the"
                        " checkpoint, as Phi-3.5-mini / Phi-4-mini's); remove the key")
    if cutoff_len <= window:
        return RopePlan(cfg, window, False)
    factor = float(math.ceil(cutoff_len / window))
    scaling: dict[str, object] = {"type": kind, "factor": factor}
    if kind in ("yarn", "llama3", "dynamic"):
        scaling["original_max_position_embeddings"] = window
    if kind == "llama3":
        scaling.update(low_freq_factor=1.0, high_freq_factor=4.0)
    return RopePlan(cfg.replace(rope_scaling=scaling, context_length=int(window * factor)), window, True)


def rope_notice(plan: RopePlan, kind: str, cutoff_len: int, where: str) -> str:
    """The line a run prints: what was set, or why nothing was."""
    if not plan.applied:
        return (f"notice: {where}: rope_scaling: {kind} not applied: cutoff_len {cutoff_len} fits the model's "
                f"{plan.window} positions (LLaMA-Factory disables the scaling then too)")
    s = plan.config.rope_scaling or {}
    return (f"notice: {where}: rope_scaling: {kind} with factor {s['factor']:g} = ceil(cutoff_len {cutoff_len} / "
            f"{plan.window}) over the model's {plan.window} positions; context_length (max_position_embeddings) "
            f"becomes {plan.config.context_length}, and merged/config.json carries the scaling"
            + (DYNAMIC_NOTICE if kind == "dynamic" else ""))
