"""Review h183 of the merged bf103fe..HEAD: paths the new features' tests did not take.

- A pre-quantized bitsandbytes checkpoint (the hub's unsloth/*-bnb-4bit) derives quantization_bit from its
  config.json (resolve._derive_stored_quantization); the QLoRA rules' messages then told a user who never wrote
  quantization_bit to "remove quantization_bit" (which changes nothing: the checkpoint's codes stay the base).
- LoRA on MoE experts (pipeline.model.expert_lora) is one fused tensor per block in PEFT: an expert the router sent no
  token in training keeps its zero update beside the trained ones, and PEFT merges that adapter; merge refused it as
  untrained layers to "leave out of lora_target" (which cannot name one expert).
- A bitsandbytes checkpoint refused at its config.json is a sparse MoE's now (dense ones are read as stored): its fix
  named quantization_bit, which a sparse MoE refuses too.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.recipe import resolve, rules

# tests/recipe/helpers.py's BASE on a checkpoint folder; the key added at line 5
RECIPE = "model_name_or_path: bnb4\ndataset: alpaca_demo\nnum_train_epochs: 3\ncutoff_len: 64\n"
# what transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
# bnb_4bit_use_double_quant=True).to_dict() writes into config.json (the keys quant_layout.stored_quantization reads)
BNB_4BIT = {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}


@pytest.fixture
def prequantized(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder `bnb4` whose config.json is a tiny Llama's saved pre-quantized (the rules read the config alone)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rules.core, "cuda_available", lambda: False)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "bnb4").mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 256, "hidden_size": 64,
              "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "float32", "quantization_config": BNB_4BIT}
    (tmp_path / "bnb4" / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


def refusal(recipe: str, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(UserError) as exc:
        resolve(recipe, overrides or [])
    return exc.value.messages


def test_a_prequantized_checkpoint_s_refusals_name_the_checkpoint_not_a_key_the_recipe_lacks(prequantized):
    """finetuning_type full (and ZeRO 3) on unsloth/*-bnb-4bit: quantization_bit is the checkpoint's, derived;
    the fix is the unquantized checkpoint, and what refuses a full fine-tune there is transformers' Trainer
    (trainer_utils.py validate_quantization_for_training: 'You cannot perform fine-tuning on purely quantized
    models.'), LLaMA-Factory leaving quantization_bit unset (model_utils/quantization.py:94-96)."""
    (prequantized / "r.yaml").write_text(RECIPE + "finetuning_type: full\n", encoding="utf-8")
    full = [m for m in refusal("r.yaml") if m.startswith("r.yaml:5:18: finetuning_type:")]
    assert full == [
        "r.yaml:5:18: finetuning_type: given full with model_name_or_path: bnb4, a pre-quantized bitsandbytes"
        " checkpoint stored as 4-bit nf4 with double quantization: a quantized base cannot train: its 4/8-bit weights"
        " are frozen integer codes (transformers' Trainer refuses it too: 'You cannot perform fine-tuning on purely"
        " quantized models.'); set finetuning_type: lora (or oft), or point model_name_or_path at the unquantized"
        " checkpoint it was made from"]
    (prequantized / "z.yaml").write_text(RECIPE + "zero_stage: 3\n", encoding="utf-8")
    zero = [m for m in refusal("z.yaml") if m.startswith("z.yaml:5:13: zero_stage:")]
    assert zero[0].startswith(
        "z.yaml:5:13: zero_stage: given 3 with model_name_or_path: bnb4, a pre-quantized bitsandbytes checkpoint")
    # a deepspeed JSON's stage 3 is train's preflight's to say, in the same words
    from pipeline.train.run import preflight

    (prequantized / "z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}), encoding="utf-8")
    (prequantized / "d.yaml").write_text(RECIPE + "deepspeed: z3.json\n", encoding="utf-8")
    with pytest.raises(UserError) as exc:
        preflight(resolve("d.yaml"))
    assert exc.value.messages[0].startswith("z3.json: zero_optimization.stage is 3 with model_name_or_path: bnb4, a"
                                            " pre-quantized bitsandbytes checkpoint stored as 4-bit nf4")
    assert "remove quantization_bit" not in " ".join(full + zero + exc.value.messages)


def test_merge_folds_expert_lora_whose_idle_experts_kept_their_zero_update():
    """A short run's router sent no token to expert 1..3 of the block: their update is zero (B starts at 0, as PEFT's
    ParamWrapper's lora_B columns of those experts), expert 0's and q_proj's trained. PEFT merges the one fused
    tensor (get_delta_weight: zero columns add nothing), so merge folds it too, the merged logits the adapter
    model's (merge_verified checks them)."""
    from pipeline.merge import merge_verified
    from pipeline.model.config import PRESETS
    from pipeline.model.gpt import GPTModel
    from pipeline.model.lora import apply_lora, lora_modules

    cfg = PRESETS["qwen3-30b-a3b"].replace(vocab_size=64, context_length=32, emb_dim=32, n_layers=1, n_heads=4,
                                           n_kv_heads=2, head_size=8, ffn_dim=48, n_experts=4, experts_per_token=2,
                                           moe_ffn_dim=16)
    model = GPTModel(cfg, seed=0).eval()
    apply_lora(model, ["q_proj", "gate_proj", "up_proj", "down_proj"], rank=2, alpha=4, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, wrapper in lora_modules(model).items():
            if (".experts.0." in name or "q_proj" in name) and not name.endswith("up_proj"):
                wrapper.lora.B.copy_(torch.randn(wrapper.lora.B.shape, generator=gen) * 0.1)
    check = merge_verified(model, [[1, 2, 3, 4, 5, 6]], "fp32")
    assert not lora_modules(check.model)
    assert check.report["logits"]["fp32"] <= check.report["tolerance"]["fp32"]
    # an adapter whose whole expert tensor is zero is still untrained, refused in one message
    model = GPTModel(cfg, seed=0).eval()
    apply_lora(model, ["q_proj", "down_proj"], rank=2, alpha=4, seed=0)
    with torch.no_grad():
        model.get_submodule("layers.0.self_attn.q_proj").lora.B.fill_(0.1)
    with pytest.raises(UserError, match=r"lora_B is all zero in 4 of its 5 adapted layers"):
        merge_verified(model, [[1, 2, 3]], "fp32")


def test_a_bnb_sparse_moe_checkpoint_s_fix_is_not_a_quantization_bit_that_is_refused_too(tmp_path):
    """unsloth/Qwen3-30B-A3B-bnb-4bit: a dense bnb checkpoint is read as stored now, so a bitsandbytes one refused at
    its config.json is a sparse MoE's, and quantization_bit is refused on a sparse MoE too (SPARSE_MOE_REFUSED): its
    fix said 'set quantization_bit: 4 to quantize it at load', which only led to that second refusal."""
    from pipeline.model.config import read_config

    folder = tmp_path / "moe-bnb4"
    folder.mkdir()
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 256,
              "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 4,
              "num_experts_per_tok": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "rope_theta": 1e6,
              "tie_word_embeddings": False, "quantization_config": BNB_4BIT}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UserError) as exc:
        read_config(str(folder))
    message = " ".join(exc.value.messages)
    assert "a pre-quantized checkpoint (quantization_config: quant_method bitsandbytes, 4-bit)" in message
    assert message.endswith("point model_name_or_path at the unquantized checkpoint it was made from, trained"
                            " unquantized (quantization_bit does not quantize a sparse MoE model here either)")
    assert "set quantization_bit" not in message
