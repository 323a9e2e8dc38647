"""The Qwen3-MoE user path through the CLI: a Qwen3MoeForCausalLM as transformers' save_pretrained writes it (the hub's
per-expert tensor names) with a small byte-level Qwen3 tokenizer, an LLaMA-Factory-format LoRA sft recipe with
template qwen3 and LLaMA-Factory's moe_aux_loss_coef -> build / train / merge as typed; merged/ and PEFT's reading of
adapter/ compute what our trained model computes. gate_proj without up_proj in lora_target and the aux loss in another stage
are refused (exit 2) at validate (in process: main(argv), the CLI's refusal without an interpreter start)."""
from __future__ import annotations

import json

from tests.acceptance.harness import (assert_outputs_compute_ours, pipeline, refused, save_pretrained_small,
                                     write_recipe)

TINY = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
            max_position_embeddings=256, tie_word_embeddings=False)


def save_pretrained_moe(folder, **changes):
    """A random tiny Qwen3MoeForCausalLM (noise on every tensor; TINY with `changes`) with tests.helpers.hf_vocab's
    small Qwen3 tokenizer."""
    return save_pretrained_small(folder, "qwen3", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", ("eos_token_id",),
                                 **{**TINY, **changes})


def test_lora_sft_from_a_save_pretrained_qwen3_moe_merges_to_qwen3_moe(workdir):
    import torch
    import transformers

    base = workdir / "Qwen3-30B-A3B"
    save_pretrained_moe(base)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", template="qwen3",
                          output_dir="saves/r", learning_rate=0.05, moe_aux_loss_coef=0.01)
    message = refused("validate", recipe, "lora_target=q_proj,gate_proj", cwd=workdir, as_typed=False)
    assert "lora_target: 'gate_proj' without 'up_proj'" in message, message  # PEFT raises (test_moe_expert_lora)
    message = refused("validate", recipe, "stage=kto", cwd=workdir, as_typed=False)
    assert "moe_aux_loss_coef: given 0.01: the router's load-balancing loss is added in stages pt and sft only, not" \
           " stage kto" in message, message
    pipeline("build", recipe, cwd=workdir)
    pipeline("train", recipe, cwd=workdir)
    log = [json.loads(line) for line in (workdir / "saves/r/trainer_log.jsonl").read_text().splitlines()]
    assert all(record["aux_loss"] >= 1.0 for record in log if "loss" in record)  # logged beside the loss
    results = json.loads((workdir / "saves/r/all_results.json").read_text())
    assert results["moe_aux_loss_coef"] == 0.01  # loss / eval_loss carry the router's term: eval's report says so
    pipeline("merge", recipe, cwd=workdir)
    merged = workdir / "saves/r/merged"
    config = json.loads((merged / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["num_experts"], config["norm_topk_prob"]) == (
        ["Qwen3MoeForCausalLM"], "qwen3_moe", 4, True)
    adapter = json.loads((workdir / "saves/r/adapter/adapter_config.json").read_text())
    assert adapter["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(theirs).__name__ == "Qwen3MoeForCausalLM"
    x, want = assert_outputs_compute_ours(recipe, workdir, base, theirs, config["vocab_size"])
    with torch.no_grad():  # and the run trained: not the base's logits
        assert (want - transformers.AutoModelForCausalLM.from_pretrained(base)(x).logits).abs().max() > 1e-3
    # `generate --model merged` (greedy, KV cache; in-process: the command's as-typed start is test_family_paths')
    # prints transformers' greedy generate of merged/ on its own chat template's prompt, cut at the first stop id
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}],
                                           add_generation_prompt=True)["input_ids"]
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    stops = sorted(set(stops if isinstance(stops, list) else [stops]))
    with torch.no_grad():
        new = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, use_cache=True,
                              eos_token_id=stops, pad_token_id=stops[0])[0, len(prompt):].tolist()
    new = new[:next((i for i, t in enumerate(new) if t in stops), len(new))]
    assert len(new) >= 3  # something to agree on
    got = pipeline("generate", recipe, "--model", "merged", "--prompt", "Name a colour.", "max_new_tokens=12",
                   cwd=workdir, as_typed=False).stdout
    assert got == tokenizer.decode(new, skip_special_tokens=False) + "\n"
