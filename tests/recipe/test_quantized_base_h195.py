"""The rule quantization_fits tells its two refusals of a full fine-tune on a quantized base apart by what quantizes
the base (rules.quantization.QuantizedBase.source), not by comparing message strings: the recipe's quantization_bit
is refused with full / freeze in every command (LLaMA-Factory 0.9.5's _verify_model_args, hparams/parser.py:188-190,
runs in get_train_args, get_infer_args and get_eval_args), a pre-quantized checkpoint's only where the recipe trains
(LLaMA-Factory leaves quantization_bit unset for it; transformers' Trainer refuses training it,
trainer_utils.py validate_quantization_for_training)."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError

pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")

from tests.model.test_prequantized_bnb import bnb_config_only  # noqa: E402  (after the skips)

BENCHMARK = "task: mmlu_test\nfinetuning_type: full\n"


def test_the_refusal_follows_what_quantizes_the_base(tmp_path, monkeypatch):
    from pipeline.recipe import resolve
    from pipeline.recipe.rules.quantization import Quantizer, quantized_base

    monkeypatch.chdir(tmp_path)
    stored = bnb_config_only(tmp_path / "bnb", load_in_4bit=True, bnb_4bit_quant_type="nf4")
    from tests.acceptance.harness import FAMILIES

    plain = tmp_path / "plain"
    transformers.LlamaConfig(**FAMILIES["llama"].tiny).save_pretrained(plain)
    assert quantized_base({"model_name_or_path": stored, "quantization_bit": 4}).source is Quantizer.CHECKPOINT
    recipe = quantized_base({"model_name_or_path": plain, "quantization_bit": 4})
    assert recipe.source is Quantizer.RECIPE and recipe.fix == "remove quantization_bit"

    (tmp_path / "stored.yaml").write_text(f"model_name_or_path: {stored}\n" + BENCHMARK)
    assert resolve("stored.yaml", command="validate")["quantization_bit"] == 4  # derived; eval of it needs no training
    (tmp_path / "recipe.yaml").write_text(f"model_name_or_path: {plain}\nquantization_bit: 4\n" + BENCHMARK)
    with pytest.raises(UserError) as refused:
        resolve("recipe.yaml", command="validate")
    assert refused.value.messages == [
        "recipe.yaml:4:18: finetuning_type: given full with quantization_bit: 4: a quantized base cannot train: its"
        " 4/8-bit weights are frozen integer codes (LLaMA-Factory refuses it too: 'Quantization is only compatible"
        " with the LoRA or OFT method.'); set finetuning_type: lora (or oft), or remove quantization_bit"]
