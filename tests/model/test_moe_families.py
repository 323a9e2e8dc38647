"""Mixtral and Qwen2-MoE checkpoints (MixtralForCausalLM, Qwen2MoeForCausalLM) as transformers 5.24 writes them: what
each adds to the sparse block Qwen3-MoE brought (tests/model/test_moe.py), checked against transformers' source:

- Mixtral (models/mixtral/modeling_mixtral.py): MixtralTopKRouter (:96-111) takes softmax over the experts, top-k, and
  always renormalises (:109); Mistral's attention without biases (:84-87), sliding_window in every layer when set
  (:123, :245); the hub / save_pretrained name the block block_sparse_moe with experts' w1 (gate), w3 (up), w2 (down)
  (conversion_mapping.py:1359-1383, reversed on save); MixtralConfig (configuration_mixtral.py) rope theta 1e6
  (default_theta), router_aux_loss_coef 0.001, router_jitter_noise 0.0.
- Qwen2-MoE (models/qwen2_moe/modeling_qwen2_moe.py): Qwen2MoeSparseMoeBlock (:332-351) adds a shared expert
  (Qwen2MoeMLP of shared_expert_intermediate_size) gated by sigmoid(shared_expert_gate(x)), a Linear to 1 (:338, :347);
  norm_topk_prob (:325-326, false in the released configs); q/k/v biases by qkv_bias, none on o_proj (:222-225);
  decoder_sparse_step / mlp_only_layers (:358-363); Qwen2MoeConfig.__post_init__ windows the even-indexed layers below
  max_window_layers under use_sliding_window where layer_types is absent.
- LLaMA-Factory's lora_target: all (find_all_linear_modules) on transformers 5: Mixtral's attention projections;
  Qwen2-MoE's also the shared expert, shared_expert_gate and a dense block's MLP (real Linears there).
- Both add router_aux_loss_coef x load_balancing_loss_func (modeling_mixtral.py:475, modeling_qwen2_moe.py:512: the
  same function as Qwen3-MoE's, line for line) under output_router_logits, which LLaMA-Factory's configure_moe sets
  for model types mixtral and qwen2_moe; its add_z3_leaf_module makes MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock
  (the shared expert inside) ZeRO-3 leaves.
Tiny shapes: 2 layers, 4 experts, top-2.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.config import PRESETS, active_params, count_params, layout, lora_target_modules, read_config, \
    to_hf_config, trainable_params
from pipeline.model.generate import generate
from pipeline.model.lora import apply_lora, save_adapter
from pipeline.model.weights import load_model, save_hf
from tests.model.test_families import ids

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=32, num_hidden_layers=2, vocab_size=512, max_position_embeddings=64,
              num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, tie_word_embeddings=False)
VARIANTS = {
    # Mixtral: every block sparse, 4 experts of width intermediate_size, a 6-position window in every layer, GQA
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=24, num_local_experts=4,
                                                            sliding_window=6)),
    # Qwen2-MoE: block 0 sparse with a shared expert of width 40, block 1 a dense MLP of 48 (mlp_only_layers), top-k
    # weights not renormalised, q/k/v biases; use_sliding_window: a 5-position window in layer 0 (the even-indexed
    # layers below max_window_layers)
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=40, num_experts=4,
        mlp_only_layers=[1], use_sliding_window=True, sliding_window=5, max_window_layers=2)),
}


def hf_model(name: str, folder=None, **changes):
    """A random transformers model of the variant (COMMON and its keys with `changes`), saved with save_pretrained in `folder`."""
    from tests.acceptance.harness import random_model

    config_cls, model_cls, extra = VARIANTS[name]
    model = random_model(getattr(transformers, model_cls),
                         getattr(transformers, config_cls)(**{**COMMON, **extra, **changes}))
    if folder is not None:
        model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(VARIANTS))
def checkpoint(request, tmp_path_factory):
    """(variant, directory, transformers model)."""
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, hf_model(request.param, path)


def test_config_fields_logits_and_generation_equal_transformers(checkpoint):
    name, path, ref = checkpoint
    expect = {"mixtral": dict(family="mixtral", n_experts=4, experts_per_token=2, moe_ffn_dim=24, hidden_dim=24,
                              norm_topk_prob=True, qkv_bias=False, o_bias=False, shared_expert_dim=None,
                              layer_windows=(6, 6), rope_theta=1e6),
              "qwen2_moe": dict(family="qwen2_moe", n_experts=4, experts_per_token=2, moe_ffn_dim=16, hidden_dim=48,
                                norm_topk_prob=False, qkv_bias=True, o_bias=False, shared_expert_dim=40,
                                mlp_only_layers=(1,), layer_windows=(5, None))}[name]
    assert_reads_as_transformers(path, ref, expect)


def assert_reads_as_transformers(path, ref, expect: dict, greedy: bool = True) -> None:
    """The checkpoint `path` of transformers' model `ref` reads into the fields `expect`, our model's parameters are
    layout(cfg)'s and count as ref's, and its logits and (greedy) its greedy tokens are ref's
    (assert_computes_as_transformers)."""
    cfg = read_config(path)
    assert {k: getattr(cfg, k) for k in expect} == expect
    ours = load_model(path).eval()
    assert [n for n, _ in ours.named_parameters()] == [
        f"{m.name}.{p}" for m in layout(cfg) for p in (("weight", "bias") if m.bias else ("weight",))]
    assert_computes_as_transformers(ours, ref, greedy)


def assert_computes_as_transformers(ours, ref, greedy: bool = True) -> None:
    """Parameter count, then assert_logits_and_greedy_equal: ours as transformers' `ref` (fp32)."""
    assert count_params(ours.cfg) == sum(p.numel() for p in ref.parameters())
    assert_logits_and_greedy_equal(ref, ours, greedy)


def assert_logits_and_greedy_equal(ref, ours, greedy: bool = True) -> None:
    """Logits on rows of 14 (longer than the windows) unpadded, left- and right-padded, and (greedy) 12 greedy tokens
    with and without the KV cache equal transformers' model `ref`."""
    x = ids(0, (2, 14))
    left = torch.tensor([[0] * 3 + [1] * 11, [1] * 14])
    for mask in (None, left, left.flip(1)):  # rows longer than the windows; left and right padding
        with torch.no_grad():
            want, got = ref(x, attention_mask=mask).logits, ours(x, attention_mask=mask)
        real = torch.ones_like(x).bool() if mask is None else mask.bool()
        assert torch.allclose(got[real], want[real], atol=1e-5, rtol=0), (got[real] - want[real]).abs().max()
    if not greedy:
        return
    prompt = ids(1, (1, 9))[0].tolist()
    with torch.no_grad():
        expected = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, 9:].tolist()
    assert len(set(expected)) > 3 and all(generate(ours, prompt, max_new_tokens=12, eos_id=None, use_cache=cache)
                                          == expected for cache in (True, False))


def test_export_writes_the_hub_names_and_loads_in_transformers(checkpoint, tmp_path):
    from safetensors import safe_open

    name, path, ref = checkpoint
    save_hf(load_model(path), tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    with safe_open(path / "model.safetensors", "pt") as f:
        assert keys == set(f.keys())  # the names save_pretrained writes: the hub's
    if name == "mixtral":
        assert {"model.layers.0.block_sparse_moe.gate.weight",
                "model.layers.1.block_sparse_moe.experts.3.w2.weight"} <= keys
    else:
        assert {"model.layers.0.mlp.shared_expert_gate.weight", "model.layers.0.mlp.shared_expert.up_proj.weight",
                "model.layers.1.mlp.up_proj.weight"} <= keys
    assert_export_reads_back(tmp_path / "out", ref)


def lf_all_linear_modules(model) -> list[str]:
    """LLaMA-Factory 0.9.5's find_all_linear_modules (model/model_utils/misc.py:28-52) re-typed: the last name of every
    module whose class name holds "Linear" (not "Embedding"), lm_head left out."""
    return sorted({name.split(".")[-1] for name, module in model.named_modules()
                   if "Linear" in type(module).__name__ and "Embedding" not in type(module).__name__
                   and "lm_head" not in name})


def test_lora_all_adapts_what_llamafactory_and_peft_adapt(checkpoint, tmp_path):
    """lora_target: all is LLaMA-Factory's find_all_linear_modules on transformers 5's module tree, and adapts the
    modules PEFT's get_peft_model adapts for those names: on Mixtral the attention projections (the experts are fused
    3-D tensors, the router a MixtralTopKRouter); on Qwen2-MoE also the shared expert, shared_expert_gate and the dense
    block's MLP (real Linears; the experts are fused). PEFT loads our adapter with our logits, and merge agrees."""
    name, path, ref = checkpoint
    assert assert_lora_all_is_peft(path, ref, hf_model(name), tmp_path) == {
        "mixtral": ["k_proj", "o_proj", "q_proj", "v_proj"],
        "qwen2_moe": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "shared_expert_gate", "up_proj",
                      "v_proj"]}[name]


def assert_lora_all_is_peft(path, ref, fresh, tmp_path) -> list[str]:
    """Our lora_target: all on the checkpoint `path` (transformers' model `ref`) writes LLaMA-Factory's
    find_all_linear_modules as target_modules, adapts what PEFT's get_peft_model adapts on `fresh` (a copy of `ref`)
    for those names, and PEFT loads the adapter with our logits (merge too: assert_adapter_agrees). Returns the names."""
    peft = pytest.importorskip("peft")
    from pipeline.model.families import FAMILIES
    from pipeline.model.lora import lora_modules
    from tests.model.test_families import assert_adapter_agrees, randomise_lora

    ours = load_model(path).eval()
    apply_lora(ours, "all", rank=4, alpha=8)
    randomise_lora(ours, seed=1)
    save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(path)})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    expected = lf_all_linear_modules(ref)
    assert config["target_modules"] == expected
    theirs = peft.get_peft_model(fresh, peft.LoraConfig(r=4, target_modules=expected))
    adapted = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    family = FAMILIES[ours.cfg.family]
    assert {family.to_hf(n) for n in lora_modules(ours)} == adapted
    assert_adapter_agrees(peft, ours, path, tmp_path / "adapter", ids(7))
    return expected


@pytest.mark.parametrize("name,target,hf_name", [
    ("mixtral", "experts.0.w1", "block_sparse_moe.experts.0.w1"),  # one expert (bare names: test_moe_expert_lora)
    ("mixtral", "block_sparse_moe.gate", "block_sparse_moe.gate"),
    ("qwen2_moe", "gate", "mlp.gate"),                             # the router
    ("qwen2_moe", "experts.0.up_proj", "mlp.experts.0.up_proj"),
])
def test_lora_on_the_experts_or_the_router_is_refused_by_its_hub_name(tmp_path, name, target, hf_name):
    hf_model(name, tmp_path)
    cfg = read_config(tmp_path)
    with pytest.raises(UserError) as err:
        trainable_params(cfg, "lora", 2, ["q_proj", target])
    message = err.value.messages[0]
    architecture = VARIANTS[name][1]
    assert message.startswith(f"lora_target: '{target}' picks MLP modules of this {architecture} ({hf_name}")
    assert "finetuning_type: full or freeze" in message
    if name == "qwen2_moe":  # gate_proj: the shared expert's and the dense block's, as PEFT adapts that name there
        picked = lora_target_modules(cfg, ["gate_proj"])
        assert [m.name for m in picked] == ["layers.0.mlp.shared_expert.gate_proj", "layers.1.mlp.gate_proj"]


def test_load_balancing_loss_equals_transformers(checkpoint):
    """LLaMA-Factory's moe_aux_loss_coef sets output_router_logits and router_aux_loss_coef on model types mixtral and
    qwen2_moe; the model's loss is then CE + coef x aux_loss over the real tokens. Ours over the router logits our
    sparse blocks kept equals both (Qwen2-MoE's dense block keeps none: transformers records its routers only)."""
    from pipeline.model.moe import collect_router_logits, load_balancing_loss

    _, path, ref = checkpoint
    ref.router_aux_loss_coef = 0.3  # read from the config in __init__ (MixtralForCausalLM.router_aux_loss_coef)
    ours = load_model(path).eval()
    collect_router_logits(ours)
    x = ids(3, (2, 10))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    labels = x.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = ref(x, attention_mask=mask, labels=labels, output_router_logits=True)
        ce = ours(x, attention_mask=mask, labels=torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1))
        aux = load_balancing_loss(ours, mask)
    ref.router_aux_loss_coef = 0.001
    assert len(out.router_logits) == ours.cfg.n_layers - len(ours.cfg.mlp_only_layers)
    assert aux == pytest.approx(float(out.aux_loss), rel=1e-5)
    assert float(ce + 0.3 * aux) == pytest.approx(float(out.loss), rel=1e-5)


def test_the_sparse_block_with_its_shared_expert_is_the_zero3_leaf(checkpoint):
    """LLaMA-Factory's add_z3_leaf_module: MixtralSparseMoeBlock / Qwen2MoeSparseMoeBlock (which holds the shared
    expert and its gate) are the leaves; ours is the SparseMoeBlock holding the same parameters."""
    from pipeline.model.gpt import SparseMoeBlock
    from pipeline.model.moe import sparse_blocks, zero_stage_policy

    name, path, ref = checkpoint
    ours = load_model(path)
    assert zero_stage_policy(ours, {"zero_optimization": {"stage": 3}}) == [SparseMoeBlock]
    leaf = type(ref.model.layers[0].mlp)
    theirs = [sum(p.numel() for p in m.parameters()) for m in ref.modules() if isinstance(m, leaf)]
    assert [sum(p.numel() for p in b.parameters()) for b in sparse_blocks(ours)] == theirs


def test_mlp_activation_bytes_counts_the_shared_expert():
    """The plan's activation estimate of a Qwen2-MoE sparse block (its shared expert's SwiGLU, output and gate besides
    the routed experts') against what autograd keeps of one bf16 forward (test_moe's measurement)."""
    from pipeline.model.config import ModelConfig, mlp_activation_bytes
    from pipeline.model.gpt import SparseMoeBlock
    from tests.model.test_moe import saved_bytes_per_token

    cfg = ModelConfig(family="qwen2_moe", vocab_size=8, context_length=8, emb_dim=64, n_layers=1, n_heads=2,
                      mlp="swiglu", norm="rmsnorm", positions="rope", mlp_bias=False, n_experts=16,
                      experts_per_token=4, moe_ffn_dim=32, shared_expert_dim=128)
    torch.manual_seed(0)
    measured = saved_bytes_per_token(SparseMoeBlock(cfg))
    assert 0.85 * measured <= mlp_activation_bytes(cfg) <= 1.15 * measured, measured
    assert not 0.85 * measured <= mlp_activation_bytes(cfg.replace(shared_expert_dim=None)) <= 1.15 * measured


@pytest.mark.parametrize("preset,model_class,total,active", [
    # the cards: Mixtral-8x7B 46.7B total, 12.9B active; Qwen1.5-MoE-A2.7B 14.3B total, 2.7B active
    ("mixtral-8x7b", "MixtralForCausalLM", 46.7e9, 12.9e9),
    ("qwen1.5-moe-a2.7b", "Qwen2MoeForCausalLM", 14.3e9, 2.7e9),
])
def test_presets_count_as_transformers_and_the_cards(preset, model_class, total, active):
    cfg = PRESETS[preset]
    raw = to_hf_config(cfg)
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items()
                                                                          if k not in ("architectures", "torch_dtype")})
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert round(count_params(cfg) / 1e8) == round(total / 1e8) and round(active_params(cfg) / 1e8) == round(active / 1e8)


def test_qwen2_moe_without_layer_types_windows_the_even_layers_below_max_window_layers(tmp_path):
    """Qwen2MoeConfig.__post_init__ (not Qwen2's rule, from max_window_layers on): a hub config.json has no
    layer_types."""
    hf_model("qwen2_moe", tmp_path, num_hidden_layers=4, mlp_only_layers=[], max_window_layers=3)
    raw = json.loads((tmp_path / "config.json").read_text())
    del raw["layer_types"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    theirs = transformers.Qwen2MoeConfig.from_pretrained(tmp_path).layer_types
    assert theirs == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert read_config(tmp_path).layer_windows == tuple(5 if t == "sliding_attention" else None for t in theirs)


@pytest.mark.parametrize("name,changes,words", [
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise 0.1 is not supported; expected 0"),
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok 5 is more than num_local_experts 4"),
    ("qwen2_moe", {"shared_expert_intermediate_size": 0},
     "shared_expert_intermediate_size is 0; expected a positive integer"),
])
def test_bad_moe_configs_name_file_and_key(tmp_path, name, changes, words):
    config_cls, model_cls, extra = VARIANTS[name]
    raw = {**getattr(transformers, config_cls)(**COMMON, **extra).to_dict(), "architectures": [model_cls], **changes}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError) as err:
        read_config(tmp_path)
    assert len(err.value.messages) == 1 and err.value.messages[0].startswith(f"{tmp_path / 'config.json'}: {words}")


def test_mixtral_keys_a_config_leaves_out_take_mixtral_config_defaults(tmp_path):
    hf_model("mixtral", tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    for key in ("rope_parameters", "num_local_experts", "num_experts_per_tok", "max_position_embeddings",
                "num_key_value_heads", "rms_norm_eps", "router_aux_loss_coef", "sliding_window"):
        raw.pop(key)
    raw["num_attention_heads"] = 8  # MixtralConfig's 8 key/value heads must divide them
    (tmp_path / "config.json").write_text(json.dumps(raw))
    theirs = transformers.MixtralConfig.from_pretrained(tmp_path)
    cfg = read_config(tmp_path)
    assert (cfg.rope_theta, cfg.n_experts, cfg.experts_per_token, cfg.context_length, cfg.kv_heads, cfg.norm_eps,
            cfg.router_aux_loss_coef, cfg.layer_windows) == (
        theirs.rope_parameters["rope_theta"], theirs.num_local_experts, theirs.num_experts_per_tok,
        theirs.max_position_embeddings, theirs.num_key_value_heads, theirs.rms_norm_eps, theirs.router_aux_loss_coef,
        ())


@pytest.mark.parametrize("preset,reward_class", [("mixtral-8x7b", "MixtralForSequenceClassification"),
                                                 ("qwen1.5-moe-a2.7b", "Qwen2MoeForSequenceClassification")])
def test_moe_aux_loss_coef_under_rm_names_the_familys_reward_class(tmp_path, preset, reward_class):
    """The presets take moe_aux_loss_coef silently in sft; under stage rm the notice names the family's reward
    class, which computes no router loss (GenericForSequenceClassification), as for Qwen3-MoE."""
    from pipeline.recipe import resolve
    from pipeline.recipe.notices import notices

    (tmp_path / "r.yaml").write_text(f"model_name_or_path: {preset}\ndataset: demo_alpaca\nmax_steps: 1\n"
                                     "moe_aux_loss_coef: 0.01\n", "utf-8")
    assert not any("moe_aux_loss_coef" in line for line in notices(resolve(tmp_path / "r.yaml", command="plan")))
    r = resolve(tmp_path / "r.yaml", ["stage=rm", "dataset=demo_prefs"], command="plan")
    assert any("stage rm's pairwise loss has no router term" in line and line.endswith(f"{reward_class} (which"
               " computes none)") for line in notices(r)), notices(r)


def test_the_sparse_block_under_bf16_autocast_is_transformers_block(checkpoint):
    """Evaluation's bf16 autocast (CPU's stands in for CUDA's): the same experts run (the router's logits bitwise
    transformers'), the block's sum stays fp32 with the shared expert added, and the outputs differ by bf16 rounding
    only (transformers' grouped_mm experts round their own way; with its per-expert loop the block is bitwise ours:
    tests/model/test_moe_router_dtype.py, Mixtral's top-k weights kept fp32 as its router keeps them)."""
    _, path, ref = checkpoint
    ours, theirs = load_model(path).eval().layers[0].mlp, ref.model.layers[0].mlp
    hidden = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours.gate(hidden.reshape(-1, 32)), theirs.gate(hidden.reshape(-1, 32))[0])
        got, want = ours(hidden), theirs(hidden)
    assert got.dtype == want.dtype == torch.float32 and torch.allclose(got, want, atol=4e-3, rtol=0)


def assert_export_reads_back(out, ref) -> None:
    """transformers' AutoModelForCausalLM reads our export `out` as `ref`'s class with `ref`'s logits, bit for bit."""
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(ref)
    x = ids(6)
    with torch.no_grad():
        assert torch.equal(back(x).logits, ref(x).logits)
