"""The Phi-4 user path through the CLI: a Phi3ForCausalLM as transformers' save_pretrained writes it (fused qkv_proj and
gate_up_proj, GQA, partial rotary, a sliding window shorter than cutoff_len, LongRoPE with a window the rows run past)
with a small byte-level tokenizer holding Phi's special tokens, an LLaMA-Factory-format LoRA sft recipe with
template phi4 and lora_target all -> build / train / merge as typed; merged/ loads in transformers as Phi3ForCausalLM
and PEFT reads adapter/ (one LoRA per fused Linear), both computing what our trained model computes; the exported chat
template renders the training prompt."""
from __future__ import annotations


from tests.acceptance.harness import (assert_outputs_compute_ours, build_train_merge, exported_prompt, refused,
                                      save_pretrained_small, write_recipe)

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, partial_rotary_factor=0.5, sliding_window=12, original_max_position_embeddings=16,
            rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]},
            tie_word_embeddings=False)


def test_lora_sft_from_a_save_pretrained_phi4_merges_to_phi3(workdir):
    import torch
    import transformers

    base = workdir / "phi-4"
    save_pretrained_small(base, "phi4", "Phi3ForCausalLM", "Phi3Config", ("bos_token_id", "eos_token_id", "pad_token_id"),
                          **TINY)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", template="phi4",
                          lora_target="all", output_dir="saves/r", learning_rate=0.05)
    message = refused("validate", recipe, "rope_scaling=yarn", "cutoff_len=400", cwd=workdir, as_typed=False)
    assert "rope_scaling: given 'yarn', but Phi3ForCausalLM runs only rope types default, longrope" in message, message
    config, adapter = build_train_merge(recipe, workdir)
    merged = workdir / "saves/r/merged"
    assert (config["architectures"], config["model_type"], config["sliding_window"], config["partial_rotary_factor"],
            config["original_max_position_embeddings"]) == (["Phi3ForCausalLM"], "phi3", 12, 0.5, 16)
    assert adapter["target_modules"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(theirs).__name__ == "Phi3ForCausalLM" and theirs.config.rope_parameters["rope_type"] == "longrope"
    # 20 positions: past the 12-position window and LongRoPE's 16-position switch
    x, want = assert_outputs_compute_ours(recipe, workdir, base, theirs, config["vocab_size"])
    with torch.no_grad():  # and the run trained: not the base's logits
        assert (want - transformers.AutoModelForCausalLM.from_pretrained(base)(x).logits).abs().max() > 1e-3
    # the export's chat template renders the prompt training builds (phi4: no newlines, <|im_sep|> after the role)
    assert exported_prompt(merged, base, "phi4") == ("<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>"
                                                     "user<|im_sep|>Name a colour.<|im_end|><|im_start|>assistant"
                                                     "<|im_sep|>")
