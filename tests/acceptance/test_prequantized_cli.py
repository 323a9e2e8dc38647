"""A pre-quantized bitsandbytes 4-bit checkpoint as users bring it (unsloth/*-bnb-4bit: transformers' save_pretrained
of a BitsAndBytesConfig model, in the hub cache, HF_HUB_OFFLINE=1) under a LLaMA-Factory LoRA sft recipe with no
quantization key (its examples' form; LLaMA-Factory trains QLoRA on such a model as it is stored): plan, build, train,
merge as a user types them.

Golden values: transformers' from_pretrained of the same snapshot (its 4-bit model as stored, compute dtype fp32 as
the fixture was quantized with) and PEFT's PeftModel.from_pretrained of our adapter/ on it (its logits; its
print_trainable_parameters line is train's, the stored 4-bit weights counted by their parameters); merged/ (the 4-bit
weights dequantized, the adapter folded in, as unsloth's merged_16bit save writes it) loaded by transformers computes
the same logits.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from pipeline.recipe import resolve
from tests.acceptance.harness import (assert_close, cli_env, peft_size_line, pipeline, trained_model, write_data,
                                      write_hf_checkpoint, write_recipe)
from tests.helpers.hub_layout import hub_cache

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

HUB_ID = "unsloth/Tiny-Llama-bnb-4bit"


def reference(folder) -> torch.nn.Module:
    """transformers' model of the folder as stored; bitsandbytes' avx512_bf16 CPU shortcut off, as in ours."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").eval()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_hub_checkpoint(tmp_path: Path, hub_id: str, config: Any) -> tuple[Path, Path, dict[str, str], Path]:
    """(the hub snapshot, HF_HOME, the CLI's environment, the recipe): a tiny Llama quantized by transformers with the
    BitsAndBytesConfig `config` and save_pretrained'd, tokenizer files beside it as the hub repo holds them, in the
    hub cache under `hub_id`; LLaMA-Factory's LoRA sft recipe on it with no quantization key, and its data."""
    write_data(tmp_path / "data")
    plain, quantized, home = tmp_path / "plain", tmp_path / "bnb", tmp_path / "hf"
    write_hf_checkpoint(plain, "llama", small_vocab=True)
    transformers.AutoModelForCausalLM.from_pretrained(plain, quantization_config=config, dtype=torch.float32,
                                                      device_map="cpu").save_pretrained(quantized)
    for file in plain.iterdir():
        if not (quantized / file.name).exists():
            shutil.copy(file, quantized / file.name)
    recipe = write_recipe(tmp_path / "sft.yaml", model_name_or_path=hub_id, dataset_dir="data",
                          output_dir="saves/bnb", template="llama3", cutoff_len=256, max_samples=8,
                          learning_rate=0.05, export_dtype="fp32", zero_stage=2)
    return hub_cache(home, hub_id, quantized), home, cli_env(HF_HOME=str(home)), recipe


def plan_build_train_merge(recipe: Path, tmp_path: Path, env: dict[str, str]) -> tuple[str, str, str]:
    """The commands a user types, train as typed: (plan's stdout, train's stderr, merge's stderr)."""
    planned = pipeline("plan", recipe, cwd=tmp_path, env=env, as_typed=False).stdout
    pipeline("build", recipe, cwd=tmp_path, env=env, as_typed=False)
    trained = pipeline("train", recipe, cwd=tmp_path, env=env).stderr
    return planned, trained, pipeline("merge", recipe, cwd=tmp_path, env=env, as_typed=False).stderr


def assert_peft_on_the_stored_base(recipe: Path, tmp_path: Path, snapshot: Path, home: Path, monkeypatch: Any,
                                   trained: str,
                                   merged_base: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> None:
    """PEFT's adapter/ on transformers' model of the snapshot as stored computes our adapter model's logits, and its
    parameter line is the one train printed (`trained`: train's stderr); merged/
    loaded by transformers those of PEFT's adapter on `merged_base` of that model (the dequantized weights merge
    folds into; None: the 4-bit model itself, whose matmul multiplies by them), and holds no quantized weight."""
    out = tmp_path / "saves/bnb"
    x = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    monkeypatch.setenv("HF_HOME", str(home))  # trained_model resolves the hub id in this process
    with torch.no_grad():
        stored = reference(snapshot)
        before = stored(x).logits
        adapted = peft.PeftModel.from_pretrained(stored, out / "adapter", is_trainable=True).eval()
        assert peft_size_line(adapted) in trained.splitlines()
        golden = adapted(x).logits
        assert (golden - before).abs().max() > 1e-2  # the adapter trained
        assert_close(golden, trained_model(recipe, tmp_path)(x), rel=1e-5)
        folded = golden if merged_base is None else \
            peft.PeftModel.from_pretrained(merged_base(reference(snapshot)), out / "adapter").eval()(x).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert_close(folded, merged(x).logits, rel=1e-5)
    for key, value in merged.state_dict().items():  # a plain checkpoint: no 4-bit codes, no quantization_config
        assert value.dtype == torch.float32, key
    assert getattr(merged.config, "quantization_config", None) is None


def test_an_unsloth_bnb_4bit_checkpoint_trains_loads_in_peft_and_merges_dequantized(tmp_path, monkeypatch):
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    snapshot, home, env, recipe = bnb_hub_checkpoint(tmp_path, HUB_ID, config)
    planned, trained, merged = plan_build_train_merge(recipe, tmp_path, env)
    assert "quantization_bit 4: the base's Linear weights counted at 0.5 byte a parameter + their quantization" \
           " constants (4-bit nf4 with double quantization)" in planned
    assert "model: 14 Linears loaded as stored, bitsandbytes 4-bit (a pre-quantized checkpoint)" in trained
    assert f"merge: {HUB_ID} is a pre-quantized bitsandbytes checkpoint: the export holds its 4-bit weights" \
           " dequantized (14 Linears)" in merged
    assert_peft_on_the_stored_base(recipe, tmp_path, snapshot, home, monkeypatch, trained)

    # a LLaMA-Factory export recipe naming the run's adapter on the same hub id passes the adapter-fits-model rule:
    # the files' header shapes of the 4-bit Linears are the packed codes', not the weights' (export itself is merge's
    # dequantized fold, run above)
    export = write_recipe(tmp_path / "export.yaml", model_name_or_path=HUB_ID, adapter_name_or_path="saves/bnb",
                          dataset_dir="data", cutoff_len=256, max_samples=8, template="llama3",
                          export_dir="saves/exported", export_dtype="fp32")
    monkeypatch.chdir(tmp_path)
    assert resolve(export, [], command="export", env=env)["quantization_bit"] == 4
