"""LoRA on the experts of a sparse MoE block, as PEFT 0.21 trains it on transformers 5's fused expert tensors.

LLaMA-Factory hands PEFT a lora_target such as q_proj,v_proj,gate_proj,up_proj,down_proj. On transformers 5
Qwen3MoeForCausalLM / MixtralForCausalLM hold each block's experts as two 3-D parameters, mlp.experts.gate_up_proj
(E, 2I, H: gate rows, then up rows) and mlp.experts.down_proj (E, H, I), so PEFT's inject_adapter first rewrites the
config (peft/utils/transformers_weight_conversion.py:391-461, _convert_peft_config_moe): gate_proj and up_proj
(Mixtral: w1, w3) become target_parameters gate_up_proj, with rank_pattern 2r and alpha_pattern 2 lora_alpha (the
two fused names; one of them alone raises there), down_proj (w2) becomes down_proj, and those names leave
target_modules (so a dense block's or a shared expert's Linear of that name takes no LoRA). Each target parameter
gets a ParamWrapper (peft/tuners/lora/layer.py:2334-2580) with lora_A (E r', in) and lora_B (out, r' E):
expert e's update is scaling * B_e @ A_e, A_e = lora_A.reshape(E, r', in)[e], B_e = lora_B.reshape(out, r', E)[..., e]
(get_delta_weight: einsum "o r e, e r i"). So PEFT trains a per-expert LoRA of rank r on down_proj and of rank 2r
on the fused gate_up_proj: one A shared by gate and up, and a dense (2I x 2r) B, not two rank-r pairs
(lora.LinearWithFusedLoRA computes that). scaling = alpha / r on both (2 alpha / 2r), with rsLoRA 2 alpha /
sqrt(2r) on gate_up_proj.

PEFT nests the two wrappers on the experts module in sorted name order (tuners_utils.py:1225): down_proj's outer,
so its tensors are saved as mlp.experts.lora_A.weight and gate_up_proj's as mlp.experts.base_layer.lora_A.weight;
one alone is mlp.experts.lora_A.weight. adapter_config.json says target_parameters, rank_pattern and alpha_pattern
as PEFT writes them after that rewrite (measured: save_pretrained of get_peft_model's model). The router `gate` is
converted too, to target_parameters gate.weight (ROUTER_PARAMETER): a plain LoRA pair on the router's weight, under
its transformers 5 path. Torch-free but for fuse / split (plan reads the names).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Iterable, Mapping

if TYPE_CHECKING:
    import torch

# our path of one expert's Linear: (sparse block, expert, Linear)
EXPERT = re.compile(r"^(.*\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
# our Linear -> the fused transformers 5 parameter PEFT targets in its place (_MOE_TARGET_MODULE_MAPPING)
FUSED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
GATE_UP = "gate_up_proj"
PAIR = ("gate_proj", "up_proj")  # the two Linears gate_up_proj fuses, in its row order
# our path of a sparse block's router (a Linear here; transformers 5's Qwen3MoeTopKRouter / MixtralTopKRouter /
# Glm4MoeTopkRouter hold a `weight` parameter): PEFT maps the target `gate` to target_parameters gate.weight
# (_MOE_TARGET_MODULE_MAPPING), a ParamWrapper of one "expert" on that 2-D weight: lora_A (r, in), lora_B (E, r), the
# plain LoRA's math and tensors, saved under the router's transformers 5 path (mlp.gate, Mixtral's too)
ROUTER = re.compile(r"^(.*\.mlp)\.gate$")
ROUTER_PARAMETER = "gate.weight"


def expert_of(name: str) -> tuple[str, int, str] | None:
    """(the sparse block's path, the expert's index, its Linear) of one expert's Linear (ours), else None."""
    match = EXPERT.match(name)
    return None if match is None else (match.group(1), int(match.group(2)), match.group(3))


def router_of(name: str) -> str | None:
    """The sparse block's path of a router (ours: layers.N.mlp.gate), else None."""
    match = ROUTER.match(name)
    return None if match is None else match.group(1)


def fused_parts(names: Iterable[str]) -> set[str]:
    """The parameters PEFT targets (target_parameters) for the expert Linears (gate_up_proj, down_proj) and routers
    (gate.weight) among `names`."""
    names = list(names)
    return {FUSED[e[2]] for n in names if (e := expert_of(n)) is not None} | \
        ({ROUTER_PARAMETER} if any(router_of(n) for n in names) else set())


def peft_fields(parts: set[str], rank: int, alpha: float) -> dict[str, Any]:
    """adapter_config.json's target_parameters / rank_pattern / alpha_pattern as PEFT 0.21 writes them once it has
    converted expert names (_convert_peft_config_moe); {} without expert targets."""
    if not parts:
        return {}
    fused = {rf".*\.{GATE_UP}": 2} if GATE_UP in parts else {}
    return {"target_parameters": sorted(parts), "rank_pattern": {k: n * rank for k, n in fused.items()},
            "alpha_pattern": {k: n * alpha for k, n in fused.items()}}


def parts_of_config(config: Mapping[str, Any]) -> set[str]:
    """The fused expert parameters an adapter_config.json targets, checked to be exactly PEFT's form of them
    (peft_fields); ValueError naming the key otherwise. Other target_parameters, rank or alpha patterns would
    describe another model than these wrappers compute."""
    given = config.get("target_parameters") or []
    parts = set(given) if isinstance(given, list) and all(isinstance(p, str) for p in given) else None
    known = {*FUSED.values(), ROUTER_PARAMETER}
    if parts is None or not parts <= known:
        raise ValueError(f"target_parameters is {given!r}; this pipeline reads only {sorted(known)}"
                         " (PEFT's fused expert tensors of a sparse MoE block and its router's weight)")
    want = peft_fields(parts, config["r"], config["lora_alpha"])
    for key in ("rank_pattern", "alpha_pattern"):
        if (config.get(key) or {}) != want.get(key, {}):
            raise ValueError(f"{key} is {config.get(key)!r}; with target_parameters {sorted(parts)} PEFT writes"
                             f" {want.get(key, {})!r} (gate_up_proj: twice r and lora_alpha)")
    return parts


def peft_module(block: str, part: str, parts: set[str]) -> str:
    """The experts' ParamWrapper holding `part` (ours: a sparse block's path, e.g. layers.0.mlp) in transformers 5's
    module tree (the same for Qwen3-MoE and Mixtral: model.layers.N.mlp.experts), after the model prefix."""
    nested = part == GATE_UP and "down_proj" in parts  # the inner wrapper: down_proj's is outside it
    return f"{block}.experts" + (".base_layer" if nested else "")


def fuse(pairs: list[tuple["torch.Tensor", "torch.Tensor"]]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """Each expert's (lora_A (r' x in), lora_B (out x r')) in expert order -> PEFT's (lora_A (E r' x in),
    lora_B (out x r' E)): A's rows expert by expert, B's columns rank by rank, the experts innermost."""
    import torch

    lora_a = torch.cat([a for a, _ in pairs], dim=0)
    lora_b = torch.stack([b for _, b in pairs], dim=0).permute(1, 2, 0)  # (out, r', E)
    return lora_a, lora_b.reshape(lora_b.shape[0], -1)


def concatenated(pairs: list[tuple["torch.Tensor", "torch.Tensor"]]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """One expert's per-Linear pairs (lora_A (r x in), lora_B (out x r)) of the Linears one fused parameter holds, in
    its row order (gate_proj, up_proj) -> that parameter's pair: [A_1; A_2] (2r x in), blockdiag(B_1, B_2) (2I x 2r),
    the same update at 2 alpha / 2r. How PEFT 0.21 loads an adapter written on transformers 4, where each expert's
    Linears took their own LoRA (transformers_weight_conversion.py: PeftConcatenate on lora_A, _block_diag_3d on
    lora_B); a single pair (down_proj) is itself."""
    import torch

    return torch.cat([a for a, _ in pairs], dim=0), torch.block_diag(*[b for _, b in pairs])


def split(lora_a: "torch.Tensor", lora_b: "torch.Tensor", experts: int) -> list[tuple["torch.Tensor", "torch.Tensor"]]:
    """fuse's inverse: expert e's (lora_A (r' x in), lora_B (out x r'))."""
    a = lora_a.reshape(experts, -1, lora_a.shape[-1])
    b = lora_b.reshape(lora_b.shape[0], -1, experts)
    return [(a[e], b[:, :, e]) for e in range(experts)]
