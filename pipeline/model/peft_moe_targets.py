"""A STRING target_modules on a sparse MoE model, resolved as PEFT 0.21 resolves it on transformers 5.

Where the model type has PEFT's v4 -> v5 conversion (the families with MoeKeys.expert_lora: Qwen3-MoE, GLM-4.5 and
DeepSeek-V3 through transformers' qwen2_moe pattern, Mixtral through its own), inject_adapter first rewrites the
config (peft/utils/transformers_weight_conversion.py _convert_peft_config_moe), and a string goes through
_resolve_string_target_modules before the list rewrite:
- "all-linear" (any case): the last part of the name of every nn.Linear of the transformers 5 model but the output
  head (the attention's; the shared experts' and a dense block's MLP), plus every name of the conversion's table (the
  experts' gate_proj / up_proj / down_proj, Mixtral's w1 / w3 / w2, and the router's gate);
- a regular expression: the last part of every module AND parameter name it fullmatches (re.fullmatch), plus each
  name of that table which it fullmatches once appended to a container of the fused parameter it maps to (the
  transformers 4 key rebuilt without the expert's index: model.layers.1.mlp.experts.gate_proj).
The set of last parts then stands as a LIST target_modules: PEFT matches each on every layer (a name equals it or ends
in '.' + it), so "model.layers.0.self_attn.q_proj" adapts every block's q_proj. That list is what this module returns;
lora.load_adapter then reads it as any list (the table's names onto the fused experts and the router, the rest by
PEFT's suffix rule). A last part naming no module of transformers 5 (weight, gate_up_proj) selects nothing there and
is dropped; one naming a module that is no Linear nor Embedding (the experts' container, a router, act_fn,
rotary_emb, a block) makes PEFT raise ("Target module ... is not supported"), and is refused here in one message.

Those names are the transformers 5 model's, derived from ours (transformers_names): per-expert Linears are the fused
mlp.experts.gate_up_proj / down_proj parameters, a router is a module holding `weight` under mlp.gate (Mixtral's too),
and rotary_emb / act_fn are the parameterless modules every such model has (measured on the four families'
transformers 5.24 models). Models without the conversion (GPT-OSS, Qwen2-MoE) keep PEFT's plain reading.
"""
from __future__ import annotations

import json
import re

from torch import nn

from pipeline.errors import UserError
from pipeline.model.config import expert_spelling, lora_candidates, moe_blocked, router_name
from pipeline.model.expert_lora import FUSED, ROUTER_PARAMETER, expert_of, router_of
from pipeline.model.families import Family

LINEAR, EMBEDDING, OTHER = "Linear", "Embedding", "no Linear nor Embedding"
EXAMPLE = json.dumps(r".*\.(q_proj|v_proj)")  # a pattern that selects Linears only
ALL_LINEAR = "all-linear"  # peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND, compared lower-cased as PEFT does


def converted_names(family: Family) -> dict[str, str]:
    """PEFT's _MOE_TARGET_MODULE_MAPPING for the family: the transformers 4 names (experts' Linears, router) -> the
    transformers 5 parameter each becomes (gate_up_proj / down_proj / gate.weight); {} where PEFT converts none."""
    if not (family.moe and family.moe.expert_lora):
        return {}
    return {name: FUSED[ours] for name, ours in expert_spelling(family).items()} | \
        {router_name(family) or "gate": ROUTER_PARAMETER}


def transformers_names(model: nn.Module, family: Family) -> tuple[dict[str, str], list[str]]:
    """({module name: LINEAR | EMBEDDING | OTHER}, [parameter names]) of the transformers 5 model PEFT sees for
    `model` (ours), as named_modules() / named_parameters() name them; a dense model's too (peft_targets)."""
    params, modules = [], {}
    converted = bool(converted_names(family))
    for name, _ in model.named_parameters():
        module, _, leaf = name.rpartition(".")
        if expert := expert_of(module):
            bias = "_bias" if leaf == "bias" else ""  # GptOssExperts' gate_up_proj_bias / down_proj_bias
            params.append(f"{family.prefix}{expert[0]}.experts.{FUSED[expert[2]]}{bias}")
        elif router_of(module) and converted:  # mlp.gate, also where the hub says block_sparse_moe.gate (Mixtral)
            params.append(f"{family.prefix}{name}")
        else:
            params.append(family.to_hf(name))
    params = list(dict.fromkeys(params))
    for key in params:
        parts = key.split(".")
        modules.update({".".join(parts[:i]): OTHER for i in range(len(parts))})
    activations = not (family.moe and family.moe.fused_experts)  # GptOssExperts computes its activation inline
    for key in [k for k in modules if k.endswith(".experts") and activations]:
        modules[f"{key}.act_fn"] = OTHER
    cfg = getattr(model, "cfg", None)
    if getattr(cfg, "positions", "rope") == "rope":  # GPT-2's learned table has none
        modules[f"{family.prefix}rotary_emb"] = OTHER
    blocks = range(getattr(cfg, "n_layers", 0))
    modules.update({family.prefix + name.format(i=i): OTHER for name in family.weightless
                    for i in (blocks if "{i}" in name else (0,))})
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not (expert_of(name) or router_of(name) or (
                not converted and moe_blocked(family, name, "lora_target", set()))):  # GPT-OSS's router
            hf = family.to_hf(name)
            modules[hf] = LINEAR
            if hf.endswith(".gate_proj") and activations:  # a dense MLP's, a shared expert's activation
                modules[hf.rsplit(".", 1)[0] + ".act_fn"] = OTHER
        elif isinstance(module, nn.Embedding):
            modules[family.to_hf(name)] = EMBEDDING
    return modules, params


def unsupported_message(path: object, targets: str, read: str, name: str, modules: list[str]) -> str:
    """Why a string that selects `modules` (transformers 5 names, no Linear nor Embedding there) through `name` is
    refused: PEFT raises on them."""
    more = f" and {len(modules) - 1} more" if len(modules) > 1 else ""
    return (f"{path}: target_modules is {json.dumps(targets)}, a string, which PEFT 0.21 reads on this MoE model as"
            f" {read}; {name} selects {modules[0]}{more}, {OTHER} in transformers 5, which PEFT raises on (\"Target"
            " module ... is not supported\"); write a pattern that matches Linears only, such as"
            f" {EXAMPLE}, or a list of names")


def plain_names(model: nn.Module, family: Family, targets: str, path: object) -> list[str]:
    """`targets` as PEFT reads a string where it converts nothing (GPT-OSS, Qwen2-MoE): the transformers 5 modules it
    fullmatches (re.fullmatch), which must all be Linears or Embeddings (PEFT raises on a router or the experts)."""
    modules, _ = transformers_names(model, family)
    if targets.lower() == ALL_LINEAR:
        return lora_candidates(n for n, kind in modules.items() if kind == LINEAR)
    chosen = [n for n in modules if re.fullmatch(targets, n)]
    if unsupported := [n for n in chosen if modules[n] == OTHER]:
        raise UserError(unsupported_message(path, targets, "a regular expression that must match a module's whole"
                                            " name", "it", unsupported))
    return chosen


def resolved_names(model: nn.Module, family: Family, targets: str, path: object) -> list[str]:
    """`targets` (a string target_modules, of the adapter_config.json at `path`) as the list PEFT 0.21 replaces it with
    on this MoE model (the module docstring says how), without the names that select nothing; [] where it matches
    nothing. A name PEFT would raise on is a UserError."""
    modules, params = transformers_names(model, family)
    table = converted_names(family)
    if targets.lower() == ALL_LINEAR:
        linears = lora_candidates(n for n, kind in modules.items() if kind == LINEAR)  # but the output head
        found = {n.rsplit(".", 1)[-1] for n in linears} | set(table)
    else:
        found = {key.rsplit(".", 1)[-1] for key in [*modules, *params] if re.fullmatch(targets, key)}
        containers: dict[str, set[str]] = {}
        for key in params:
            container, _, leaf = key.rpartition(".")
            containers.setdefault(leaf, set()).add(container)
        found |= {old for old, new in table.items()
                  if any(re.fullmatch(targets, f"{c}.{old}") for c in containers.get(new, ()))}
    if "" in found:
        raise UserError(f"{path}: target_modules is {json.dumps(targets)}, a string, which PEFT 0.21 reads on this"
                        " MoE model as the last part of each name it matches, and it matches the whole model (PEFT"
                        f" raises: \"target_modules should not contain an empty string\"); name the modules, e.g."
                        f" {EXAMPLE}")
    kept = []
    for leaf in sorted(found):
        hits = [n for n in modules if n == leaf or n.endswith("." + leaf)]
        if leaf not in table and (unsupported := [n for n in hits if modules[n] == OTHER]):
            raise UserError(unsupported_message(path, targets, "the last part of each name it matches"
                                                f" ({', '.join(sorted(found))}), then as those names on every layer",
                                                repr(leaf), unsupported))
        if leaf in table or hits:
            kept.append(leaf)
    return kept
