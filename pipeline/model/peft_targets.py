"""An adapter_config.json's target_modules as PEFT 0.21 reads it onto a model, in the names apply_lora takes.

PEFT reads the field two ways (tuners/tuners_utils.py check_target_module_exists):
- a list: each entry a module's full name or the end of one after a '.' (the suffix rule select_modules applies);
- a string: a regular expression that must match a module's WHOLE name in the transformers model
  (utils/other.py match_target_against_key: `re.fullmatch(target_modules, key)`, key such as
  model.layers.0.self_attn.q_proj), or PEFT's shorthand "all-linear" (any case: every Linear but the output head,
  _maybe_include_all_linear_layers). transformers-4-era adapters and LLaMA-Factory users write such strings
  ("model.layers.*.self_attn.(q_proj|v_proj)"); read as one module name, they matched nothing.

A string is resolved here against the model's Linears (and its embeddings, GPT-2's position table wpe too, and its
head, which the load then refuses as it refuses them in a list) by their transformers names, into the full names it
matches, which apply_lora's suffix rule then picks exactly. A string that also matches a module PEFT cannot adapt (a norm, an attention or MLP block, an
activation: PEFT 0.21 raises "Target module ... is not supported") is refused, never read as its Linears alone.
On a sparse MoE model PEFT 0.21 resolves a string otherwise (its v4 -> v5 conversion,
utils/transformers_weight_conversion.py _resolve_string_target_modules, widens the matches to leaf names over every
layer): pipeline.model.peft_moe_targets reproduces that, against the names of the transformers 5 model.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from pipeline.errors import UserError
from pipeline.model.adapter import embedding_names, family_of_model, linear_names
from pipeline.model.config import lora_candidates
from pipeline.model.families import Family
from pipeline.model.peft_moe_targets import ALL_LINEAR, EXAMPLE, LINEAR, OTHER, converted_names, plain_names, \
    resolved_names, transformers_names

SHOWN = 4  # the matched modules a message names before "and N more"


def pattern_problem(value: Any) -> str | None:
    """Why a string target_modules is no regular expression PEFT can match with (re.fullmatch raises on it), else
    None (a list, or a pattern that compiles). Said by read_adapter_config, before any model is built."""
    if not isinstance(value, str) or value.lower() == ALL_LINEAR:
        return None
    try:
        re.compile(value)
    except re.error as err:
        return (f"target_modules is {json.dumps(value)}, a string, which PEFT reads as a regular expression matched"
                f" against each module's whole name, and this one does not compile ({err}); write it as a valid"
                " regular expression, or as a list of module names such as [\"q_proj\", \"v_proj\"]")
    return None


def target_names(model: nn.Module, targets: str | list[str], path: Path) -> list[str]:
    """`targets` (an adapter_config.json's target_modules, at `path`) as PEFT reads it onto `model`: a list as it is,
    a string as the full transformers names of the modules it selects (the module docstring says how). A string
    that selects no Linear is a UserError naming the rule and an example of a name it must match; one that selects a
    module PEFT cannot adapt (a norm, an attention or MLP block, an activation) too, as PEFT raises on it."""
    if not isinstance(targets, str):
        return list(targets)
    family = family_of_model(model)
    if family.moe:
        chosen = (resolved_names if converted_names(family) else plain_names)(model, family, targets, path)
        if not chosen:
            modules = transformers_names(model, family)[0]
            raise UserError(no_match_message(path, targets, [n for n, kind in modules.items() if kind == LINEAR]))
        return chosen
    candidates = lora_candidates(linear_names(model))  # every Linear but the heads (lm_head, a reward model's score)
    if targets.lower() == ALL_LINEAR:
        return [family.to_hf(n) for n in candidates]
    modules = transformers_names(model, family)[0]
    if unsupported := [n for n, kind in modules.items() if kind == OTHER and n and re.fullmatch(targets, n)]:
        raise UserError(unsupported_dense_message(path, targets, unsupported, model, family))
    named = candidates + embedding_names(model)
    chosen = [family.to_hf(n) for n in named if re.fullmatch(targets, family.to_hf(n))]
    if not chosen:
        raise UserError(no_match_message(path, targets, [family.to_hf(n) for n in candidates]))
    return chosen


def no_match_message(path: Path, targets: str, names: Iterable[str]) -> str:
    """A string that selects no module: PEFT raises (its "Target modules ... not found in the base model"); the
    message shows one of the model's Linear names (`names`, transformers') the pattern must match whole."""
    example = next(iter(lora_candidates(names)), "lm_head")
    return (f"{path}: target_modules is {json.dumps(targets)}, a string, which PEFT reads as a regular expression that"
            f" must match a module's whole name (re.fullmatch, e.g. against {json.dumps(example)}), and it matches"
            " none of this model's Linears: an adapter of another model? A list of names such as [\"q_proj\","
            " \"v_proj\"] matches the ends of names instead")


def unsupported_dense_message(path: Path, targets: str, names: list[str], model: nn.Module, family: Family) -> str:
    """A string that fullmatches modules of the transformers model that are no Linear nor Embedding (`names`): PEFT
    0.21 raises on the first ("Target module LlamaRMSNorm(...) is not supported"), where reading the Linears alone
    would adapt another set of modules than the adapter says. Each is named with its type here (ours: RMSNorm,
    MultiHeadAttention, ...; those of transformers' alone, which hold no weights, by weightless_kind)."""
    kinds = {family.to_hf(name): type(module).__name__ for name, module in model.named_modules()}
    shown = [f"{n} ({kinds.get(n) or weightless_kind(n)})" for n in names[:SHOWN]]
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return (f"{path}: target_modules is {json.dumps(targets)}, a string, which PEFT reads as a regular expression that"
            f" must match a module's whole name, and it matches {', '.join(shown)}{more}: no Linear nor Embedding,"
            " which PEFT 0.21 raises on (\"Target module ... is not supported\": it adapts Linear, Embedding and"
            f" convolution layers); write a pattern that matches Linears only, such as {EXAMPLE}, or a list of names"
            " such as [\"q_proj\", \"v_proj\"]")


def weightless_kind(name: str) -> str:
    """What a module of the transformers model without weights is (ours has none of them): the rotary embedding, a
    dropout (GPT-2's drop, attn_dropout, resid_dropout, dropout; Phi-3's resid_attn_dropout / resid_mlp_dropout) or an
    activation (act_fn, GPT-2's act, Phi-3's and GLM's activation_fn)."""
    leaf = name.rsplit(".", 1)[-1]
    return "rotary embedding" if leaf == "rotary_emb" else "dropout" if "drop" in leaf else "activation"
