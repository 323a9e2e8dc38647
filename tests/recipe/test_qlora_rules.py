"""quantization_bit (QLoRA) in recipes: what runs, what LLaMA-Factory 0.9.5 refuses too (one message at the key's
file:line), and what `plan` counts for the quantized base (hand-counted for the tiny preset)."""
from __future__ import annotations

import pytest

from pipeline.recipe import resolve
from pipeline.recipe.plan import estimate_memory, render
from tests.recipe.helpers import BASE
from tests.recipe.test_oft_rules import errors

QLORA = BASE + "quantization_bit: 4\n"  # its line 5


def test_a_llamafactory_qlora_recipe_resolves(write):
    r = resolve(write("r.yaml", QLORA + "quantization_method: bnb\nquantization_type: fp4\ndouble_quantization: false\n"
                                        "zero_stage: 2\n"))
    assert (r["quantization_bit"], r["quantization_type"], r["double_quantization"]) == (4, "fp4", False)
    assert resolve(write("o.yaml", QLORA), ["quantization_bit=8"])["quantization_bit"] == 8


def test_full_freeze_zero3_pissa_and_other_quantizers_are_refused(write):
    write("full.yaml", QLORA + "finetuning_type: freeze\n")
    assert errors("full.yaml") == [
        "full.yaml:6:18: finetuning_type: given freeze with quantization_bit: 4: a quantized base cannot train: its "
        "4/8-bit weights are frozen integer codes (LLaMA-Factory refuses it too: 'Quantization is only compatible "
        "with the LoRA or OFT method.'); set finetuning_type: lora (or oft), or remove quantization_bit"]
    write("z3.yaml", QLORA + "zero_stage: 3\n")
    assert errors("z3.yaml") == [
        "z3.yaml:6:13: zero_stage: given 3 with quantization_bit: 4: ZeRO-3 would partition the quantized weights "
        "apart from their quantization constants (LLaMA-Factory needs bitsandbytes' quant_storage for it, not "
        "implemented here); set zero_stage: 2 (or lower): ZeRO 0-2 keep the 4/8-bit base whole on every rank"]
    write("m.yaml", QLORA + "quantization_method: hqq\npissa_init: true\n")
    assert [m.split(": given")[0] for m in errors("m.yaml")] == ["m.yaml:6:22: quantization_method",
                                                                 "m.yaml:7:13: pissa_init"]
    write("b.yaml", BASE + "quantization_bit: 2\n")
    assert errors("b.yaml") == ["b.yaml:5:19: quantization_bit: given 2, expected one of 4, 8, null"]


# tiny (GPT-2 shape): per block the Linears 64x192, 64x64, 64x256, 256x64 = 49,152 weights (the tied head stays fp32)
QUANTIZED = 2 * 49_152
CODES = QUANTIZED // 2                       # 4 bits a weight
ABSMAX = QUANTIZED // 64                     # one byte per 64-value block (double quantization) ...
NESTED = 2 * 4 * (192 + 64 + 256 + 256) // 256  # ... + an fp32 absmax per 256 blocks, per weight


def test_plan_counts_the_4bit_base_at_half_a_byte_a_weight_plus_its_constants(write):
    from tests.recipe.test_recipe_plan import TINY_LORA_8, TINY_PARAMS

    write("r.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 10\ncutoff_len: 128\n"
                    "per_device_train_batch_size: 8\nquantization_bit: 4\n")
    r = resolve("r.yaml")
    mem = estimate_memory(r)
    assert mem.quantized == (CODES + ABSMAX + NESTED, QUANTIZED * 4)
    assert mem.gpu["parameters"] == (TINY_PARAMS + TINY_LORA_8 - QUANTIZED) * 4 + CODES + ABSMAX + NESTED
    assert "quantization_bit 4: the base's Linear weights counted at 0.5 byte a parameter" in render(r)


@pytest.mark.parametrize("stage", ["dpo", "dpo\npref_loss: orpo", "kto", "rm"])
def test_plan_counts_a_preference_or_reward_stage_on_the_4bit_base_without_a_second_model(write, stage):
    """dpo / kto: the reference is the quantized base with the adapter off (no bytes of its own), orpo none; rm: the
    score head (64 weights, trained) is no quantized Linear. A ref_model is its checkpoint unquantized (fp32)."""
    from tests.recipe.test_recipe_plan import TINY_LORA_8, TINY_PARAMS

    keys = "model_name_or_path: tiny\ndataset: d\nmax_steps: 10\ncutoff_len: 128\nquantization_bit: 4\n"
    mem = estimate_memory(resolve(write("r.yaml", keys + f"stage: {stage}\n")))
    score = 64 if stage == "rm" else 0
    assert mem.quantized == (CODES + ABSMAX + NESTED, QUANTIZED * 4)
    assert mem.gpu["parameters"] == (TINY_PARAMS + TINY_LORA_8 + score - QUANTIZED) * 4 + CODES + ABSMAX + NESTED
    assert "reference" not in mem.gpu
    if stage == "dpo":
        ref = estimate_memory(resolve(write("f.yaml", keys + "stage: dpo\nref_model: tiny\n")))
        assert ref.gpu["reference"] == TINY_PARAMS * 4


def test_plan_counts_ppo_s_lora_reward_model_on_the_4bit_base(write, tmp_path):
    """reward_model_type lora: the reward adapter beside the policy's base quantized the same way (its score head
    unquantized), no reference (the adapter off); a full reward model loads unquantized. The adapter's own weights
    stay unfolded beside the 4-bit base, in fp32: they were not counted (8,192 bytes short for this one). Golden: a
    PEFT SEQ_CLS adapter saved by save_pretrained (LoRA r 4 on c_attn of the tiny preset's GPT-2 shape), its tensors'
    shapes counted by hand: per block lora_A (4 x 64) + lora_B (192 x 4) = 1,024, two blocks; its modules_to_save
    score (1 x 64) replaces the base's score head, counted there."""
    from tests.recipe.test_recipe_plan import TINY_PARAMS

    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=16, n_positions=128, n_embd=64, n_layer=2, n_head=2, num_labels=1)
    peft.get_peft_model(transformers.GPT2ForSequenceClassification(config), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, target_modules=["c_attn"], fan_in_fan_out=True)).save_pretrained(tmp_path / "rm")
    keys = ("model_name_or_path: tiny\ndataset: d\nmax_steps: 10\ncutoff_len: 128\nquantization_bit: 4\n"
            "stage: ppo\nreward_model: rm\n")
    mem = estimate_memory(resolve(write("r.yaml", keys)))
    adapter = 2 * (4 * 64 + 192 * 4)
    assert mem.gpu["reward_model"] == (TINY_PARAMS + 64 - QUANTIZED) * 4 + CODES + ABSMAX + NESTED + adapter * 4
    assert "reference" not in mem.gpu


def test_the_4bit_keys_say_they_do_nothing_without_quantization_bit_4(write):
    from pipeline.recipe.notices import notices

    keys = "quantization_method: bnb\nquantization_type: nf4\ndouble_quantization: true\n"
    plain = notices(resolve(write("p.yaml", BASE + keys)))
    assert [n.split(": accepted")[0] for n in plain if "quantization" in n] == [
        "notice: p.yaml:5:22: quantization_method", "notice: p.yaml:6:20: quantization_type",
        "notice: p.yaml:7:22: double_quantization"]
    eight = [n for n in notices(resolve(write("e.yaml", BASE + keys + "quantization_bit: 8\n"))) if "quantization" in n]
    assert eight == ["notice: e.yaml:6:20: quantization_type: accepted without effect: it only matters with "
                     "quantization_bit: 4",
                     "notice: e.yaml:7:22: double_quantization: accepted without effect: it only matters with "
                     "quantization_bit: 4"]
    assert not [n for n in notices(resolve(write("f.yaml", QLORA + keys))) if "quantization" in n]


def test_a_gptq_checkpoint_is_refused_with_the_fix(write, tmp_path):
    """config.json's quantization_config as a GPTQ checkpoint on the hub holds it: its packed qweight / qzeros /
    scales are not read here (a bitsandbytes one is read as stored: tests/model/test_prequantized_bnb.py)."""
    transformers = pytest.importorskip("transformers")
    from tests.acceptance.harness import FAMILIES

    config = transformers.LlamaConfig(**FAMILIES["llama"].tiny)
    config.quantization_config = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    config.save_pretrained(tmp_path / "llama-gptq")
    write("r.yaml", BASE.replace("tiny", "llama-gptq"))
    assert errors("r.yaml") == [
        "r.yaml:1:21: model_name_or_path: llama-gptq/config.json: a pre-quantized checkpoint (quantization_config:"
        " quant_method gptq, 4-bit), whose stored quantized weights are not read here (only GptOssForCausalLM's"
        " MXFP4 experts are dequantized at load, and bitsandbytes 4-bit / 8-bit checkpoints of dense models are read"
        " as stored); point model_name_or_path at the unquantized checkpoint it was made from (quantization_bit"
        " quantizes it with bitsandbytes at load)"]


def test_gpt_oss_as_the_hub_ships_it_is_not_a_prequantized_checkpoint(write, tmp_path):
    """openai/gpt-oss-20b's config.json says quantization_config mxfp4 (its experts' _blocks / _scales), which the
    weight reader dequantizes at load (tests/model/test_gpt_oss.py): the recipe's model rules let it through, while the
    same config under another family (MXFP4 is only read for gpt-oss's fused experts) stays refused."""
    transformers = pytest.importorskip("transformers")

    tiny = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, num_local_experts=4, num_experts_per_tok=2)
    mxfp4 = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "lm_head"]}
    for name, config in (("gpt-oss", transformers.GptOssConfig(**tiny)),
                         ("llama-mxfp4", transformers.LlamaConfig(**{k: tiny[k] for k in list(tiny)[:6]}))):
        config.quantization_config = mxfp4
        config.save_pretrained(tmp_path / name)
    assert resolve(write("r.yaml", BASE.replace("tiny", "gpt-oss")))["model_name_or_path"] == "gpt-oss"
    write("l.yaml", BASE.replace("tiny", "llama-mxfp4"))
    assert [e.split(": ", 2)[1] for e in errors("l.yaml")] == ["model_name_or_path"]


def test_a_sparse_moe_model_is_refused_before_the_run(write):
    """quantize_model refuses a sparse MoE model at load (its experts are no Linears in transformers 5's bnb
    quantizer); validate and plan say so first, at the key, instead of passing a recipe train then refuses."""
    write("moe.yaml", QLORA.replace("tiny", "glm-4.5-air"))
    assert errors("moe.yaml") == [
        "moe.yaml:5:19: quantization_bit: given 4 with model_name_or_path: glm-4.5-air: a sparse MoE model is not "
        "quantized here (transformers' bnb quantizer leaves its fused experts and router unquantized, ours are "
        "per-expert Linears); quantization_bit works on dense Llama / Qwen / Mistral / Gemma / Phi-3 / GPT-2 "
        "checkpoints: remove the key"]
