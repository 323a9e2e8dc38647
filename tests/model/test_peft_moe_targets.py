"""A string target_modules on a sparse MoE model, resolved as PEFT 0.21 resolves it (pipeline.model.peft_moe_targets).

Golden values: transformers 5.24's own model of each family's config (its named_modules / named_parameters, built on
the meta device) and PEFT 0.21's own _resolve_string_target_modules on it; a pattern PEFT raises on (get_peft_model:
"is not supported", "should not contain an empty string") is one UserError here; and for the families checked by hand
before (Mixtral, gpt-oss, Qwen2-MoE, DeepSeek-V3), the modules get_peft_model itself makes LoRA layers of; where a
string reaches the fused experts (Qwen3-MoE, Mixtral, GLM-4.5, DeepSeek-V3), the outputs: PEFT's logits with its
adapter (B drawn) against ours with the adapter loaded onto per-expert Linears, transformers' on our merge, and each
merged fused expert tensor against W + B_e @ A_e * alpha / r computed by hand (gpt-oss: no string reaches its
experts in PEFT, and lora_target refuses them here, so there is no update to compare). The CLI
path (export of PEFT-written adapters, against PEFT's merge_and_unload) is
tests/acceptance/test_peft_regex_targets_moe_cli.py."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.model.adapter import family_of_model
from pipeline.model.config import read_config
from pipeline.model.expert_lora import FUSED, expert_of, router_of
from pipeline.model.gpt import GPTModel
from pipeline.model.lora import apply_lora, lora_modules
from pipeline.model.peft_moe_targets import EMBEDDING, LINEAR, OTHER, converted_names, plain_names, resolved_names, \
    transformers_names
from pipeline.model.peft_targets import target_names

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, tie_word_embeddings=False)
CONFIGS = {
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=48, moe_intermediate_size=16, head_dim=8, num_experts=4,
                                         num_experts_per_tok=2)),
    "glm4_moe": ("Glm4MoeConfig", dict(intermediate_size=48, moe_intermediate_size=16, head_dim=8, n_routed_experts=4,
                                       num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                                       first_k_dense_replace=1)),
    "deepseek_v3": ("DeepseekV3Config", dict(num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
                                             n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
                                             n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=16,
                                             kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=6)),
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(intermediate_size=48, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=24, num_experts=4, num_experts_per_tok=2)),
    "gpt_oss": ("GptOssConfig", dict(head_dim=8, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
}
PATTERNS = [
    "all-linear", "ALL-LINEAR",
    r"model\.layers\.0\.self_attn\.q_proj",  # one block's: every block's in PEFT 0.21
    r"model\.layers\.1\.mlp\.experts\.(gate|up|down)_proj",  # the transformers 4 key rebuilt: gate_proj / up_proj
    r".*\.mlp\.experts\.w[123]|model\.layers\.1\.mlp\.gate",  # Mixtral's names, and one block's router
    r".*\.(q_proj|v_proj|gate_proj|up_proj|down_proj|gate)",  # LLaMA-Factory's lora_target as a regex
    r".*shared_experts\.(gate|up|down)_proj|.*o_proj",  # the shared experts' Linears: their names go to the experts
    r".*gate_up_proj|.*weight",  # parameters alone: names of no module in transformers 5
    r"model\.layers\.\d\.self_attn\.(k|v)_proj",
]
RAISING = [r".*\.experts", r".*(q_proj|rotary_emb)", r".*act_fn", ".*", r"model\.layers\.1", r".*mlp\.router"]


def models(tmp_path: Path, family: str):
    """(ours, transformers 5's on the meta device) of the family's tiny config."""
    cls, keys = CONFIGS[family]
    config = getattr(transformers, cls)(**{**SMALL, **keys})
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(config)
    return GPTModel(read_config(tmp_path), seed=0), theirs


def kind(module) -> str:
    return LINEAR if isinstance(module, torch.nn.Linear) else EMBEDDING if isinstance(module, torch.nn.Embedding) \
        else OTHER


def peft_targets(theirs, pattern: str) -> tuple[set[str], set[str]] | str:
    """(target_modules PEFT keeps that name some module, target_parameters) after PEFT 0.21's own conversion of
    `pattern` on `theirs`, or what get_peft_model raises."""
    from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers

    config = peft.LoraConfig(r=2, target_modules=pattern)
    try:
        convert_peft_config_for_transformers(config, theirs, None)
    except ValueError:  # "target_modules should not contain an empty string"
        return "raises"
    names = [n for n, _ in theirs.named_modules()]
    if isinstance(config.target_modules, str):  # no conversion: PEFT's plain fullmatch
        import re

        chosen = {n for n in names if re.fullmatch(pattern, n)} if pattern.lower() != "all-linear" else None
    else:
        chosen = {n for n in names if any(n == t or n.endswith("." + t) for t in config.target_modules)}
    if chosen is not None and any(kind(theirs.get_submodule(n)) == OTHER for n in chosen):
        return "raises"
    if chosen is None:
        chosen = {n for n in names if kind(theirs.get_submodule(n)) == LINEAR and n != "lm_head"}
    return chosen, set(config.target_parameters or ())


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_the_names_are_transformers_5s_and_strings_resolve_as_peft_resolves_them(tmp_path, family):
    """Our derivation of transformers 5's module / parameter names equals its model's; each pattern selects the
    modules and parameters PEFT 0.21 adapts (ours through the list it resolves to, read by PEFT's suffix rule and
    its table), or is refused where PEFT raises."""
    ours, theirs = models(tmp_path, family)
    fam = family_of_model(ours)
    modules, params = transformers_names(ours, fam)
    assert modules == {n: kind(m) for n, m in theirs.named_modules()}
    assert sorted(params) == sorted(n for n, _ in theirs.named_parameters())
    table = converted_names(fam)
    assert bool(table) == (family not in ("gpt_oss", "qwen2_moe"))  # no conversion in PEFT: its plain reading
    for pattern in PATTERNS + RAISING:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = peft_targets(theirs, pattern)
        try:
            got = (resolved_names if table else plain_names)(ours, fam, pattern, "a/adapter_config.json")
        except UserError as err:
            assert want == "raises", (pattern, err.messages)
            assert len(err.messages) == 1 and err.messages[0].startswith("a/adapter_config.json: target_modules is")
            continue
        assert want != "raises", (pattern, got)
        if not got:  # target_names says it matches none: PEFT raises "Target modules ... not found"
            assert want == (set(), set()), pattern
            continue
        if table:
            rest = [t for t in got if t not in table]
            chosen = {n for n, k in modules.items() if k != OTHER and any(n == t or n.endswith("." + t) for t in rest)}
            got = chosen, {table[t] for t in got if t in table}
        else:
            got = set(got), set()
        assert got == want, pattern


# one pattern on the attention alone (DeepSeek-V3's latent attention: q_b_proj), PEFT's shorthand, one on the experts
# by their transformers 4 names (Mixtral's w1 / w2 / w3), and the experts' container (no Linear: PEFT raises)
ADAPTED = [r".*\.self_attn\.(q_proj|q_b_proj|o_proj)", "all-linear",
           r".*\.mlp\.experts\.(gate_proj|up_proj|down_proj|w1|w2|w3)", r".*\.mlp\.experts"]


def peft_adapted(theirs, pattern: str) -> set[str] | str:
    """The modules get_peft_model (PEFT 0.21) turns into LoRA layers for `pattern`: a Linear's name, a fused
    parameter's (ParamWrapper: the experts' gate_up_proj / down_proj, a router's weight) as module.parameter; or
    "raises"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = peft.get_peft_model(theirs, peft.LoraConfig(r=2, target_modules=pattern))
        except ValueError:  # "is not supported", NoMatchingPeftModuleError ("not found in the base model")
            return "raises"
    adapted = set()
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer):
            name = name.removeprefix("base_model.model.").replace(".base_layer", "")
            adapted.add(f"{name}.{module.parameter_name}" if isinstance(module, peft.tuners.lora.ParamWrapper)
                        else name)
    return adapted


def ours_adapted(tmp_path: Path, pattern: str) -> set[str] | str:
    """The Linears apply_lora wraps for the names target_names resolves `pattern` to (as load_adapter does), in
    transformers 5's names (an expert's Linear as its fused parameter, a router as its weight); or "raises" where
    target_names refuses it (one message)."""
    ours = GPTModel(read_config(tmp_path), seed=0)
    family = family_of_model(ours)
    try:
        targets = target_names(ours, pattern, Path("a/adapter_config.json"))
    except UserError as err:
        assert len(err.messages) == 1, err.messages
        return "raises"
    apply_lora(ours, targets, rank=2, alpha=4)
    names = set()
    for name in lora_modules(ours):
        if expert := expert_of(name):
            names.add(f"{family.prefix}{expert[0]}.experts.{FUSED[expert[2]]}")
        else:
            names.add(f"{family.prefix}{name}.weight" if router_of(name) else family.to_hf(name))
    return names


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss", "mixtral", "qwen2_moe"])
def test_a_string_adapts_the_modules_get_peft_model_adapts(tmp_path, family):
    """Per family whose strings were checked by hand before: the modules ours adapts for each ADAPTED pattern are the
    ones PEFT 0.21's get_peft_model makes LoRA layers of on transformers 5's model (the experts' fused parameters
    and the router through its conversion, not DeepSeek-V3's shared experts nor its dense block), or both refuse."""
    models(tmp_path, family)  # its config.json
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    for pattern in ADAPTED:  # a fresh model each time (get_peft_model injects in place), on the CPU: PEFT's
        want = peft_adapted(transformers.AutoModelForCausalLM.from_config(config), pattern)  # ParamWrapper needs data
        assert ours_adapted(tmp_path, pattern) == want, pattern
        assert want == "raises" or want, pattern


# (family, a string that reaches the routed experts): LoRA on transformers 5's fused experts (one 3-D gate_up_proj /
# down_proj per block, PEFT's ParamWrapper) against ours on the per-expert Linears; qwen3_moe everyday, the rest slow
FUSED_CASES = [("qwen3_moe", "all-linear"), ("mixtral", r".*\.mlp\.experts\.(w1|w2|w3)"),
               ("glm4_moe", "all-linear"), ("deepseek_v3", r".*\.mlp\.experts\.(gate_proj|up_proj|down_proj)")]


def expert_delta(tensors: dict, wrapper: str, experts: int, scale: float) -> torch.Tensor:
    """PEFT 0.21's ParamWrapper update of a fused (experts, out, in) parameter, by hand from the adapter file
    (tuners/lora/layer.py get_delta_weight): lora_A (experts * r, in) holds each expert's A, lora_B (out, r * experts)
    its B with the expert index fastest; expert e's update is B_e @ A_e * scale."""
    a, b = tensors[f"{wrapper}.lora_A.weight"], tensors[f"{wrapper}.lora_B.weight"]
    a, b = a.reshape(experts, -1, a.shape[-1]), b.reshape(b.shape[0], -1, experts)
    return torch.stack([b[:, :, e] @ a[e] for e in range(experts)]) * scale


@pytest.mark.parametrize("family, pattern", FUSED_CASES, ids=[f for f, _ in FUSED_CASES])
def test_a_strings_lora_on_fused_experts_computes_pefts_outputs(tmp_path, family, pattern):
    """A PEFT-written adapter with a string target_modules that reaches the routed experts (its B drawn, not zero) on
    a tiny checkpoint transformers wrote: ours, which keeps each expert's gate / up / down as its own Linear, loads it
    and computes PEFT's logits (PEFT's LoRA sits on the fused 3-D tensors); merged and saved, transformers loads it
    with those logits again, and each fused expert tensor it reads is the base's plus B_e @ A_e * alpha / r, computed
    here from the adapter file (gate_up_proj: PEFT's rank and alpha doubled, so the same alpha / r)."""
    from safetensors.torch import load_file

    from pipeline.model.lora import load_adapter, merge_lora
    from pipeline.model.weights import load_model, save_hf
    from tests.acceptance.harness import random_model

    cls, keys = CONFIGS[family]
    config = getattr(transformers, cls)(**{**SMALL, **keys})
    model_class = type(transformers.AutoModelForCausalLM.from_config(config))
    random_model(model_class, config).save_pretrained(tmp_path / "base")
    base = model_class.from_pretrained(tmp_path / "base").eval()
    fused = {n: p.detach().clone() for n, p in base.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))
             and ".experts." in n}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=pattern)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
    theirs.save_pretrained(tmp_path / "adapter")
    x = torch.randint(0, SMALL["vocab_size"], (2, 16), generator=gen)
    with torch.no_grad():
        want = theirs(input_ids=x).logits

    ours = load_model(tmp_path / "base").eval()
    with torch.no_grad():
        plain = ours(x)
        load_adapter(ours, tmp_path / "adapter")
        got = ours(x)
    assert (want - plain).abs().max() > 1e-2  # the adapter changes the output
    assert torch.allclose(got, want, atol=1e-4, rtol=0), (got - want).abs().max()
    merge_lora(ours)
    save_hf(ours, tmp_path / "merged")
    merged = model_class.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=x).logits, want, atol=1e-4, rtol=0)

    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    after = dict(merged.named_parameters())
    experts = config.num_local_experts if hasattr(config, "num_local_experts") else \
        getattr(config, "n_routed_experts", None) or config.num_experts
    checked = 0
    for name, before in fused.items():  # the gate_up_proj wrapper is nested inside down_proj's (base_layer)
        block, part = name.rsplit(".", 1)
        wrapper = f"base_model.model.{block}" + (".base_layer" if part == "gate_up_proj" else "")
        if f"{wrapper}.lora_A.weight" in tensors:
            delta = expert_delta(tensors, wrapper, experts, scale=4 / 2)
            assert torch.allclose(after[name], before + delta, atol=1e-5, rtol=0), name
            checked += 1
    assert checked == 2 * sum(".experts.down_proj" in n for n in fused), sorted(fused)
