"""lora_target: all on every MoE family (and a dense control, and Gemma 3's image-text wrapper) adapts what
LLaMA-Factory 0.9.5 + PEFT 0.21 adapt on transformers 5.24's model.

Golden facts, from their source and from PEFT's get_peft_model on the tiny transformers model itself:
LLaMA-Factory's adapter.py:205-206 expands `all` by find_all_linear_modules (model/model_utils/misc.py:28-52,
re-typed as tests.model.test_moe_families.lf_all_linear_modules: the last name of every module whose class name holds
"Linear", lm_head left out) and hands those names to PEFT as target_modules. On transformers 5 the routed experts are
fused 3-D tensors and the router a TopKRouter, so the names are the attention's plus those of real MLP Linears: a
dense block's (GLM-4.5, DeepSeek-V3: first_k_dense_replace; Qwen3-MoE: mlp_only_layers) and the shared experts'
gate_proj / up_proj / down_proj. PEFT 0.21's _convert_peft_config_moe (utils/transformers_weight_conversion.py:402-482)
then moves those three names, for the model types transformers maps to its qwen2_moe conversion (qwen3_moe, glm4_moe,
deepseek_v3; not qwen2_moe itself, mixtral's experts have no Linear of their names, gpt_oss no conversion), onto
target_parameters gate_up_proj (rank and alpha doubled) and down_proj of every routed expert, and off the dense and
shared Linears. So `all` trains the routed experts on GLM-4.5 and DeepSeek-V3: ours must too (the plan's count, the
adapter's target_modules / target_parameters). The adapter's tensors and logits in PEFT: test_glm4_moe's and
test_deepseek_v3's test_lora_all_adapts_what_peft_adapts_on_this_model; through the CLI: test_lora_all_moe_cli."""
from __future__ import annotations

import re

import pytest

from pipeline.model.config import all_linear_names, layout, lora_candidates, lora_target_modules, read_config, \
    trainable_params
from pipeline.model.expert_lora import expert_of, fused_parts, peft_fields
from pipeline.model.families import FAMILIES

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ATTENTION = ["k_proj", "o_proj", "q_proj", "v_proj"]
MLP = ["down_proj", "gate_proj", "up_proj"]
EXPERTS = ["down_proj", "gate_up_proj"]  # PEFT's target_parameters for the moved names


def config(case: str):
    """The tiny transformers config of each case (the families' test configs)."""
    from tests.model.test_expert_lora_more import tiny_config
    from tests.model.test_gpt_oss import TINY as GPT_OSS
    from tests.model.test_moe_expert_lora import COMMON, MODELS

    qwen3_moe = {**COMMON, **MODELS["qwen3_moe"][2]}  # mlp_only_layers=[1]: a dense block
    return {
        "qwen3": lambda: transformers.Qwen3Config(**COMMON, intermediate_size=48, head_dim=8),
        "qwen3_moe": lambda: transformers.Qwen3MoeConfig(**{**qwen3_moe, "mlp_only_layers": []}),
        "qwen3_moe dense block": lambda: transformers.Qwen3MoeConfig(**qwen3_moe),
        "mixtral": lambda: transformers.MixtralConfig(**COMMON, **MODELS["mixtral"][2]),
        "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
            **COMMON, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
            num_experts=4, mlp_only_layers=[1]),
        "glm4_moe": lambda: tiny_config("glm4_moe"),
        "deepseek_v3": lambda: tiny_config("deepseek_v3"),
        "gpt_oss": lambda: transformers.GptOssConfig(**GPT_OSS),
    }[case]()


# case -> (LLaMA-Factory's names, PEFT's target_modules after its conversion, PEFT's target_parameters), as measured
# with find_all_linear_modules and get_peft_model on transformers 5.24 / PEFT 0.21.2 (the report's table)
LATENT = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"]
TABLE = {
    "qwen3": (ATTENTION + MLP, ATTENTION + MLP, []),
    "qwen3_moe": (ATTENTION, ATTENTION, []),
    "qwen3_moe dense block": (ATTENTION + MLP, ATTENTION, EXPERTS),
    "mixtral": (ATTENTION, ATTENTION, []),
    "qwen2_moe": (ATTENTION + MLP + ["shared_expert_gate"], ATTENTION + MLP + ["shared_expert_gate"], []),
    "glm4_moe": (ATTENTION + MLP, ATTENTION, EXPERTS),
    "deepseek_v3": (LATENT + MLP, LATENT, EXPERTS),
    "gpt_oss": (ATTENTION, ATTENTION, []),
}


def peft_modules(model) -> set[str]:
    """The modules PEFT's LoRA sits on (a Linear's wrapper, or the experts module holding the ParamWrappers), by
    their path in transformers' model."""
    return {re.sub(r"(\.base_layer)+$", "", n.removeprefix("base_model.model."))
            for n, m in model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize("case", list(TABLE))
def test_lora_all_adapts_what_llamafactory_and_peft_adapt(tmp_path, case):
    """Per family: LLaMA-Factory's names are all_linear_names; PEFT's get_peft_model with them adapts the modules ours
    adapts (a routed expert's Linear as its experts module), its target_modules / target_parameters are what our
    adapter_config.json writes, and plan's trainable count is PEFT's."""
    from tests.model.test_moe_families import lf_all_linear_modules

    hf = config(case)
    hf.save_pretrained(tmp_path)  # config.json: all read_config reads
    model = transformers.AutoModelForCausalLM.from_config(hf)
    names, modules, parameters = TABLE[case]
    assert lf_all_linear_modules(model) == sorted(names)
    theirs = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=sorted(names)))
    settings = theirs.peft_config["default"]
    assert (sorted(settings.target_modules), sorted(settings.target_parameters or [])) == (sorted(modules), parameters)

    cfg = read_config(tmp_path)
    family = FAMILIES[cfg.hf.name]
    linears = lora_candidates(m.name for m in layout(cfg) if m.kind == "linear")
    assert sorted(all_linear_names(family, linears)) == sorted(names)
    ours = [m.name for m in lora_target_modules(cfg, "all")]
    assert {family.to_hf(f"{e[0]}.experts") if (e := expert_of(n)) else family.to_hf(n) for n in ours} == \
        peft_modules(theirs)
    assert sorted({family.strip(family.to_hf(n)).rsplit(".", 1)[-1] for n in ours if not expert_of(n)}) == \
        sorted(modules)
    fields = peft_fields(fused_parts(ours), 2, 4)
    assert (fields.get("target_parameters", []), fields.get("rank_pattern", {})) == (
        parameters, dict(settings.rank_pattern))
    assert trainable_params(cfg, "lora", 2, "all") == sum(p.numel() for p in theirs.parameters() if p.requires_grad)


def lf_target_modules(model) -> list[str]:
    """LLaMA-Factory's `lora_target: all` on an image-text model, re-typed with its defaults (freeze_vision_tower,
    freeze_multi_modal_projector true; no freeze_language_model): find_all_linear_modules (model_utils/misc.py:28-52)
    leaves out lm_head, the projector's and the vision tower's modules (COMPOSITE_MODELS' projector_keys /
    vision_model_keys, visual.py: gemma3 registered with the defaults, multi_modal_projector / vision_tower) and keeps
    the last names; then adapter.py:237's patch_target_modules (visual.py:196-211) turns them into the full names of
    every module holding one of them, the forbidden ones (the towers) left out."""
    forbidden = ("lm_head", "multi_modal_projector", "vision_tower")
    names = {n.split(".")[-1] for n, m in model.named_modules() if not any(f in n for f in forbidden)
             and "Linear" in type(m).__name__ and "Embedding" not in type(m).__name__}
    return [n for n, _ in model.named_modules()
            if any(t in n for t in names) and not any(f in n for f in forbidden[1:])]


def test_lora_all_on_gemma3s_image_text_wrapper_adapts_llamafactorys_modules(tmp_path):
    """Gemma3ForConditionalGeneration (a tiny config, written by transformers): `all` adapts the language model's
    Linears that LLaMA-Factory's rule hands PEFT, none of the SigLIP tower's (its q_proj / k_proj / v_proj share the
    decoder's names) nor the projector's: our adapter loaded by PEFT onto transformers' model sits on the modules
    get_peft_model puts LoRA on for LLaMA-Factory's target list, and plan's trainable count is PEFT's."""
    import torch

    from pipeline.model import lora
    from pipeline.model.weights import load_model
    from tests.acceptance.test_gemma3_multimodal_cli import tiny_gemma3_vlm

    source = tiny_gemma3_vlm()
    source.save_pretrained(tmp_path / "vlm")
    targets = lf_target_modules(source)
    assert any(n.startswith("model.vision_tower.") and n.endswith("q_proj") for n, _ in source.named_modules())
    theirs = peft.get_peft_model(source, peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    want = peft_modules(theirs)
    assert want and all(n.startswith("model.language_model.layers.") for n in want), sorted(want)
    assert {n.rsplit(".", 1)[-1] for n in want} == set(ATTENTION + MLP)

    ours = load_model(tmp_path / "vlm")
    lora.apply_lora(ours, "all", rank=2, alpha=4)
    lora.save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(tmp_path / "vlm")})
    fresh = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "vlm", dtype=torch.float32)
    assert peft_modules(peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter")) == want
    assert trainable_params(read_config(tmp_path / "vlm"), "lora", 2, "all") == \
        sum(p.numel() for p in theirs.parameters() if p.requires_grad)
