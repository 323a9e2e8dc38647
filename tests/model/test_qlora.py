"""quantization_bit (QLoRA): the base as transformers' bitsandbytes quantizer loads it, LoRA on it as PEFT's, DoRA on
the dequantized weight, and what bitsandbytes' absence says.

Golden values are transformers' BitsAndBytesConfig on the same save_pretrained checkpoint (compute dtype fp32, on
the CPU: transformers 5.24 quantizes there through bitsandbytes' torch path) and PEFT's LoRA on that model after
loading our adapter; the byte counts are bitsandbytes' Params4bit layout counted by hand.
"""
from __future__ import annotations

import sys

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.build import ModelArgs, load_for_inference
from pipeline.model.quant_layout import Quantization, base_weight_bytes, quantized_bytes

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tests.acceptance.harness import assert_close, hf_model  # noqa: E402  (after the skips: it imports transformers lazily)


def reference_path(model: torch.nn.Module) -> torch.nn.Module:
    """bitsandbytes' avx512_bf16 CPU eval shortcut off, as pipeline.model.quantize turns it off in ours."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def args(path, **quantization) -> ModelArgs:
    return ModelArgs(model_name_or_path=str(path), seed=0, dropout=0.0, context_length=None, qkv_bias=None,
                     tie_word_embeddings=None, **quantization)


def bnb_config(bits: int, quant_type: str = "nf4", double: bool = True):
    if bits == 8:
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                           bnb_4bit_use_double_quant=double, bnb_4bit_compute_dtype=torch.float32)


def saved(tmp_path_factory, family: str):
    path = tmp_path_factory.mktemp(family)
    ids = {"bos_token_id": 0, "eos_token_id": 0} if family == "gpt2" else {}
    hf_model(family, vocab_size=256, **ids).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """A tiny Qwen3 (untied head, q/k norms) save_pretrained'd."""
    return saved(tmp_path_factory, "qwen3")


X = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family, bits, quant_type, double", [("qwen3", 4, "fp4", False), ("qwen3", 8, "nf4", True),
                                                             ("gpt2", 4, "nf4", True)])
def test_the_quantized_base_is_transformers_bitsandbytes_model(qwen3, tmp_path_factory, family, bits, quant_type,
                                                               double):
    """GPT-2: transformers quantizes its Conv1D weights transposed (out x in), as our Linears hold them."""
    path = qwen3 if family == "qwen3" else saved(tmp_path_factory, family)
    theirs = reference_path(transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(bits, quant_type, double), dtype=torch.float32, device_map="cpu")).eval()
    ours = load_for_inference(args(path, quantization_bit=bits, quantization_type=quant_type,
                                   double_quantization=double), device="cpu")
    linears = {name: type(m).__name__ for name, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.pop("lm_head") == "Linear"  # get_keys_to_not_convert: the output embedding
    assert set(linears.values()) == {"Linear4bit" if bits == 4 else "Linear8bitLt"} and len(linears) >= 8
    assert type(ours.embed_tokens) is torch.nn.Embedding
    with torch.no_grad():
        golden, plain = theirs(X).logits, transformers.AutoModelForCausalLM.from_pretrained(path)(X).logits
        assert (golden - plain).abs().max() > 1e-4  # the quantization is there to be matched
        torch.testing.assert_close(ours(X), golden, rtol=1e-5, atol=1e-5)


def test_our_lora_on_the_4bit_base_is_peft_lora_on_transformers_4bit_model(qwen3, tmp_path):
    from pipeline.model.lora import apply_lora, lora_modules, save_adapter

    ours = load_for_inference(args(qwen3, quantization_bit=4), device="cpu")
    apply_lora(ours, "all", rank=4, alpha=8, seed=0)
    with torch.no_grad():
        for layer in lora_modules(ours).values():
            layer.lora.B.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    assert {str(p.dtype) for p in ours.parameters() if p.requires_grad} == {"torch.float32"}
    save_adapter(ours.eval(), tmp_path / "adapter")
    theirs = reference_path(transformers.AutoModelForCausalLM.from_pretrained(
        qwen3, quantization_config=bnb_config(4), dtype=torch.float32, device_map="cpu")).eval()
    with torch.no_grad():
        before = theirs(X).logits
        golden = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()(X).logits
        assert (golden - before).abs().max() > 1e-2
        assert_close(golden, ours(X), rel=1e-5)  # within 1e-5 of the logits' spread (summation order)


def test_dora_on_a_quantized_linear_is_dora_on_its_dequantized_weight():
    from pipeline.model.lora import LinearWithDoRA
    from pipeline.model.quantize import dequantized_weight, quantize_model

    holder = torch.nn.Sequential(torch.nn.Linear(128, 64))
    quantize_model(holder, Quantization(4), torch.float32)
    dense = torch.nn.Linear(128, 64)
    with torch.no_grad():
        dense.weight.copy_(dequantized_weight(holder[0]))
        dense.bias.copy_(holder[0].bias)
    pair = [LinearWithDoRA(layer, 4, 8, dropout=0.2, generator=torch.Generator().manual_seed(0)) for layer in
            (holder[0], dense)]
    with torch.no_grad():
        for layer in pair:
            layer.lora.B.normal_(generator=torch.Generator().manual_seed(3))
    x = torch.randn(3, 128)
    torch.testing.assert_close(pair[0].magnitude, pair[1].magnitude)
    for mode in (False, True):
        torch.manual_seed(4)
        quantized = pair[0].train(mode)(x)
        torch.manual_seed(4)
        torch.testing.assert_close(quantized, pair[1].train(mode)(x), rtol=1e-5, atol=1e-5)


def test_4bit_bytes_are_half_a_byte_a_parameter_plus_the_block_constants():
    # 4096 x 4096: 16,777,216 values -> 8 MiB of codes; 262,144 blocks of 64: fp32 absmax 1 MiB, or with double
    # quantization 1 byte each (256 KiB) + 1,024 fp32 second-level absmax (4 KiB)
    assert quantized_bytes(4096, 4096, Quantization(4, double_quant=False)) == 8 * 2**20 + 2**20
    assert quantized_bytes(4096, 4096, Quantization(4)) == 8 * 2**20 + 2**18 + 4096
    assert quantized_bytes(4096, 4096, Quantization(8)) == 16 * 2**20 + 4 * 4096
    # the heads stay at the run's width; the others count quantized
    linears = [("layers.0.mlp.up_proj", 4096, 4096), ("lm_head", 4096, 4096)]
    assert base_weight_bytes(linears, Quantization(4), 2) == (8 * 2**20 + 2**18 + 4096, 2 * 16 * 2**20)


def test_without_bitsandbytes_a_qlora_recipe_gets_one_message(monkeypatch, qwen3):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(UserError, match=r"quantization_bit needs bitsandbytes.*requirements.txt: bitsandbytes=="):
        load_for_inference(args(qwen3, quantization_bit=4), device="cpu")


def test_a_sparse_moe_model_is_refused(tmp_path):
    hf_model("qwen3_moe", vocab_size=256).save_pretrained(tmp_path)
    with pytest.raises(UserError, match="sparse MoE model is not quantized here"):
        load_for_inference(args(tmp_path, quantization_bit=4), device="cpu")
