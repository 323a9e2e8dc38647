"""The DeepSeek-V3 user path through the CLI: a DeepseekV3ForCausalLM as transformers' save_pretrained writes it (block 0
dense, block 1 sparse: sigmoid router with a correction bias far from 0, 2 groups of 2 experts with 1 kept, top-2, a
shared expert, routed_scaling_factor 1.5; multi-head latent attention with a query latent, q_lora_rank set) with the
small byte-level tokenizer holding DeepSeek-V3's special tokens, an LLaMA-Factory-format LoRA sft recipe with template
deepseek3 and lora_target naming every latent attention Linear, the experts (gate_proj, up_proj, down_proj: PEFT 0.21
trains them on transformers 5's fused expert tensors) and the router (gate: PEFT's ParamWrapper on mlp.gate.weight)
-> build / train / merge as typed -> merged/ loads in transformers as DeepseekV3ForCausalLM (its experts and router
moved, the correction bias kept) and PEFT reads adapter/, both computing what our trained model computes; merged/'s
chat template renders deepseek3's prompt."""
from __future__ import annotations

from tests.acceptance.harness import assert_outputs_compute_ours, build_train_merge, save_pretrained_small, write_recipe

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
            max_position_embeddings=256, tie_word_embeddings=False, moe_intermediate_size=16, n_routed_experts=4,
            num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, routed_scaling_factor=1.5,
            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=6)
BIAS = [0.3, -0.2, 0.1, -0.4]
ATTENTION = ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"]  # what lora_target: all takes


def test_lora_sft_from_a_save_pretrained_deepseek_v3_merges_to_deepseek_v3(workdir):
    import torch
    import transformers

    base = workdir / "DeepSeek-V3"
    model = save_pretrained_small(base, "deepseek_v3", "DeepseekV3ForCausalLM", "DeepseekV3Config",
                                  ("bos_token_id", "eos_token_id"), **TINY)
    with torch.no_grad():  # a correction bias that matters (transformers initialises it to 0)
        model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.tensor(BIAS))
    model.save_pretrained(base)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset="tiny_sft", dataset_dir="data",
                          template="deepseek3", lora_target=",".join(ATTENTION + ["gate", "gate_proj", "up_proj", "down_proj"]),
                          output_dir="saves/r", learning_rate=0.05,
                          cutoff_len=96)
    config, adapter = build_train_merge(recipe, workdir)
    assert (config["architectures"], config["model_type"], config["q_lora_rank"], config["kv_lora_rank"],
            config["first_k_dense_replace"]) == (["DeepseekV3ForCausalLM"], "deepseek_v3", 16, 12, 1)
    assert (adapter["target_modules"], sorted(adapter["target_parameters"])) == (
        ATTENTION, ["down_proj", "gate.weight", "gate_up_proj"])
    merged = workdir / "saves/r/merged"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(theirs).__name__ == "DeepseekV3ForCausalLM"
    assert torch.equal(theirs.model.layers[1].mlp.gate.e_score_correction_bias, torch.tensor(BIAS))
    x, want = assert_outputs_compute_ours(recipe, workdir, base, theirs, config["vocab_size"])
    with torch.no_grad():  # and the run trained: not the base's logits, the sparse block's experts and router moved
        source = transformers.AutoModelForCausalLM.from_pretrained(base)
        assert (want - source(x).logits).abs().max() > 1e-3
        mlp, was = theirs.model.layers[1].mlp, source.model.layers[1].mlp
        for part in ("experts.gate_up_proj", "experts.down_proj", "gate.weight"):
            assert (mlp.get_parameter(part) - was.get_parameter(part)).abs().max() > 1e-4, part
    prompt = transformers.AutoTokenizer.from_pretrained(merged).apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}], tokenize=False,
        add_generation_prompt=True)  # template.py:820-824: BOS, the system prompt as it is, the user block
    assert prompt == "<｜begin▁of▁sentence｜>Be brief.<｜User｜>hi<｜Assistant｜>"
