"""Lists of names as recipes write them: `a,b`, `a, b` or `[a, b]` (datasets, LoRA target modules), and
report_to's reporter names (read by the log and by the recipe's notices, so they live below both).

LLaMA-Factory recipes write comma strings; YAML lists work too. Resolve turns the recipe's values into
lists once; library functions called with plain values (unit tests, other callers) use the same rule.
"""
from __future__ import annotations

from typing import Any, Iterable


def split_names(value: str | Iterable[str] | None) -> list[str]:
    """The names in a comma string or a list, stripped, empty ones dropped; None gives []."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else value
    return [part.strip() for part in parts if part and part.strip()]


REPORTERS = ("tensorboard", "wandb")


def wanted_reporters(report_to: Any) -> list[str]:
    """report_to as a list of reporter names ('all': every installed one; 'none': none)."""
    import importlib.util

    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    if "all" in names:
        return [n for n in REPORTERS if importlib.util.find_spec(n) is not None]
    return [n for n in names if n in REPORTERS]


PREFERENCE_STAGES = ("dpo", "kto")  # stages that score responses against a reference model (pref_beta, ref_model)
REFERENCE_FREE = ("orpo", "simpo")  # stage dpo's pref_loss values that use no reference model
DPO_LOSS_KEYS = ("pref_loss", "dpo_label_smoothing", "simpo_gamma")  # read by stage dpo's loss, never by kto's


def uses_reference(stage: Any, pref_loss: Any) -> bool:
    """Whether a stage scores against a reference model: dpo unless its pref_loss is reference-free, kto always
    (its loss is KTO's, whatever pref_loss a dpo recipe it extends has left)."""
    return stage == "kto" or (stage == "dpo" and pref_loss not in REFERENCE_FREE)
