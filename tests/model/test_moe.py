"""Qwen3-MoE's sparse blocks beyond the family tests (tests/model/test_families.py runs a Qwen3MoeForCausalLM through
every family test): which blocks are sparse (decoder_sparse_step, mlp_only_layers), the config.json spellings, and
what takes no adapter (the experts and the router are no Linear modules in transformers 5, checked against 5.24 and
PEFT 0.21). Golden values from transformers' Qwen3MoeForCausalLM."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.config import count_params, layout, read_config, trainable_params
from pipeline.model.weights import load_model, save_hf

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2,
            max_position_embeddings=64)


def saved(tmp_path, **changes):
    """save_pretrained of a random Qwen3MoeForCausalLM (noise on every tensor, so routing is not uniform)."""
    from tests.acceptance.harness import random_model

    model = random_model(transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(**{**TINY, **changes}))
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("changes,sparse", [
    (dict(mlp_only_layers=[1]), [True, False, True]),       # listed blocks keep a dense MLP
    (dict(decoder_sparse_step=2), [False, True, False]),    # (i + 1) % step == 0: every second block
])
def test_dense_and_sparse_blocks_as_transformers_builds_them(tmp_path, changes, sparse):
    ref = saved(tmp_path / "hf", **changes)
    assert [type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in ref.model.layers] == sparse
    ours = load_model(tmp_path / "hf").eval()
    assert [ours.cfg.sparse(i) for i in range(3)] == sparse and not ours.cfg.norm_topk_prob
    assert [n for n, _ in ours.named_parameters()] == [f"{m.name}.weight" for m in layout(ours.cfg)]
    assert count_params(ours.cfg) == sum(p.numel() for p in ref.parameters())
    x = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(x).logits
        assert torch.allclose(ours(x), want, atol=1e-5, rtol=0)
    save_hf(ours, tmp_path / "out")  # written back with the keys that make the same blocks sparse
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(back(x).logits, want, atol=1e-5, rtol=0)


def test_num_experts_is_read_in_both_spellings(tmp_path):
    """transformers 5's save_pretrained writes num_local_experts (Qwen3MoeConfig.attribute_map), the hub's
    config.json num_experts; a config.json without the MoE keys takes Qwen3MoeConfig's defaults."""
    saved(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["num_local_experts"] == 4 and "num_experts" not in raw
    assert read_config(tmp_path).n_experts == 4
    raw["num_experts"] = raw.pop("num_local_experts")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert read_config(tmp_path).n_experts == 4
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob"):
        raw.pop(key)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    theirs = transformers.Qwen3MoeConfig.from_pretrained(tmp_path)
    cfg = read_config(tmp_path)
    assert (cfg.n_experts, cfg.experts_per_token, cfg.moe_ffn_dim, cfg.norm_topk_prob) == (
        theirs.num_experts, theirs.num_experts_per_tok, theirs.moe_intermediate_size, theirs.norm_topk_prob)


@pytest.mark.parametrize("changes,words", [
    ({"num_experts_per_tok": 5}, "num_experts_per_tok 5 is more than num_experts 4"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size is 0; expected a positive integer"),
])
def test_bad_moe_configs_name_file_and_key(tmp_path, changes, words):
    from tests.model.test_families import assert_config_refused

    assert_config_refused(tmp_path, {**transformers.Qwen3MoeConfig(**TINY).to_dict(),
                                     "architectures": ["Qwen3MoeForCausalLM"], **changes}, words)


def test_lora_refuses_the_moe_mlp_by_a_path(tmp_path):
    """A path to the MLP side is refused, since PEFT 0.21 re-targets its name onto the fused expert tensors
    (target_parameters) whatever path it is given with; a dense block's MLP too (mlp_only_layers: PEFT maps gate_proj
    there as well). (lora_target: all on this model, whose dense block brings the expert names: test_lora_all_moe.)"""
    saved(tmp_path, mlp_only_layers=[1])
    cfg = read_config(tmp_path)
    rank = 2
    for target in ("mlp.gate", "mlp.down_proj", "layers.1.mlp.up_proj"):  # bare names only: test_moe_expert_lora
        with pytest.raises(UserError) as err:
            trainable_params(cfg, "lora", rank, ["q_proj", target])
        message = err.value.messages[0]
        assert message.startswith(f"lora_target: '{target}' picks MLP modules of this Qwen3MoeForCausalLM")
        assert "finetuning_type: full or freeze" in message and "down_proj alone" in message
    for extra in ("mlp", "experts", "layers.0.mlp.gate", "experts.1"):
        with pytest.raises(UserError) as err:
            trainable_params(cfg, "lora", rank, "q_proj", additional_target=extra)
        assert err.value.messages[0].startswith(f"additional_target: '{extra}' names the sparse MoE block")
    with pytest.raises(UserError) as err:  # not a Linear: the list of what can take LoRA names no MLP module
        trainable_params(cfg, "lora", rank, "experts")
    assert err.value.messages[0].endswith("available: all, self_attn.q_proj, self_attn.k_proj, self_attn.v_proj,"
                                          " self_attn.o_proj (in every block layers.0 .. layers.N; a full path such"
                                          " as layers.0.self_attn.q_proj picks one block)")
    # a dense block's MLP trained in full is an ordinary modules_to_save module
    assert trainable_params(cfg, "lora", rank, "q_proj", additional_target="layers.1.mlp") > 0


def test_load_balancing_loss_equals_transformers_with_padded_rows(tmp_path):
    """Qwen3MoeForCausalLM with output_router_logits and router_aux_loss_coef (what LLaMA-Factory's moe_aux_loss_coef
    sets): its loss is the cross-entropy + coef x aux_loss, the aux over the real tokens only (attention_mask); ours
    over the router logits our blocks kept equals both, and counting the pads would not."""
    from pipeline.model.moe import collect_router_logits, load_balancing_loss

    ref = saved(tmp_path, router_aux_loss_coef=0.3)
    ours = load_model(tmp_path).eval()
    collect_router_logits(ours)
    x = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0  # a right-padded row
    labels = x.masked_fill(mask == 0, -100)
    with torch.no_grad():
        out = ref(x, attention_mask=mask, labels=labels, output_router_logits=True)
        shifted = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
        ce = ours(x, attention_mask=mask, labels=shifted)
        aux = load_balancing_loss(ours, mask)
    assert aux == pytest.approx(float(out.aux_loss), rel=1e-5)
    assert float(ce + 0.3 * aux) == pytest.approx(float(out.loss), rel=1e-5)
    with torch.no_grad():
        ours(x, attention_mask=mask)
        assert float(load_balancing_loss(ours, None)) != pytest.approx(float(out.aux_loss), rel=1e-3)


def test_moe_aux_loss_coef_on_a_dense_model_is_a_notice(tmp_path):
    """LLaMA-Factory's configure_moe sets nothing for a dense model type: accepted with a notice at the key. On the
    MoE preset the key is silent."""
    from pipeline.recipe import resolve
    from pipeline.recipe.notices import notices

    (tmp_path / "r.yaml").write_text("model_name_or_path: qwen2.5-0.5b\ndataset: demo_alpaca\nmax_steps: 1\n"
                                     "moe_aux_loss_coef: 0.01\n", "utf-8")
    r = resolve(tmp_path / "r.yaml", command="plan")
    assert any(line.startswith("notice: ") and "r.yaml:4:20: moe_aux_loss_coef: accepted without effect: this qwen2 "
               "model has no sparse MoE blocks" in line for line in notices(r)), notices(r)
    (tmp_path / "r.yaml").write_text("model_name_or_path: qwen3-30b-a3b\ndataset: demo_alpaca\nmax_steps: 1\n"
                                     "moe_aux_loss_coef: 0.01\n", "utf-8")
    assert not any("moe_aux_loss_coef" in line for line in notices(resolve(tmp_path / "r.yaml", command="plan")))
    # stage rm on the MoE model: no router term in a reward model's loss (LLaMA-Factory's rm trainer passes no
    # labels; transformers' Qwen3MoeForSequenceClassification computes none): accepted without effect, said so
    r = resolve(tmp_path / "r.yaml", ["stage=rm", "dataset=demo_prefs"], command="plan")
    assert any("r.yaml:4:20: moe_aux_loss_coef: accepted without effect: stage rm's pairwise loss has no router term"
               in line for line in notices(r)), notices(r)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_expert_takes_a_gradient_under_zero_1_2(stage):
    """ZeRO 1-2 reduce the gradients of each rank's backward in buckets filled as they arrive; an expert that none
    of one rank's tokens chose gives no gradient there while another rank's does, so the ranks' buckets differ (a
    two-rank ZeRO-2 Qwen3-MoE run died in DeepSpeed's reduce_ipg_grads, measured). Under stage 1-2 every expert
    runs, on no rows where it got no token: the same outputs, a zero gradient, the same parameters in the same
    backward order on every rank (the flat ZeRO partition steps a zero gradient as it would a missing one). Stage 0
    (DeepSpeed's allreduce zero-fills missing gradients, and a single rank keeps transformers' skipped experts) and
    stage 3 (leaf modules) keep the experts without tokens out."""
    from pipeline.model.config import ModelConfig
    from pipeline.model.gpt import SparseMoeBlock
    from pipeline.model.moe import zero_stage_policy

    cfg = ModelConfig(family="qwen3_moe", vocab_size=8, context_length=8, emb_dim=8, n_layers=1, n_heads=2,
                      mlp="swiglu", norm="rmsnorm", positions="rope", mlp_bias=False, n_experts=4,
                      experts_per_token=1, moe_ffn_dim=4)
    torch.manual_seed(0)
    block, x = SparseMoeBlock(cfg), torch.randn(1, 1, 8)  # one token, top-1: three experts get nothing
    want = block(x)
    assert zero_stage_policy(block, {"zero_optimization": {"stage": stage}}) == ([SparseMoeBlock] if stage == 3 else [])
    out = block(x)
    out.sum().backward()
    assert torch.equal(out, want)
    with torch.no_grad():  # evaluation and generation: no gradient to align, so the idle experts stay idle
        ran = []
        hooks = [e.register_forward_hook(lambda m, i, o: ran.append(m)) for e in block.experts]
        block(x)
        assert len(ran) == 1
        for hook in hooks:
            hook.remove()
    idle = [e for e in block.experts if e.up_proj.weight.grad is None]
    if stage in (1, 2):
        assert not idle and sum(bool(e.up_proj.weight.grad.any()) for e in block.experts) == 1
    else:
        assert len(idle) == 3


def test_mlp_activation_bytes_counts_what_a_sparse_block_keeps_for_the_backward():
    """The plan's activation estimate (pipeline.model.config.mlp_activation_bytes, per token at 2 bytes a value)
    against what autograd keeps of one bf16 forward (saved_tensors_hooks, the parameters not counted): a sparse
    block keeps, for each expert a token runs, the token's gathered row and the expert's output as well as its
    SwiGLU tensors, about 2.3 times the dense MLP of the same active width that the estimate counted before.
    A dense MLP measured the same way is the check on the method (its dropout mask h is not kept at rate 0)."""
    from pipeline.model.config import ModelConfig, mlp_activation_bytes
    from pipeline.model.gpt import FeedForward, SparseMoeBlock

    common = dict(family="qwen3_moe", vocab_size=8, context_length=8, emb_dim=64, n_layers=1, n_heads=2,
                  mlp="swiglu", norm="rmsnorm", positions="rope", mlp_bias=False)
    moe = ModelConfig(**common, n_experts=16, experts_per_token=4, moe_ffn_dim=32)
    dense = ModelConfig(**common, ffn_dim=4 * 32)
    torch.manual_seed(0)
    for cfg, module in ((dense, FeedForward(dense)), (moe, SparseMoeBlock(moe))):
        measured = saved_bytes_per_token(module)
        assert 0.85 * measured <= mlp_activation_bytes(cfg) <= 1.15 * measured, (cfg.n_experts, measured)


def saved_bytes_per_token(module: torch.nn.Module, tokens: int = 128) -> float:
    """What autograd keeps of one bf16 forward of `module` (width 64) over `tokens` random rows, per token: the
    storages saved_tensors_hooks sees, the module's parameters not counted."""
    module = module.to(torch.bfloat16)
    x = torch.randn(1, tokens, 64, dtype=torch.bfloat16, requires_grad=True)
    params, kept = {p.untyped_storage().data_ptr() for p in module.parameters()}, {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(x)
    return sum(kept.values()) / tokens


def test_sparse_blocks_under_bf16_autocast_equal_transformers():
    """eval runs fp32 weights under bf16 autocast on CUDA (pipeline.evaluate.run._autocast); CPU autocast stands in.
    There the experts' Linears compute in bf16 while the block's sum is fp32: transformers' Qwen3MoeExperts casts each
    expert's weighted output to the sum's dtype before index_add_; ours raised (index_add_: self Float, source
    BFloat16). The router's logits are transformers' bitwise (its softmax fp32, its weights cast to the logits'
    bf16, as transformers'), so the same experts run; their outputs differ by bf16 rounding only (transformers
    multiplies by the fused gate_up_proj: 1e-3 of 0.19 seen)."""
    from pipeline.model.config import ModelConfig
    from pipeline.model.gpt import SparseMoeBlock

    ours = SparseMoeBlock(ModelConfig(family="qwen3_moe", vocab_size=8, context_length=8, emb_dim=32, n_layers=1,
                                      n_heads=2, mlp="swiglu", norm="rmsnorm", positions="rope", mlp_bias=False,
                                      n_experts=4, experts_per_token=2, moe_ffn_dim=16, norm_topk_prob=True))
    theirs = transformers.models.qwen3_moe.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock(transformers.Qwen3MoeConfig(
        **{**TINY, "norm_topk_prob": True}))
    theirs.experts.config._experts_implementation = "eager"  # its per-expert loop (the block is built bare)
    with torch.no_grad():  # our weights into transformers' fused layout (gate_up_proj = [gate_proj; up_proj])
        theirs.gate.weight.copy_(ours.gate.weight)
        for e, expert in enumerate(ours.experts):
            theirs.experts.gate_up_proj[e].copy_(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]))
            theirs.experts.down_proj[e].copy_(expert.down_proj.weight)
    hidden = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(ours.gate(hidden.reshape(-1, 32)), theirs.gate(hidden.reshape(-1, 32))[0])
        got, want = ours(hidden), theirs(hidden)
    assert got.dtype == want.dtype == torch.float32 and torch.allclose(got, want, atol=4e-3, rtol=0)


def test_a_regex_target_modules_on_a_moe_model_widens_as_peft_widens_it(tmp_path):
    """An adapter_config.json whose target_modules is a string (PEFT's regular expression) on a sparse MoE model: PEFT
    0.21's transformers 5 conversion widens it to the last part of each matched name, read as a list over every layer
    (pipeline.model.peft_moe_targets; PEFT's own resolution: tests/model/test_peft_moe_targets.py); a list goes on as
    before."""
    from pathlib import Path

    from pipeline.model.gpt import GPTModel
    from pipeline.model.peft_targets import target_names

    saved(tmp_path)
    model = GPTModel(read_config(tmp_path), seed=0)
    assert target_names(model, r"model\.layers\.0\.self_attn\.q_proj", Path("a/adapter_config.json")) == ["q_proj"]
    assert target_names(model, ["q_proj"], Path("a/adapter_config.json")) == ["q_proj"]
