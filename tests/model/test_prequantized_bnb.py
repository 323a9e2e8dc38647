"""A pre-quantized bitsandbytes checkpoint (the hub's unsloth/*-bnb-4bit; 8-bit too) as the frozen QLoRA base, read as
stored: its packed codes and quant state are the base, whatever the recipe's quantization keys say (they are derived
from config.json's quantization_config; one set otherwise is refused), nothing quantized again.

Fixtures: a tiny LlamaForCausalLM quantized by transformers 5.24 with BitsAndBytesConfig (compute dtype fp32) and
written by its save_pretrained, as unsloth writes its *-bnb-4bit repos. Golden values: transformers'
from_pretrained of that same folder (its Bnb4bitDeserialize: Params4bit.from_prequantized), on the CPU through
bitsandbytes 0.50.2's torch path; messages are LLaMA-Factory's words where it has them
(model/model_utils/quantization.py configure_quantization).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.build import ModelArgs, load_for_inference

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from tests.acceptance.harness import hf_model  # noqa: E402  (after the skips)

X = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(1))
# the tensors save_pretrained writes for one 4-bit Linear with double quantization: Params4bit's packed codes under
# `weight`, then QuantState.as_dict(packed=True) beside it; the names unsloth/Llama-3.2-1B-Instruct-bnb-4bit's
# model.safetensors holds per Linear (its safetensors index as the hub's file viewer lists it)
DOUBLE_QUANT_PARTS = ["weight", "weight.absmax", "weight.nested_absmax", "weight.nested_quant_map", "weight.quant_map",
                      "weight.quant_state.bitsandbytes__nf4"]


def write_bnb(folder: Path, quant_type: str = "nf4", double: bool = True, *, load_in_8bit: bool = False,
              bnb: dict | None = None, **overrides) -> Path:
    """A tiny Llama (fp32) quantized by transformers' BitsAndBytesConfig (`bnb`: more of its keys) and
    save_pretrained'd into `folder`, with a tokenizer-less config as the model tests need; the unquantized model is at
    `folder`-plain."""
    plain = folder.with_name(folder.name + "-plain")
    hf_model("llama", vocab_size=256, **overrides).save_pretrained(plain)
    config = transformers.BitsAndBytesConfig(load_in_8bit=True, **bnb or {}) if load_in_8bit else \
        transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                        bnb_4bit_use_double_quant=double,
                                        **{"bnb_4bit_compute_dtype": torch.float32, **(bnb or {})})
    transformers.AutoModelForCausalLM.from_pretrained(plain, quantization_config=config, dtype=torch.float32,
                                                      device_map="cpu").save_pretrained(folder)
    return folder


def reference(folder: Path) -> torch.nn.Module:
    """transformers' model of the folder as it is stored, bitsandbytes' avx512_bf16 CPU shortcut off as in ours."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def args(path: Path, **quantization) -> ModelArgs:
    return ModelArgs(model_name_or_path=str(path), seed=0, dropout=0.0, context_length=None, qkv_bias=None,
                     tie_word_embeddings=None, **quantization)


# nf4 with double quantization (unsloth's form) is also the CLI test's (tests/acceptance/test_prequantized_cli.py)
@pytest.mark.parametrize("quant_type, double", [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)])
def test_the_stored_4bit_base_is_transformers_model_of_the_same_folder(tmp_path, quant_type, double):
    folder = write_bnb(tmp_path / "q", quant_type, double)
    with open(folder / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    parts = sorted(k.removeprefix("model.layers.0.mlp.down_proj.") for k in header
                   if k.startswith("model.layers.0.mlp.down_proj."))
    if double and quant_type == "nf4":
        assert parts == DOUBLE_QUANT_PARTS
    assert parts == sorted(p.replace("nf4", quant_type) for p in DOUBLE_QUANT_PARTS if double or "nested" not in p)

    theirs = reference(folder)
    ours = load_for_inference(args(folder), device="cpu")
    linears = {name: type(m).__name__ for name, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.pop("lm_head") == "Linear" and set(linears.values()) == {"Linear4bit"} and len(linears) == 14
    q_proj = ours.get_submodule("layers.0.self_attn.q_proj")
    stored = theirs.get_submodule("model.layers.0.self_attn.q_proj")
    assert torch.equal(q_proj.weight.data, stored.weight.data)  # the file's codes, not quantized again
    assert (q_proj.weight.quant_state.quant_type, q_proj.weight.quant_state.nested) == (quant_type, double)
    assert not any(p.requires_grad for p in q_proj.parameters())
    with torch.no_grad():
        golden = theirs(X).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q-plain")(X).logits
        assert (golden - plain).abs().max() > 1e-3  # the 4-bit codes are what is matched
        torch.testing.assert_close(ours(X), golden, rtol=1e-5, atol=1e-5)
        # with the recipe's quantization keys equal to the stored ones: the same model, nothing quantized again
        again = load_for_inference(args(folder, quantization_bit=4, quantization_type=quant_type,
                                        double_quantization=double), device="cpu")
        torch.testing.assert_close(again(X), golden, rtol=1e-5, atol=1e-5)


def test_a_stored_8bit_base_is_transformers_model_of_the_same_folder(tmp_path):
    """load_in_8bit: the int8 weight (out x in) with its per-row SCB scales, as Linear8bitLt (LLM.int8, outlier
    threshold 6.0: BitsAndBytesConfig's default, what transformers reads back)."""
    folder = write_bnb(tmp_path / "q8", load_in_8bit=True)
    theirs = reference(folder)
    ours = load_for_inference(args(folder), device="cpu")
    linears = {name: type(m).__name__ for name, m in ours.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears.pop("lm_head") == "Linear" and set(linears.values()) == {"Linear8bitLt"} and len(linears) == 14
    stored = theirs.get_submodule("model.layers.0.mlp.down_proj")
    assert torch.equal(ours.get_submodule("layers.0.mlp.down_proj").weight.data, stored.weight.data)
    with torch.no_grad():
        golden = theirs(X).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "q8-plain")(X).logits
        assert (golden - plain).abs().max() > 1e-4
        torch.testing.assert_close(ours(X), golden, rtol=1e-5, atol=1e-5)
    from pipeline.model.quantize import dequantize_model  # what merge folds into: int8 codes x SCB / 127, by hand

    codes, scales = stored.weight.data.float(), theirs.get_submodule("model.layers.0.mlp.down_proj").state.SCB
    assert dequantize_model(ours) == 14
    torch.testing.assert_close(ours.get_submodule("layers.0.mlp.down_proj").weight, codes * scales[:, None] / 127)


def test_a_truncated_quant_state_is_one_message(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = write_bnb(tmp_path / "q", "fp4", False)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight.quant_map"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match="a bitsandbytes weight whose quant state cannot be read"):
        load_for_inference(args(folder), device="cpu")


def bnb_config_only(folder: Path, **quantization) -> str:
    """config.json alone (what resolve, validate and plan read), with the quantization_config BitsAndBytesConfig's
    to_dict writes."""
    from tests.acceptance.harness import FAMILIES

    config = transformers.LlamaConfig(**FAMILIES["llama"].tiny)
    config.quantization_config = transformers.BitsAndBytesConfig(**quantization).to_dict()
    config.save_pretrained(folder)
    return str(folder)


def test_the_quantization_keys_are_read_from_the_checkpoint_and_a_different_one_is_refused(tmp_path, monkeypatch):
    from pipeline.recipe import resolve
    from pipeline.recipe.plan import render

    monkeypatch.chdir(tmp_path)
    model = bnb_config_only(tmp_path / "m", load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    base = f"model_name_or_path: {model}\ndataset: alpaca_demo\ncutoff_len: 64\n"
    (tmp_path / "r.yaml").write_text(base)
    r = resolve("r.yaml")
    assert (r["quantization_bit"], r["quantization_type"], r["double_quantization"]) == (4, "nf4", True)
    assert {r.source(k) for k in ("quantization_bit", "quantization_type", "double_quantization")} == {"derived"}
    assert "quantization_bit 4: the base's Linear weights counted at 0.5 byte a parameter" in render(r)  # plan: stored bytes
    (tmp_path / "same.yaml").write_text(base + "quantization_bit: 4\nquantization_type: nf4\n")
    assert resolve("same.yaml")["double_quantization"] is True
    (tmp_path / "other.yaml").write_text(base + "quantization_bit: 8\nquantization_type: fp4\n")
    with pytest.raises(UserError) as refused:
        resolve("other.yaml")
    said = (f" with model_name_or_path: {model}, a pre-quantized bitsandbytes checkpoint stored as 4-bit nf4 with"
            " double quantization: its codes are the base and are not quantized again (LLaMA-Factory ignores it there:"
            " '`quantization_bit` will not affect on the PTQ-quantized models.'); remove {key} (it is read from the"
            " checkpoint's quantization_config: {value}), or point model_name_or_path at the unquantized checkpoint to"
            " quantize it as the recipe says")
    assert refused.value.messages == [
        "other.yaml:4:19: quantization_bit: given 8" + said.format(key="quantization_bit", value=4),
        "other.yaml:5:20: quantization_type: given 'fp4'" + said.format(key="quantization_type", value="'nf4'")]
    # BitsAndBytesConfig's defaults: 4-bit fp4 without double quantization; an 8-bit one sets quantization_bit alone
    assert resolve("r.yaml", [f"model_name_or_path={bnb_config_only(tmp_path / 'f', load_in_4bit=True)}"])[
        "quantization_type"] == "fp4"
    eight = resolve("r.yaml", [f"model_name_or_path={bnb_config_only(tmp_path / 'e', load_in_8bit=True)}"])
    assert (eight["quantization_bit"], eight.source("quantization_bit"), eight.source("quantization_type")) == (
        8, "derived", "default")  # the 4-bit keys have no effect at 8 bits
