"""`lora_target: all` on a MoE checkpoint through the CLI, as a LLaMA-Factory user writes it: a Qwen3MoeForCausalLM
with a dense block (mlp_only_layers, as transformers' save_pretrained writes it) -> an LLaMA-Factory-format LoRA sft
recipe with `lora_target: all` -> plan / build / train one step as typed -> PEFT reads adapter/ on the base with our
trained model's logits, and plan's trainable count is what PEFT's get_peft_model trains for the names LLaMA-Factory
0.9.5's find_all_linear_modules gives (model/adapter.py:205-206): the dense block's gate_proj / up_proj / down_proj
among them, which PEFT 0.21 moves onto every routed expert (target_parameters gate_up_proj, down_proj). A setting
PEFT's ParamWrapper refuses (lora_dropout) is refused at its key, saying what `all` is on this model, and so is
finetuning_type: oft (PEFT's OFT would adapt the dense block's MLP Linears, which take no adapter here). GLM-4.5's
`all` (dense block and shared experts) runs in test_glm4_moe_cli with the same checks; every family's table:
tests/model/test_lora_all_moe.py."""
from __future__ import annotations

import json

from tests.acceptance.harness import pipeline, refused, trained_model, write_recipe
from tests.acceptance.test_qwen3_moe_cli import save_pretrained_moe


def test_lora_all_trains_the_experts_peft_trains(workdir):
    import peft
    import torch
    import transformers

    from tests.model.test_moe_families import lf_all_linear_modules

    base = workdir / "Qwen3-MoE-dense-block"
    save_pretrained_moe(base, mlp_only_layers=[1])
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", template="qwen3",
                          output_dir="saves/r", learning_rate=0.05, max_steps=1, val_size=0, lora_target="all")
    message = refused("validate", recipe, "lora_dropout=0.1", cwd=workdir, as_typed=False)
    assert "lora_dropout: given 0.1; lora_target: all is q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj," \
           " down_proj on this model" in message, message
    # PEFT converts the names for LoRA only: its OFT adapts the dense block's Linears, which take no adapter here
    message = refused("validate", recipe, "finetuning_type=oft", cwd=workdir, as_typed=False)
    assert "PEFT's OFT (no MoE conversion: LoRA only) adapts the dense block's and shared experts' Linears of the" \
           " names gate_proj, up_proj, down_proj, which take no adapter here: name the others instead of all" \
           " (lora_target: q_proj,k_proj,v_proj,o_proj)" in message, message
    source = transformers.AutoModelForCausalLM.from_pretrained(base)
    names = lf_all_linear_modules(source)
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=names))
    trained = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    plan = pipeline("plan", recipe, cwd=workdir, as_typed=False).stdout
    assert f" total, {trained:,} trainable " in plan, plan
    pipeline("build", recipe, cwd=workdir, as_typed=False)  # the data stage: as typed in test_qwen3_moe_cli
    pipeline("train", recipe, cwd=workdir)
    adapter = json.loads((workdir / "saves/r/adapter/adapter_config.json").read_text())
    assert (adapter["target_modules"], adapter["target_parameters"], adapter["rank_pattern"]) == (
        ["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_up_proj"], {r".*\.gate_up_proj": 8})
    adapted = peft.PeftModel.from_pretrained(source, workdir / "saves/r/adapter").eval()
    x = torch.randint(0, source.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = trained_model(recipe, workdir)(x)
        assert torch.allclose(adapted(x).logits, want, atol=1e-4, rtol=0)
        base_logits = transformers.AutoModelForCausalLM.from_pretrained(base)(x).logits
        assert (want - base_logits).abs().max() > 1e-3  # the step trained
        experts = adapted.base_model.model.model.layers[0].mlp.experts  # PEFT's wrapper on the sparse block 0
        assert experts.lora_B["default"].weight.abs().max() > 0  # the routed experts' B moved from its zero start
