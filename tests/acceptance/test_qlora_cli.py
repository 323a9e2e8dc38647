"""A LLaMA-Factory QLoRA recipe (its examples/train_qlora keys: quantization_bit 4, quantization_method bnb, nf4 with
double quantization), through the CLI as a user types it: build, train, merge, on a tiny save_pretrained Llama.

Golden values are transformers' and PEFT's: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=float32) on the same checkpoint, PeftModel.from_pretrained on
our adapter/ over it (what `generate --model adapter` computes: the base quantized as it trained; its
print_trainable_parameters line is train's, the 4-bit weights counted by their parameters, not their packed bytes),
and PEFT on the unquantized checkpoint for merged/ (merge folds the adapter into the checkpoint's own weights).
"""
from __future__ import annotations

import pytest
import torch

from tests.acceptance.harness import (assert_close, peft_size_line, pipeline, trained_model, write_data, write_hf_checkpoint,
                                      write_recipe)

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

def reference_path(model: torch.nn.Module) -> torch.nn.Module:
    """bitsandbytes' CPU eval shortcut off (avx512_bf16 CPUs repack with bf16 absmax; pipeline.model.quantize turns
    it off in ours): both models dequantize and multiply as on CUDA."""
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


QLORA = {"quantization_bit": 4, "quantization_method": "bnb", "quantization_type": "nf4", "double_quantization": True}


def test_a_qlora_recipe_trains_loads_in_peft_on_the_4bit_base_and_merges_unquantized(tmp_path):
    write_data(tmp_path / "data")
    write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True)
    recipe = write_recipe(tmp_path / "qlora.yaml", model_name_or_path=str(tmp_path / "llama"), dataset_dir="data",
                          output_dir="saves/qlora", template="llama3", cutoff_len=256, max_samples=8,
                          learning_rate=0.05, export_dtype="fp32", zero_stage=2, **QLORA)
    pipeline("build", recipe, cwd=tmp_path)
    trained = pipeline("train", recipe, cwd=tmp_path)
    assert "quantized to 4-bit nf4 with double quantization" in trained.stderr
    pipeline("merge", recipe, cwd=tmp_path)

    merged = assert_outputs_are_peft_on_the_4bit_base(recipe, tmp_path, tmp_path / "llama", tmp_path / "saves/qlora",
                                                      trained.stderr)
    assert evaluated(recipe, tmp_path) == "adapter"  # eval: the adapter on the quantized base, not merged/
    for key, value in merged.state_dict().items():  # a plain checkpoint: no 4-bit codes, no quantization_config
        assert value.dtype == torch.float32, key
    assert getattr(merged.config, "quantization_config", None) is None


def assert_outputs_are_peft_on_the_4bit_base(recipe, cwd, base, out, trained: str, changed: float = 1e-2):
    """PEFT's LoRA from out/adapter on transformers' 4-bit model of the checkpoint `base` gives our trained model's
    logits (and differs from that base by `changed`: the adapter trained) and its parameter line is the one train
    printed (`trained`: train's stderr); out/merged is PEFT's adapter on the unquantized checkpoint. Returns merged/ as
    transformers loads it."""
    x = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    quantized = reference_path(transformers.AutoModelForCausalLM.from_pretrained(
        base, quantization_config=config, dtype=torch.float32, device_map="cpu").eval())
    with torch.no_grad():
        before = quantized(x).logits
        adapted = peft.PeftModel.from_pretrained(quantized, out / "adapter", is_trainable=True).eval()
        assert peft_size_line(adapted) in trained.splitlines()
        golden = adapted(x).logits
        assert (golden - before).abs().max() > changed  # the adapter trained
        assert_close(golden, trained_model(recipe, cwd)(x), rel=1e-5)

        plain = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        unquantized = peft.PeftModel.from_pretrained(plain, out / "adapter").eval()(x).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert_close(unquantized, merged(x).logits, rel=1e-5)
    return merged


def evaluated(recipe, cwd) -> str:
    """Which weights `eval` takes as the tuned model (pipeline.evaluate.run.tuned_model), resolved in `cwd`."""
    import os

    from pipeline.evaluate.run import tuned_model
    from pipeline.recipe import resolve
    from tests.acceptance.harness import cli_env

    here = os.getcwd()
    os.chdir(cwd)
    try:
        return tuned_model(resolve(recipe, [], command="eval", env=cli_env(WORLD_SIZE="1"))).kind
    finally:
        os.chdir(here)
