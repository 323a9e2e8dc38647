"""pipeline.model.untaken_lora on tensor names alone: which pairs of an adapter file PEFT 0.21 drops on transformers 5
(the measured behaviour is tests/acceptance/test_transformers4_moe_adapters.py's); the layouts PEFT and this pipeline
write for the experts and routers, and every non-MoE family, pass."""
from __future__ import annotations

from pipeline.model.families import FAMILIES, GLM4_MOE
from pipeline.model.untaken_lora import untaken_message, untaken_modules

P = "base_model.model."


def pairs(*modules: str) -> list[str]:
    return [f"{P}{m}.lora_{ab}.weight" for m in modules for ab in "AB"]


def test_a_dense_block_of_qwen3_moe_is_untaken_and_its_experts_and_router_are_taken():
    """mlp_only_layers: block 0 dense. PEFT's conversion moves gate_proj off its Linear, as off GLM-4.5's dense block;
    the per-expert pairs (fused here as PEFT fuses them) and the router's nn.Linear pair load."""
    linears = ["layers.0.mlp.gate_proj", "layers.1.mlp.experts.0.gate_proj", "layers.1.mlp.gate",
               "layers.1.self_attn.q_proj"]
    keys = pairs("model.layers.0.mlp.gate_proj", "model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.gate",
                 "model.layers.1.self_attn.q_proj") + [f"{P}model.layers.1.mlp.experts.lora_A.weight"]
    assert untaken_modules(FAMILIES["qwen3_moe"], linears, keys) == ["layers.0.mlp.gate_proj"]


def test_mixtral_hub_names_and_glm_fused_keys_are_taken_and_dense_families_never_checked():
    mixtral = ["layers.0.mlp.experts.0.gate_proj", "layers.0.mlp.gate"]
    assert untaken_modules(FAMILIES["mixtral"], mixtral, pairs("model.layers.0.block_sparse_moe.experts.0.w1",
                                                               "model.layers.0.block_sparse_moe.gate")) == []
    glm = ["layers.1.mlp.experts.0.gate_proj", "layers.1.mlp.gate", "layers.1.mlp.shared_expert.up_proj"]
    ours = pairs("model.layers.1.mlp.experts", "model.layers.1.mlp.experts.base_layer", "model.layers.1.mlp.gate")
    assert untaken_modules(GLM4_MOE, glm, ours) == []
    assert untaken_modules(GLM4_MOE, glm, pairs("model.layers.1.mlp.shared_experts.up_proj")) == \
        ["layers.1.mlp.shared_expert.up_proj"]  # the hub's shared_experts, ours shared_expert
    assert untaken_modules(FAMILIES["qwen3"], ["layers.0.mlp.gate_proj"], pairs("model.layers.0.mlp.gate_proj")) == []


def test_qwen2_moe_experts_and_router_are_untaken_its_shared_expert_taken_and_the_message_groups_them():
    linears = [f"layers.{n}.mlp.experts.{e}.{p}" for n in (0, 1) for e in (0, 1) for p in ("gate_proj", "up_proj")] + \
        ["layers.0.mlp.gate", "layers.0.mlp.shared_expert.gate_proj", "layers.0.mlp.shared_expert_gate"]
    keys = pairs(*(f"model.{m}" for m in linears))
    untaken = untaken_modules(FAMILIES["qwen2_moe"], linears, keys)
    assert untaken == sorted(linears[:8] + ["layers.0.mlp.gate"])
    message = untaken_message(FAMILIES["qwen2_moe"], "a/adapter_model.safetensors", untaken)
    assert message.startswith("a/adapter_model.safetensors: LoRA on model.layers.N.mlp.experts.E.gate_proj, "
                              "model.layers.N.mlp.experts.E.up_proj, model.layers.N.mlp.gate (9 modules: "), message
    assert "converts no qwen2_moe adapter" in message and "merge_and_unload() under transformers 4" in message
