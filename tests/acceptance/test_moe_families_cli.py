"""The Mixtral and Qwen2-MoE user paths through the CLI: a MixtralForCausalLM (with Mistral v0.1's sentencepiece
tokenizer files, template mistral, as Mixtral-8x7B-Instruct-v0.1 ships them) / a Qwen2MoeForCausalLM (with the small
byte-level Qwen tokenizer, template qwen) as transformers' save_pretrained writes them (the hub's tensor names:
Mixtral's block_sparse_moe.experts.{e}.w1 / w2 / w3), an LLaMA-Factory-format LoRA sft recipe with moe_aux_loss_coef
-> build / train / merge; merged/ loads in transformers as the same architecture and computes our trained model's
logits, as PEFT's reading of adapter/ does. A lora_target on the experts or the router is refused (exit 2) at validate, in process
(the as-typed refusal is test_qwen3_moe_cli's)."""
from __future__ import annotations

import json

import pytest

from tests.acceptance.harness import assert_outputs_compute_ours, pipeline, random_model, refused, write_recipe

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
            max_position_embeddings=256, tie_word_embeddings=False)


def save_pretrained_mixtral(folder, **changes):
    """Mixtral-8x7B-Instruct-v0.1's tokenizer files (Mistral v0.1's 32,000-id sentencepiece vocabulary) beside a
    random tiny MixtralForCausalLM (4 experts, top-2, no window; config `changes` over these)."""
    import transformers

    from tests.helpers.sp_vocab import write_sp_tokenizer_dir

    write_sp_tokenizer_dir(folder, "mistral_v1")
    config = transformers.MixtralConfig(**{**TINY, "vocab_size": 32000, "intermediate_size": 24,
                                           "num_local_experts": 4, "sliding_window": None, "bos_token_id": 1,
                                           "eos_token_id": 2, **changes})
    random_model(transformers.MixtralForCausalLM, config).save_pretrained(folder)


def save_pretrained_qwen2_moe(folder):
    """The small byte-level Qwen tokenizer beside a random tiny Qwen2MoeForCausalLM (4 experts, top-2, a shared
    expert, q/k/v biases)."""
    import transformers

    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    size = write_small_tokenizer_dir(folder, "qwen2")
    generation = json.loads((folder / "generation_config.json").read_text())
    config = transformers.Qwen2MoeConfig(**TINY, vocab_size=size, intermediate_size=48, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=40, num_experts=4,
                                         eos_token_id=generation["eos_token_id"][0])
    random_model(transformers.Qwen2MoeForCausalLM, config).save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(generation))


@pytest.mark.parametrize("family,architecture,template,mlp_target", [
    # the router by a path (the bare name gate takes LoRA, as its experts do: test_moe_expert_lora, test_expert_lora_more)
    ("mixtral", "MixtralForCausalLM", "mistral", "block_sparse_moe.gate"),
    ("qwen2_moe", "Qwen2MoeForCausalLM", "qwen", "gate"),
])
def test_lora_sft_with_the_aux_loss_merges_to_the_same_architecture(workdir, family, architecture, template,
                                                                   mlp_target):
    """lora_target: all (the recipe's) adapts what LLaMA-Factory's find_all_linear_modules names: Mixtral's attention
    projections; Qwen2-MoE's also the shared expert and shared_expert_gate (tests/model/test_moe_families.py)."""
    import torch
    import transformers

    base = workdir / family
    (save_pretrained_mixtral if family == "mixtral" else save_pretrained_qwen2_moe)(base)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", template=template,
                          output_dir="saves/r", learning_rate=0.05, moe_aux_loss_coef=0.01,
                          cutoff_len=128)  # qwen's default system prompt and the 384-id vocabulary: 48 holds no row
    message = refused("validate", recipe, f"lora_target=q_proj,{mlp_target}", cwd=workdir, as_typed=False)
    assert f"lora_target: '{mlp_target}' picks MLP modules of this {architecture}" in message, message
    pipeline("build", recipe, cwd=workdir, as_typed=False)
    pipeline("train", recipe, cwd=workdir)
    log = [json.loads(line) for line in (workdir / "saves/r/trainer_log.jsonl").read_text().splitlines()]
    assert all(record["aux_loss"] >= 1.0 for record in log if "loss" in record)  # the router's term, logged
    pipeline("merge", recipe, cwd=workdir, as_typed=False)
    merged = workdir / "saves/r/merged"
    config = json.loads((merged / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == ([architecture], family)
    adapter = json.loads((workdir / "saves/r/adapter/adapter_config.json").read_text())
    assert adapter["target_modules"] == (["k_proj", "o_proj", "q_proj", "v_proj"] if family == "mixtral" else [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "shared_expert_gate", "up_proj", "v_proj"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(theirs).__name__ == architecture
    x, want = assert_outputs_compute_ours(recipe, workdir, base, theirs, config["vocab_size"])
    with torch.no_grad():  # and the run trained: not the base's logits
        assert (want - transformers.AutoModelForCausalLM.from_pretrained(base)(x).logits).abs().max() > 1e-3
