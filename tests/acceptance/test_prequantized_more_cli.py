"""Pre-quantized bitsandbytes checkpoints beyond unsloth's plain *-bnb-4bit, as users bring them (transformers'
save_pretrained of a BitsAndBytesConfig model in the hub cache, HF_HUB_OFFLINE=1) under LLaMA-Factory's LoRA sft
recipe with no quantization key: unsloth's dynamic quants (*-unsloth-bnb-4bit: llm_int8_skip_modules keeps Linears
in 16 bits) and an 8-bit (load_in_8bit) one; plan, build, train and merge as a user types them; chat with a full
recipe on it, as LLaMA-Factory's (only training a full fine-tune of a quantized model is refused).

Golden values: PEFT's PeftModel.from_pretrained of our adapter/ on transformers' from_pretrained of the same snapshot
(the Linears it keeps unquantized plain, PEFT's plain LoRA on them); merged/ loaded by transformers: PEFT's adapter on
the base merge folds into (4 bits: the 4-bit model, whose matmul multiplies by the dequantized weights; 8 bits:
transformers' model.dequantize(), CB * SCB / 127, as LLM.int8 also quantizes each input). Forwards without an
attention mask: transformers' 8-bit model with one shifts an unpadded row's logits by ~1e-2. Chat: transformers'
greedy generate on the snapshot.
"""
from __future__ import annotations

import pytest
import torch

from tests.acceptance.harness import pipeline, refused, write_recipe
from tests.acceptance.test_prequantized_cli import (assert_peft_on_the_stored_base, bnb_hub_checkpoint,
                                                    plan_build_train_merge, reference)

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def test_an_unsloth_dynamic_quant_trains_its_kept_linears_plain_and_merges_the_mix(tmp_path, monkeypatch):
    hub_id = "unsloth/Tiny-Llama-unsloth-bnb-4bit"
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn"])
    snapshot, home, env, recipe = bnb_hub_checkpoint(tmp_path, hub_id, config)
    planned, trained, merged = plan_build_train_merge(recipe, tmp_path, env)
    # by hand: the 9 4-bit Linears hold 13,312 values (test_prequantized_dynamic's count), 4 bytes each in the fp32
    # run = 52.0 KiB; at nf4 with double quantization 13,312 / 2 + 13,312 / 64 + 4 * 13,312 / 64 / 256 = 6,867 bytes
    assert "(4-bit nf4 with double quantization): 6.7 KiB instead of 52.0 KiB; embeddings, norms and the 5 Linears" \
           " the checkpoint keeps unquantized (llm_int8_skip_modules) at the run's precision" in planned
    assert "model: 9 Linears loaded as stored, bitsandbytes 4-bit (a pre-quantized checkpoint), their matmuls in" \
           " float32 (bnb_4bit_compute_dtype); 6 stored unquantized" in trained
    assert "the export holds its 4-bit weights dequantized (9 Linears)" in merged
    assert_peft_on_the_stored_base(recipe, tmp_path, snapshot, home, monkeypatch, trained)

    # a full recipe on it chats with the stored model, as llamafactory-cli chat does (quantization_bit unset there:
    # _verify_model_args checks nothing); training it stays refused
    full = write_recipe(tmp_path / "full.yaml", model_name_or_path=hub_id, dataset_dir="data", template="llama3",
                        finetuning_type="full", output_dir="saves/full")
    said = pipeline("generate", full, "--model", "base", "--raw", "--prompt", "The answer is", cwd=tmp_path, env=env,
                    as_typed=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(snapshot)
    x = torch.tensor([tokenizer.encode("The answer is", add_special_tokens=False)])  # --raw: the text as is, no BOS
    with torch.no_grad():
        new = reference(snapshot).generate(x, max_new_tokens=4, do_sample=False)[0, x.shape[1]:].tolist()
    stops = {tokenizer.eos_token_id, *transformers.GenerationConfig.from_pretrained(snapshot).eos_token_id}
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    assert said.stdout == tokenizer.decode(new) + "\n"
    assert "a quantized base cannot train" in refused("train", full, cwd=tmp_path, as_typed=False)


def test_an_8bit_checkpoint_trains_loads_in_peft_and_merges_dequantized(tmp_path, monkeypatch):
    snapshot, home, env, recipe = bnb_hub_checkpoint(tmp_path, "someone/Tiny-Llama-8bit",
                                                     transformers.BitsAndBytesConfig(load_in_8bit=True))
    planned, trained, merged = plan_build_train_merge(recipe, tmp_path, env)
    assert "quantization_bit 8: the base's Linear weights counted at 1 byte a parameter" in planned
    assert "model: 14 Linears loaded as stored, bitsandbytes 8-bit (LLM.int8) (a pre-quantized checkpoint);" \
           in trained
    assert "the export holds its 8-bit (LLM.int8) weights dequantized (14 Linears)" in merged
    assert_peft_on_the_stored_base(recipe, tmp_path, snapshot, home, monkeypatch, trained,
                                   merged_base=lambda model: model.dequantize(dtype=torch.float32))
