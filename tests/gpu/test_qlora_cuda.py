"""QLoRA on CUDA (bitsandbytes' CUDA kernels; the CPU suite runs its torch path): an unchanged LLaMA-Factory QLoRA
recipe (quantization_bit 4, bnb, nf4, double quantization) trained under ZeRO 2 in bf16 on a tiny save_pretrained
Llama, its adapter loaded by PEFT on transformers' BitsAndBytesConfig 4-bit model of the same checkpoint on the same
device. bench/gpu_check.sh runs it on a lent GPU; PIPELINE_TEST_DEVICE=cpu on a CPU (tests/gpu/conftest.py).

The golden logits are computed in fp32 (bnb_4bit_compute_dtype float32) on both sides: our model as `generate --model
adapter` loads it (quantized on the host from the checkpoint, then moved), theirs quantized by transformers on the
device. A run that fell back to the CPU shows no GPU time in its profiled step.
"""
from __future__ import annotations

import json

import pytest

from tests.acceptance.harness import assert_close, pipeline, trained_model, write_data, write_hf_checkpoint, write_recipe

QLORA = {"quantization_bit": 4, "quantization_method": "bnb", "quantization_type": "nf4", "double_quantization": True}


def test_qlora_trains_on_the_device_and_peft_loads_its_adapter_on_transformers_4bit_model(tmp_path, device,
                                                                                          device_env):
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    import torch

    write_data(tmp_path / "data")
    write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True)
    recipe = write_recipe(tmp_path / "qlora.yaml", model_name_or_path=str(tmp_path / "llama"), dataset_dir="data",
                          output_dir="saves/qlora", template="llama3", cutoff_len=256, max_samples=8, bf16=True,
                          learning_rate=0.05, zero_stage=2, **QLORA)
    pipeline("build", recipe, cwd=tmp_path, env=device_env)
    profile = tmp_path / "profile.json"
    pipeline("train", recipe, cwd=tmp_path, env={**device_env, "PIPELINE_PROFILE": f"{profile}:1:1"})
    if device == "cuda":
        assert json.loads(profile.read_text())["device_busy_ms"] > 0
    logs = [json.loads(line) for line in (tmp_path / "saves/qlora/trainer_log.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in logs if "loss" in entry)

    x = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0)).to(device)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", quantization_config=config,
                                                               dtype=torch.float32, device_map=device).eval()
    for module in theirs.modules():  # the CPU eval shortcut off, as ours (pipeline.model.quantize)
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        golden = peft.PeftModel.from_pretrained(theirs, tmp_path / "saves/qlora/adapter").eval()(x).logits
        ours = trained_model(recipe, tmp_path).to(device)(x)
    assert_close(golden, ours, rel=1e-4)
