"""The rest of a pre-quantized bitsandbytes checkpoint's quantization_config, as transformers reads it back:
llm_int8_skip_modules (unsloth's dynamic quants, unsloth/*-unsloth-bnb-4bit: the Linears left in 16 bits),
bnb_4bit_compute_dtype (the 4-bit matmuls' dtype) and llm_int8_threshold (LLM.int8's outlier threshold).

Golden values: transformers 5.24's from_pretrained of the folder its own save_pretrained wrote
(quantizers/base.py get_modules_to_not_convert, quantizers_utils.should_convert_module, integrations/bitsandbytes.py
replace_with_bnb_linear: Linear4bit(compute_dtype=bnb_4bit_compute_dtype), Linear8bitLt(threshold=
llm_int8_threshold)); LLaMA-Factory 0.9.5's configure_quantization (model/model_utils/quantization.py:90-130) passes a
PTQ-quantized model no quantization_config of its own, so those are the checkpoint's whatever the recipe's bf16 / fp16;
plan's bytes by hand.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.model.build import load_for_inference

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from tests.model.test_prequantized_bnb import X, args, bnb_config_only, reference, write_bnb  # noqa: E402

# unsloth's form: the head, one Linear by its full path, a whole block's attention by prefix
SKIP = ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn"]
KEPT = {"lm_head", "layers.0.mlp.down_proj"} | {f"layers.1.self_attn.{p}_proj" for p in "qkvo"}


def test_a_dynamic_quant_keeps_the_skipped_linears_unquantized_as_transformers_does(tmp_path):
    folder = write_bnb(tmp_path / "dyn", bnb={"llm_int8_skip_modules": SKIP}, tie_word_embeddings=False)
    theirs = reference(folder)
    ours = load_for_inference(args(folder), device="cpu")
    linears = {name: type(m).__name__ for name, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {name for name, kind in linears.items() if kind == "Linear"} == KEPT
    assert linears == {name.removeprefix("model."): type(m).__name__ for name, m in theirs.named_modules()
                       if isinstance(m, torch.nn.Linear)}
    kept = ours.get_submodule("layers.1.self_attn.k_proj").weight
    assert kept.dtype == torch.float32 and torch.equal(kept, theirs.get_submodule("model.layers.1.self_attn.k_proj")
                                                       .weight)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X).logits, rtol=1e-5, atol=1e-5)
    from pipeline.model.lora import LinearWithLoRA, apply_lora
    from pipeline.model.quantize import dequantize_model, is_quantized

    apply_lora(ours, ["down_proj", "k_proj"], rank=2, alpha=4)
    down = ours.get_submodule("layers.0.mlp.down_proj")
    assert isinstance(down, LinearWithLoRA) and not is_quantized(down.linear)  # a plain LoRA on a kept one
    assert is_quantized(ours.get_submodule("layers.1.mlp.down_proj").linear)
    assert dequantize_model(ours) == 9  # merge's fold: the 4-bit ones, the kept ones as they are


@pytest.mark.parametrize("path, skipped", [
    ("model.layers.1.self_attn.q_proj", True), ("model.layers.11.self_attn.q_proj", False),  # a prefix, by modules
    ("model.layers.0.mlp.down_proj", True), ("model.layers.10.mlp.down_proj", False),
    ("lm_head", True), ("model.layers.3.mlp.gate_proj", True), ("model.layers.3.mlp.up_proj", False),  # a regex
    ("model.layers.2.mlp.gate_proj", False), ("model.vision_tower.blocks.0.fc1", True)])  # a suffix
def test_the_skip_patterns_match_as_transformers_should_convert_module(path, skipped):
    from transformers.quantizers.quantizers_utils import should_convert_module

    from pipeline.model.quant_layout import is_quantized_path

    skip = [*SKIP, "model.layers.[3-4].mlp.gate_proj", "vision_tower.blocks.0.fc1"]
    assert should_convert_module(path, skip) is not skipped  # the reference's answer, and ours
    assert is_quantized_path(path, skip) is not skipped
    assert is_quantized_path("layers.0.mlp.down_proj") and not is_quantized_path("lm_head")  # no list: the heads


def test_plan_counts_the_kept_linears_at_the_runs_precision(tmp_path, monkeypatch):
    from pipeline.recipe import resolve
    from pipeline.recipe.modelinfo import model_info
    from pipeline.recipe.plan import quantized_base, render

    monkeypatch.chdir(tmp_path)
    model = bnb_config_only(tmp_path / "m", load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                            llm_int8_skip_modules=SKIP)
    (tmp_path / "r.yaml").write_text(f"model_name_or_path: {model}\ndataset: alpaca_demo\ncutoff_len: 64\n")
    r = resolve("r.yaml")
    cfg = model_info(model).config
    assert (cfg.emb_dim, cfg.hidden_dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.tie_weights) == (
        32, 64, 32, 16, True)  # the harness's tiny Llama: the shapes the bytes below are counted from
    # 4-bit Linears: layer 0's q, k, v, o (32x32, 16x32, 16x32, 32x32) gate, up (64x32); layer 1's gate, up, down
    values = (1024 + 512 + 512 + 1024 + 2048 + 2048) + 3 * 2048
    # nf4 + double quantization: half a byte a value, one byte per 64-value block + 4 bytes per 256 blocks
    assert quantized_base(r, cfg, 2) == pytest.approx((values / 2 + values / 64 + 4 * values / 64 / 256, 2 * values))
    assert ("embeddings, norms and the 5 Linears the checkpoint keeps unquantized (llm_int8_skip_modules) at the"
            " run's precision") in render(r)  # the tied head is the embedding


def test_the_4bit_matmuls_run_in_the_checkpoints_compute_dtype(tmp_path):
    """unsloth's repos say bnb_4bit_compute_dtype bfloat16: transformers computes each 4-bit matmul in it in an fp32
    model too, and so does LLaMA-Factory (no quantization_config of its own for a PTQ model); a bf16 run of a float32
    one keeps float32."""
    folder = write_bnb(tmp_path / "bf", bnb={"bnb_4bit_compute_dtype": torch.bfloat16})
    theirs = reference(folder)
    ours = load_for_inference(args(folder), device="cpu")
    assert ours.get_submodule("layers.0.self_attn.q_proj").compute_dtype == torch.bfloat16
    with torch.no_grad():
        golden = theirs(X).logits
        torch.testing.assert_close(ours(X), golden, rtol=1e-5, atol=1e-5)
    fp32 = load_for_inference(args(write_bnb(tmp_path / "f32")), device="cpu", dtype=torch.bfloat16)
    assert fp32.get_submodule("layers.0.self_attn.q_proj").compute_dtype == torch.float32


def test_a_stored_8bit_checkpoints_outlier_threshold_is_read(tmp_path):
    folder = write_bnb(tmp_path / "q8", load_in_8bit=True, bnb={"llm_int8_threshold": 0.05})
    theirs = reference(folder)
    ours = load_for_inference(args(folder), device="cpu")
    assert ours.get_submodule("layers.0.mlp.down_proj").state.threshold == 0.05
    with torch.no_grad():
        torch.testing.assert_close(ours(X), theirs(X).logits, rtol=1e-5, atol=1e-5)
