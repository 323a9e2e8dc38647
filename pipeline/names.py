"""Lists of names as recipes write them: `a,b`, `a, b` or `[a, b]` (datasets, LoRA target modules), and
report_to's reporter names (read by the log and by the recipe's notices, so they live below both).

LLaMA-Factory recipes write comma strings; YAML lists work too. Resolve turns the recipe's values into
lists once; library functions called with plain values (unit tests, other callers) use the same rule.
"""
from __future__ import annotations

import re
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
# read by stage dpo's loss, never by kto's (LLaMA-Factory's KTO trainer has no BCO term nor LD-DPO weighting)
DPO_LOSS_KEYS = ("pref_loss", "dpo_label_smoothing", "simpo_gamma", "pref_bco_weight", "ld_alpha")


def uses_reference(stage: Any, pref_loss: Any, use_asft_loss: Any = False) -> bool:
    """Whether a stage scores against a reference model: dpo unless its pref_loss is reference-free, kto always
    (its loss is KTO's, whatever pref_loss a dpo recipe it extends has left), sft with use_asft_loss (its KL term)."""
    return (stage == "kto" or (stage == "dpo" and pref_loss not in REFERENCE_FREE)
            or (stage == "sft" and bool(use_asft_loss)))


def token_loss(values: Any) -> dict[str, Any]:
    """The keys that make a pt / sft run's loss other than the plain cross-entropy, with their values ({} for the
    plain loss): label_smoothing_factor, or LLaMA-Factory's use_dft_loss, or use_eaft_loss with eaft_alpha, or
    use_asft_loss with asft_alpha (the rules allow one). all_results.json records them, so that eval's report can
    say what training's losses are."""
    if values.get("use_asft_loss"):
        return {"use_asft_loss": True, "asft_alpha": values.get("asft_alpha")}
    if values.get("use_dft_loss"):
        return {"use_dft_loss": True}
    if values.get("use_eaft_loss"):
        return {"use_eaft_loss": True, "eaft_alpha": values.get("eaft_alpha")}
    return {"label_smoothing_factor": values["label_smoothing_factor"]} if values.get("label_smoothing_factor") else {}


def dpo_terms(values: Any) -> dict[str, Any]:
    """Stage dpo's ld_alpha and pref_bco_weight where they change its objective ({} otherwise). all_results.json
    records them: eval's preference loss leaves both out (pipeline.evaluate.preference), so its report must not call
    training's loss that row."""
    if values.get("stage") != "dpo":
        return {}
    ld_alpha, bco = values.get("ld_alpha"), values.get("pref_bco_weight")
    return {**({"ld_alpha": ld_alpha} if ld_alpha is not None else {}), **({"pref_bco_weight": bco} if bco else {})}


def token_loss_label(settings: Any) -> tuple[str, str] | None:
    """How the plan and eval's report name token_loss's settings: (the loss's adjective, its keys as set); None for
    the plain cross-entropy."""
    if settings.get("use_asft_loss"):  # ASFT: the DFT loss plus asft_alpha x KL(starting model || policy)
        return "KL-anchored DFT-weighted", f"use_asft_loss, asft_alpha {settings.get('asft_alpha', 0.1):g}"
    if settings.get("use_dft_loss"):
        return "DFT-weighted", "use_dft_loss"
    if settings.get("use_eaft_loss"):
        return "EAFT-weighted", f"use_eaft_loss, eaft_alpha {settings.get('eaft_alpha', 1.0):g}"
    if settings.get("label_smoothing_factor"):
        return "label-smoothed", f"label_smoothing_factor {settings['label_smoothing_factor']:g}"
    return None


def token_loss_words(settings: Any) -> str:
    """token_loss's settings as a loss's name: "EAFT-weighted cross-entropy (use_eaft_loss, eaft_alpha 0.5)"."""
    label = token_loss_label(settings)
    return f"{label[0]} cross-entropy ({label[1]})" if label else "the plain cross-entropy"


def token_loss_history(changes: Any) -> str:
    """How the plan and eval's report say that resumes changed the loss (pipeline.train.checkpoint
    .token_loss_changes: [{"step", "from", "to"}], oldest first); "" when none did. A resumed run's last settings
    alone would name the loss of every step."""
    said = [f"after step {c['step']} (a resume) from {token_loss_words(c['from'])} to {token_loss_words(c['to'])}"
            for c in changes or () if isinstance(c, dict) and isinstance(c.get("from"), dict)
            and isinstance(c.get("to"), dict)]
    return f"the loss changed {'; then '.join(said)}" if said else ""


# A PEFT adapter folder as PEFT writes it: its config, its weights, the prefix of every tensor name in them, and the
# tensors with one row per token id (added tokens grow them). Here, not in pipeline.model.lora (which imports torch):
# the rules read adapters at validate / plan, which import no torch.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# LLaMA-Factory's V_HEAD_SAFE_WEIGHTS_NAME: a reward model's value head beside its causal LM (pipeline.model.reward_folder)
V_HEAD_WEIGHTS = "value_head.safetensors"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")  # a run's checkpoint-<step>/ (pipeline.train.checkpoint writes it)
# The folders a run writes in its output_dir that another recipe can start from (pipeline.runtime.layout.RunLayout's
# adapter / model / merged / eval), besides its checkpoint-<step>/: read by the recipe layer, which imports no runtime
RUN_FOLDERS = ("adapter", "model", "merged", "eval")
PEFT_PREFIX = "base_model.model."
VOCAB_ROWS = ("embed_tokens.weight", "wte.weight", "lm_head.weight")  # one row per token id (PEFT's names)

ADAPTER_METHODS = ("lora", "oft")  # finetuning_type values that train an adapter on a frozen base (output_dir/adapter)


def trains_adapter(finetuning_type: Any) -> bool:
    """Whether a run trains a PEFT adapter (LoRA or OFT) rather than the model's own weights (full, freeze): what
    decides adapter/ or model/, merge or re-export, and the adapters-off reference model."""
    return finetuning_type in ADAPTER_METHODS
