"""LoRA tensors of an adapter file on MoE modules that PEFT 0.21 on transformers 5 leaves out of the model it builds.

Adapters PEFT wrote on transformers 4 held one LoRA pair per Linear of the MLP: each routed expert's gate_proj /
up_proj / down_proj, a shared expert's, a dense block's, and the router where it was an nn.Linear. PEFT 0.21 on
transformers 5 reads such a file through its v4 -> v5 conversion (peft/utils/transformers_weight_conversion.py,
_convert_peft_config_moe), which is keyed by the model type's transformers conversion pattern:

- glm4_moe and deepseek_v3 (and qwen3_moe, mixtral) map to qwen2_moe's pattern: gate_proj / up_proj / down_proj become
  target_parameters on the routed experts' fused tensors and leave target_modules, so the shared experts'
  (mlp.shared_experts) and a dense block's (first_k_dense_replace) Linears of those names get no LoRA, and their
  tensors in the file are dropped without a word (measured with PeftModel.from_pretrained + merge_and_unload: the
  logits are those of the same file without them).
- qwen2_moe itself has no entry (_MODEL_TO_CONVERSION_PATTERN.get("qwen2_moe") is None): target_modules stays as
  written, so gate_proj / up_proj / down_proj adapt the shared expert's Linears only, the routed experts' tensors
  are dropped without a word, and a router `gate` in target_modules raises (Qwen2MoeTopKRouter is no Linear).

Either way PEFT's model of such a file is not the model that was trained; this pipeline refuses it in one message
(as it refuses a per-expert adapter under use_rslora, whose conversion PEFT scales off) rather than compute that
other model, and says how to get either one. Torch-free: the check reads tensor names only.
"""
from __future__ import annotations

import re
from typing import Iterable

from pipeline.model.config import moe_blocked
from pipeline.model.expert_lora import expert_of, router_of
from pipeline.model.families import Family
from pipeline.names import PEFT_PREFIX


def untaken_modules(family: Family, linears: Iterable[str], keys: Iterable[str]) -> list[str]:
    """Our paths of the model's MLP Linears that hold LoRA tensors among `keys` (an adapter file's) but take no LoRA
    on transformers 5 (config.moe_blocked: what lora_target refuses), the experts and routers left out where the
    family trains them (MoeKeys.expert_lora: lora._per_expert_tensors fuses their pairs). Sorted, each once."""
    if not family.moe:
        return []
    linears = set(linears)
    found = set()
    for key in keys:
        module, lora, _ = key.removeprefix(PEFT_PREFIX).partition(".lora_")
        ours = family.from_hf(module)
        if not lora or ours not in linears or not moe_blocked(family, ours, "lora_target", set()):
            continue
        if family.moe.expert_lora and (expert_of(ours) or router_of(ours)):
            continue
        found.add(ours)
    return sorted(found)


def untaken_message(family: Family, weights: str, modules: list[str]) -> str:
    """Why a file with LoRA on `modules` (untaken_modules) is refused, and the two ways on: the trained model (merged
    under transformers 4) or PEFT 0.21's (the file without those tensors)."""
    patterns = dict.fromkeys(re.sub(r"\.experts\.\d+\.", ".experts.E.", re.sub(r"\.layers\.\d+\.", ".layers.N.",
                                                                                   family.to_hf(m)))
                             for m in modules)
    shown = f"{', '.join(patterns)} ({len(modules)} modules"
    if family.moe and family.moe.expert_lora:
        why = ("PEFT 0.21 on transformers 5 moves the names gate_proj / up_proj / down_proj onto the routed experts'"
               " fused tensors (mlp.experts.gate_up_proj / down_proj) and off every other Linear of the MLP (the shared"
               " experts', a dense block's), and this pipeline trains LoRA where PEFT does")
    else:
        why = ("transformers 5 holds its routed experts as fused 3-D tensors and its router as no Linear, and PEFT"
               f" 0.21 converts no {family.model_type} adapter onto them (its transformers 4 -> 5 conversion has no"
               " entry for this model type: a router `gate` in target_modules makes it raise); the shared expert,"
               " shared_expert_gate, a dense block's MLP and the attention take LoRA")
    return (f"{weights}: LoRA on {shown}: one pair each, as PEFT wrote it on transformers 4, where each was an"
            f" nn.Linear), none of which takes LoRA on this {family.architecture}: {why}. PEFT 0.21 loads this file without those tensors"
            " and without a word, so its model is not the one trained, and this pipeline does not compute it either."
            " For the trained model, fold the adapter into its base with PEFT's merge_and_unload() under transformers"
            " 4 and use that checkpoint as model_name_or_path; for PEFT 0.21's model, save the adapter without the"
            " tensors of those modules")
