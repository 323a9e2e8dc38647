"""OpenAI's gpt-oss (GptOssForCausalLM) as transformers 5.24 writes it (models/gpt_oss/modeling_gpt_oss.py and
configuration_gpt_oss.py), on a tiny fp32 config, against transformers' source:

- GptOssAttention (:259-328): q / k / v / o biases (attention_bias), a learned sink logit per head (:285) that the
  eager path concatenates beside the masked scores before the softmax and drops after it (:243-251); a sliding window
  (:284) in the layers layer_types names, else the even-indexed ones (configuration_gpt_oss.py:84-87); YaRN
  (rope_parameters, :89-97).
- GptOssTopKRouter (:117-130): a Linear with a bias, top-k of the logits, softmax over the chosen ones;
  GptOssExperts (:68-114): fused gate_up_proj (E, H, 2I) whose columns interleave gate and up (:83), down_proj
  (E, I, H), their biases; the clamped SwiGLU (:82-88): gate clamped above at limit 7, up to [-7, 7],
  (up + 1) * gate * sigmoid(1.702 gate).
- GptOssForCausalLM (:565-660): untied head; router_aux_loss_coef x load_balancing_loss_func under
  output_router_logits (:641-650), which LLaMA-Factory 0.9.5's configure_moe never sets for gpt_oss
  (model/model_utils/moe.py:146-176 list it nowhere): moe_aux_loss_coef is accepted without effect there and here.
- LLaMA-Factory's lora_target: all (find_all_linear_modules) takes q_proj / k_proj / v_proj / o_proj only (the router
  is a GptOssTopKRouter, the experts 3-D parameters).
Sinks far from 0 (-3..3), windows shorter than the rows, biases drawn as every other weight.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.model.config import (PRESETS, active_params, count_params, from_hf_config, model_tensors, read_config,
                                   to_hf_config)
from pipeline.model.weights import load_model, save_hf
from tests.model.test_families import assert_config_refused, ids
from tests.model.test_moe_families import (assert_computes_as_transformers, assert_export_reads_back,
                                           assert_lora_all_is_peft)

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=512, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                             "original_max_position_embeddings": 64, "rope_theta": 150000.0})


def hf_model(seed: int = 0, **changes):
    """A random GptOssForCausalLM of TINY (N(0, 0.1) on every tensor, biases and router included), its sinks spread
    over -3..3 so that they move each softmax."""
    from tests.acceptance.harness import random_model

    model = random_model(transformers.GptOssForCausalLM, transformers.GptOssConfig(**{**TINY, **changes}), seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.copy_(torch.linspace(-3.0, 3.0, layer.self_attn.sinks.numel()))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss")
    model = hf_model()
    model.save_pretrained(path)
    return path, model


def test_config_fields_logits_padding_and_generation_equal_transformers(checkpoint):
    path, ref = checkpoint
    cfg = read_config(path)
    expect = dict(family="gpt_oss", n_experts=4, experts_per_token=2, moe_ffn_dim=24, norm_topk_prob=True,
                  qkv_bias=True, o_bias=True, mlp_bias=True, router_bias=True, attention_sinks=True,
                  swiglu_limit=7.0, swiglu_alpha=1.702, tie_weights=False, layer_windows=(4, None), rope_theta=150000.0,
                  rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False})
    assert {k: getattr(cfg, k) for k in expect} == expect
    ours = load_model(path).eval()
    assert [n for n, _ in ours.named_parameters()] == [t.name for t in model_tensors(cfg)]  # layout: sinks, biases
    assert_computes_as_transformers(ours, ref)  # counts, padded logits, greedy with and without the cache


def test_the_sinks_change_the_logits_and_take_gradients(checkpoint):
    """Sinks at 0 are not the model without sinks (exp(0) = 1 joins every denominator); each sink gets a gradient."""
    path, _ = checkpoint
    ours = load_model(path)
    x = ids(2, (1, 10))
    ours(x, labels=torch.cat([x[:, 1:], torch.full((1, 1), -100)], 1)).backward()
    assert all(layer.self_attn.sinks.grad.abs().min() > 0 for layer in ours.layers)
    with torch.no_grad():
        before = ours(x)
        for layer in ours.layers:
            layer.self_attn.sinks.zero_()
        assert (ours(x) - before).abs().max() > 1e-3


def test_packed_rows_compute_each_example_alone(checkpoint):
    """neat_packing: sinks take the explicit path, packed rows through segment_mask (a window inside each)."""
    path, _ = checkpoint
    ours = load_model(path).eval()
    a, b = ids(3, (1, 7)), ids(4, (1, 6))
    row = torch.cat([a, b], 1)
    segments = torch.tensor([[1] * 7 + [2] * 6])
    positions = torch.cat([torch.arange(7), torch.arange(6)]).unsqueeze(0)
    with torch.no_grad():
        packed = ours(row, segment_ids=segments, position_ids=positions)
        alone = torch.cat([ours(a), ours(b)], 1)
    assert torch.allclose(packed, alone, atol=1e-5, rtol=0)


def test_freeze_of_self_attn_trains_llamafactorys_tensors_the_sinks_too(checkpoint):
    """finetuning_type freeze with freeze_trainable_modules self_attn: LLaMA-Factory's substring rule trains
    model.layers.1.self_attn.* of transformers' model, its sinks (a parameter of the attention itself) included; plan's
    count names the same tensors. Failed before: the sinks' name was looked up as a module (AttributeError)."""
    from pipeline.model.build import FinetuneArgs, apply_finetuning_type
    from pipeline.model.config import trainable_tensors
    from tests.compat.test_lf_freeze_modules import lf_trainable

    path, ref = checkpoint
    ft = FinetuneArgs("freeze", 8, None, 0.0, None, False, False, None, freeze_trainable_layers=1,
                      adapter_name_or_path=None, seed=0, freeze_trainable_modules="self_attn")
    model = apply_finetuning_type(load_model(path), ft)
    trained = {model.cfg.hf.to_hf(n) for n, p in model.named_parameters() if p.requires_grad}
    want = lf_trainable([n for n, _ in ref.named_parameters()], 2, 1, "self_attn", None)
    assert trained == want and "model.layers.1.self_attn.sinks" in want, trained ^ want
    planned = trainable_tensors(model.cfg, "freeze", freeze_trainable_layers=1, freeze_modules=("self_attn", None))
    assert {model.cfg.hf.to_hf(t.name) for t in planned} == want


def test_the_sparse_block_is_gptossmlp_where_the_clamp_binds(checkpoint):
    """Inputs scaled so that the gate and up projections pass the limit 7 on both sides: our block (router Linear with
    bias, the experts split from the fused tensors, the clamped SwiGLU) is transformers' GptOssMLP."""
    path, ref = checkpoint
    ours = load_model(path).eval()
    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(5)) * 60
    with torch.no_grad():
        want, _ = ref.model.layers[0].mlp(x)
        got = ours.layers[0].mlp(x)
        gate_up = x.reshape(-1, 32) @ ref.model.layers[0].mlp.experts.gate_up_proj[0]
    assert (gate_up[..., ::2] > 7).any() and (gate_up[..., 1::2] < -7).any() and (gate_up[..., 1::2] > 7).any()
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-5), (got - want).abs().max()


def test_export_writes_the_hub_names_and_loads_in_transformers(checkpoint, tmp_path):
    from safetensors import safe_open

    path, ref = checkpoint
    save_hf(load_model(path), tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    with safe_open(path / "model.safetensors", "pt") as f:
        assert keys == set(f.keys())  # the names save_pretrained writes: the hub's dequantized ones
    assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj_bias",
            "model.layers.0.mlp.router.bias", "model.layers.0.self_attn.sinks"} <= keys
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["layer_types"] == ["sliding_attention", "full_attention"] and written["sliding_window"] == 4
    assert_export_reads_back(tmp_path / "out", ref)


def test_lora_all_adapts_what_llamafactory_and_peft_adapt(checkpoint, tmp_path):
    """lora_target: all is LLaMA-Factory's find_all_linear_modules on GptOssForCausalLM: the attention projections
    (measured with PEFT 0.21: get_peft_model adapts those, nothing of the MLP); PEFT loads our adapter with our logits,
    and merged and exported, transformers computes them (assert_adapter_agrees)."""
    path, ref = checkpoint
    assert assert_lora_all_is_peft(path, ref, hf_model(), tmp_path) == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_load_balancing_loss_equals_transformers_and_llamafactory_trains_none(checkpoint):
    """Under output_router_logits transformers adds coef x load_balancing_loss_func over the biased router's logits:
    ours over what our blocks kept equals it. LLaMA-Factory 0.9.5's configure_moe sets output_router_logits for no
    gpt_oss, so moe_aux_loss_coef trains nothing there, nor here (moe_aux_coef None)."""
    from pipeline.model.moe import collect_router_logits, load_balancing_loss
    from pipeline.train.loop import moe_aux_coef

    path, ref = checkpoint
    ours = load_model(path).eval()
    collect_router_logits(ours)
    x = ids(3, (2, 10))
    mask = torch.ones_like(x)
    mask[1, 6:] = 0
    with torch.no_grad():
        out = ref(x, attention_mask=mask, output_router_logits=True)
        ours(x, attention_mask=mask)
        aux = load_balancing_loss(ours, mask)
    assert aux == pytest.approx(float(out.aux_loss), rel=1e-5)
    assert moe_aux_coef(type("Train", (), {"moe_aux_loss_coef": 0.01})(), load_model(path)) is None


@pytest.mark.parametrize("preset,total,active", [("gpt-oss-20b", 21e9, 3.6e9), ("gpt-oss-120b", 117e9, 5.1e9)])
def test_presets_count_as_transformers_and_the_cards(preset, total, active):
    """The card's active counts leave the embedding table out (a lookup, no compute): ours less it."""
    cfg = PRESETS[preset]
    raw = to_hf_config(cfg)
    config = transformers.AutoConfig.for_model(raw.pop("model_type"), **{k: v for k, v in raw.items()
                                                                          if k not in ("architectures", "torch_dtype")})
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"] and config.sliding_window == 128
    with torch.device("meta"):
        model = transformers.GptOssForCausalLM(config)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert from_hf_config({**config.to_dict(), "architectures": ["GptOssForCausalLM"]}) == cfg  # the config, read back
    assert round(count_params(cfg) / 1e9) == round(total / 1e9)
    assert round((active_params(cfg) - cfg.vocab_size * cfg.emb_dim) / 1e8) == round(active / 1e8)


@pytest.mark.parametrize("changes,words", [
    ({"quantization_config": {"quant_method": "fp8"}}, "quant_method fp8), whose stored quantized weights are not read here"),
    ({"swiglu_limit": -1}, "swiglu_limit is -1; expected a positive number"),
])
def test_what_is_not_implemented_is_refused_with_the_key(checkpoint, tmp_path, changes, words):
    path, _ = checkpoint
    assert_config_refused(tmp_path, {**json.loads((path / "config.json").read_text()), **changes}, words)


def test_dequantize_mxfp4_is_transformers_convert_moe_packed_tensors():
    """Hand-packed blocks (every byte: both nibbles, all 16 E2M1 codes) and scales around 2^0, in bf16 and fp32."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    from pipeline.model.weights import dequantize_mxfp4

    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 10, 2, 16), generator=gen, dtype=torch.uint8)
    blocks[0, 0, 0] = torch.tensor([0x10 * hi + lo for hi, lo in zip(range(16), reversed(range(16)))])
    scales = torch.randint(120, 134, (3, 10, 2), generator=gen, dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float32):
        got = dequantize_mxfp4(blocks, scales, dtype)
        assert got.dtype == dtype and torch.equal(got, convert_moe_packed_tensors(blocks, scales, dtype=dtype))
    first = dequantize_mxfp4(blocks, scales, torch.float32)[0, :2, 0].tolist()  # byte 0x0F: low nibble first
    assert first == [-6.0 * 2 ** (int(scales[0, 0, 0]) - 127), 0.0]


def test_an_mxfp4_checkpoint_loads_as_transformers_dequantizes_it_and_exports_dequantized(tmp_path):
    """The hub's layout: the experts' gate_up_proj / down_proj as _blocks / _scales (uint8) beside bf16-or-fp32 biases,
    quantization_config mxfp4. transformers' Mxfp4Config(dequantize=True) (what LLaMA-Factory 0.9.5 loads it with,
    model/model_utils/quantization.py:103-107) computes our logits; our export writes the dequantized experts under
    the fused names and no quantization_config, as transformers' save_pretrained of that model does."""
    from safetensors.torch import load_file, save_file

    hf_model(intermediate_size=32).save_pretrained(tmp_path / "plain")  # MXFP4 groups of 32 along each row
    tensors = load_file(tmp_path / "plain" / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for i in range(2):
        for proj, rows, cols in (("gate_up_proj", 64, 32), ("down_proj", 32, 32)):
            key = f"model.layers.{i}.mlp.experts.{proj}"
            del tensors[key]
            tensors[key + "_blocks"] = torch.randint(0, 256, (4, rows, cols // 32, 16), generator=gen, dtype=torch.uint8)
            tensors[key + "_scales"] = torch.randint(122, 127, (4, rows, cols // 32), generator=gen, dtype=torch.uint8)
    (tmp_path / "q").mkdir()
    save_file(tensors, tmp_path / "q" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    ref = transformers.GptOssForCausalLM.from_pretrained(
        tmp_path / "q", quantization_config=transformers.Mxfp4Config(dequantize=True), dtype=torch.float32).eval()
    ours = load_model(tmp_path / "q").eval()
    x = ids(8)
    with torch.no_grad():
        want = ref(x).logits
        assert torch.allclose(ours(x), want, atol=1e-5, rtol=0)
    save_hf(ours, tmp_path / "out", dtype="bf16")
    assert "quantization_config" not in json.loads((tmp_path / "out" / "config.json").read_text())
    assert load_file(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.experts.gate_up_proj"].dtype \
        == torch.bfloat16
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(back(x).logits, want, atol=0.1, rtol=0)  # bf16 weights


@pytest.mark.parametrize("sinks", [False, True])
def test_activation_bytes_count_what_a_block_with_sinks_keeps_for_the_backward(sinks):
    """plan's activation estimate of a gpt-oss block against what autograd keeps of one bf16 training forward, within
    15% (test_gemma's measurement): the sink path keeps ~10 bytes per score (measured 9.8) where the kernels keep 5.
    Failed before with the sinks (5,592 estimated per token, 8,040 measured)."""
    from pipeline.model.config import activation_bytes
    from pipeline.model.gpt import TransformerBlock, rope_cos_sin
    from pipeline.model.rope import rope_inv_freq
    from tests.model.test_gemma import _Applied
    from tests.model.test_moe import saved_bytes_per_token

    cfg = PRESETS["gpt-oss-20b"].replace(vocab_size=8, context_length=256, emb_dim=64, n_layers=1, n_heads=4,
                                         n_kv_heads=2, head_size=32, n_experts=4, experts_per_token=2, moe_ffn_dim=64,
                                         ffn_dim=64, layer_windows=(), rope_scaling=None, attention_sinks=sinks)
    torch.manual_seed(0)
    block, rope = TransformerBlock(cfg), rope_cos_sin(rope_inv_freq(cfg), torch.arange(128)[None], torch.bfloat16)
    measured = saved_bytes_per_token(_Applied(lambda x: block(x, None, None, rope), block), 128)
    assert 0.85 * measured <= activation_bytes(cfg, 128, 1) / 128 <= 1.15 * measured, measured


def test_rmsnorm_in_bf16_is_gptossrmsnorms():
    """GptOssRMSNorm (modeling_gpt_oss.py:48-62) multiplies by its weight in fp32 and casts once: bitwise ours in bf16
    (norm_scale_fp32), where Llama's order (cast, then scale in bf16) differs. Failed before: not equal."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

    from pipeline.model.gpt import make_norm

    gen = torch.Generator().manual_seed(3)
    theirs = GptOssRMSNorm(64, eps=1e-5).to(torch.bfloat16)
    ours = make_norm(PRESETS["gpt-oss-20b"], 64).to(torch.bfloat16)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(64, generator=gen) + 1)
        ours.weight.copy_(theirs.weight)
    x = torch.randn(4, 7, 64, generator=gen).to(torch.bfloat16) * 3
    assert torch.equal(ours(x), theirs(x))
