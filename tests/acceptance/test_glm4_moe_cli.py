"""The GLM-4.5 user path through the CLI: a Glm4MoeForCausalLM as transformers' save_pretrained writes it (block 0
dense, block 1 a DeepSeek-V3 sparse block: sigmoid router with a correction bias far from 0, 2 groups of 2 experts
with 1 kept, top-2, a shared expert, routed_scaling_factor 1.5) with the small byte-level tokenizer holding GLM's
special tokens, an LLaMA-Factory-format LoRA sft recipe with template glm4_moe, lora_target all and
moe_aux_loss_coef -> validate (the coefficient's notice; an MLP target refused) -> plan (the trainable count PEFT's
get_peft_model trains for LLaMA-Factory's expansion of all: the dense block's and shared expert's MLP names bring the
routed experts, test_lora_all_moe) -> build / train / merge as typed -> merged/ loads in transformers as
Glm4MoeForCausalLM (its routed experts moved) and PEFT reads adapter/, both computing what our trained model
computes."""
from __future__ import annotations

from tests.acceptance.harness import (assert_outputs_compute_ours, build_train_merge, pipeline, refused,
                                      save_pretrained_small, write_recipe)

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=256, tie_word_embeddings=False, moe_intermediate_size=16,
            n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
            routed_scaling_factor=1.5, first_k_dense_replace=1, attention_bias=True)


def test_lora_sft_from_a_save_pretrained_glm4_moe_merges_to_glm4_moe(workdir):
    import peft
    import torch
    import transformers

    base = workdir / "GLM-4.5-Air"
    model = save_pretrained_small(base, "glm4", "Glm4MoeForCausalLM", "Glm4MoeConfig",
                                  ("eos_token_id", "pad_token_id"), **TINY)
    with torch.no_grad():  # a correction bias that matters (transformers initialises it to 0)
        model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.tensor([0.3, -0.2, 0.1, -0.4]))
    model.save_pretrained(base)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset="tiny_sft", dataset_dir="data",
                          template="glm4_moe", lora_target="all", output_dir="saves/r", learning_rate=0.05,
                          cutoff_len=96, moe_aux_loss_coef=0.01)
    message = refused("validate", recipe, "lora_target=q_proj,gate_proj", cwd=workdir, as_typed=False)
    assert "lora_target: 'gate_proj' without 'up_proj'" in message, message  # the experts take LoRA in pairs
    told = pipeline("validate", recipe, cwd=workdir, as_typed=False, expect=None).stderr
    assert "moe_aux_loss_coef: accepted without effect: this Glm4MoeForCausalLM balances its experts by the" in told
    # lora_target: all is LLaMA-Factory's find_all_linear_modules: the dense block's and the shared expert's
    # gate_proj / up_proj / down_proj among them, which PEFT 0.21 moves onto the routed experts: plan counts PEFT's
    from tests.model.test_moe_families import lf_all_linear_modules

    names = lf_all_linear_modules(model)
    assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=names))
    trained = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    assert f" total, {trained:,} trainable " in pipeline("plan", recipe, cwd=workdir, as_typed=False).stdout
    config, adapter = build_train_merge(recipe, workdir)
    assert (config["architectures"], config["model_type"], config["n_group"], config["routed_scaling_factor"],
            config["first_k_dense_replace"]) == (["Glm4MoeForCausalLM"], "glm4_moe", 2, 1.5, 1)
    assert (adapter["target_modules"], adapter["target_parameters"]) == (
        ["k_proj", "o_proj", "q_proj", "v_proj"], ["down_proj", "gate_up_proj"])
    merged = workdir / "saves/r/merged"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(theirs).__name__ == "Glm4MoeForCausalLM"
    assert torch.equal(theirs.model.layers[1].mlp.gate.e_score_correction_bias, torch.tensor([0.3, -0.2, 0.1, -0.4]))
    x, want = assert_outputs_compute_ours(recipe, workdir, base, theirs, config["vocab_size"])
    with torch.no_grad():  # and the run trained: not the base's logits; the routed experts moved (lora_target: all)
        source = transformers.AutoModelForCausalLM.from_pretrained(base)
        assert (want - source(x).logits).abs().max() > 1e-3
        for part in ("gate_up_proj", "down_proj"):
            assert (theirs.model.layers[1].mlp.experts.get_parameter(part)
                    - source.model.layers[1].mlp.experts.get_parameter(part)).abs().max() > 1e-4, part
