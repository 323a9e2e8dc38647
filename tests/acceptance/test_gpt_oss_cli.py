"""The gpt-oss user path through the CLI: a GptOssForCausalLM as transformers' save_pretrained writes it (sinks, q / k / v
/ o biases, a window in every other layer, YaRN, the biased router and the fused experts, dequantized) with a small
byte-level tokenizer holding gpt-oss's special tokens, an LLaMA-Factory-format LoRA sft recipe with template gpt_oss,
lora_target all and moe_aux_loss_coef -> build / train / merge as typed; merged/ loads in transformers as
GptOssForCausalLM and PEFT reads adapter/, both computing what our trained model computes; the exported chat template
renders the training prompt."""
from __future__ import annotations

from tests.acceptance.harness import (assert_outputs_compute_ours, build_train_merge, exported_prompt, pipeline,
                                      save_pretrained_small, write_recipe)

TINY = dict(hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 64, "rope_theta": 150000.0})


def test_lora_sft_from_a_save_pretrained_gpt_oss_merges_to_gpt_oss(workdir):
    import torch
    import transformers

    base = workdir / "gpt-oss-20b"
    save_pretrained_small(base, "gpt_oss", "GptOssForCausalLM", "GptOssConfig", ("eos_token_id", "pad_token_id"),
                          **TINY)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset="tiny_sft", dataset_dir="data",
                          template="gpt_oss", lora_target="all", output_dir="saves/r", learning_rate=0.05,
                          cutoff_len=224, moe_aux_loss_coef=0.01)
    # a recipe without template gets the notice naming gpt-oss's own; moe_aux_loss_coef is said to change nothing,
    # as in LLaMA-Factory (validate then refuses the unbuilt data), in every stage
    told = pipeline("validate", write_recipe(workdir / "n.yaml", model_name_or_path=str(base), dataset_dir="data",
                                             template=None, moe_aux_loss_coef=0.01),
                    cwd=workdir, as_typed=False, expect=None).stderr
    assert "this gpt_oss model, whose own chat format is template: gpt_oss" in told, told
    assert "LLaMA-Factory 0.9.5 sets output_router_logits for no gpt_oss model" in told, told
    # nor in dpo, which LLaMA-Factory runs with the key set (no router term to leave out): the notice, no refusal
    told = pipeline("validate", workdir / "n.yaml", "stage=dpo", cwd=workdir, as_typed=False, expect=None).stderr
    assert "sets output_router_logits for no gpt_oss model" in told and "pt and sft only" not in told, told
    config, adapter = build_train_merge(recipe, workdir)
    assert (config["architectures"], config["layer_types"], config["sliding_window"], config["attention_bias"]) == \
        (["GptOssForCausalLM"], ["sliding_attention", "full_attention"], 8, True)
    assert adapter["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    merged = workdir / "saves/r/merged"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(theirs).__name__ == "GptOssForCausalLM"
    x, want = assert_outputs_compute_ours(recipe, workdir, base, theirs, config["vocab_size"])
    with torch.no_grad():  # and the run trained: not the base's logits
        assert (want - transformers.AutoModelForCausalLM.from_pretrained(base)(x).logits).abs().max() > 1e-3
    assert exported_prompt(merged, base, "gpt_oss") == ("<|start|>system<|message|>Be brief.<|end|>"
                                                        "<|start|>user<|message|>Name a colour.<|end|><|start|>assistant")
