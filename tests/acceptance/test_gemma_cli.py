"""The Gemma 3 user path through the CLI: a Gemma3ForCausalLM as transformers' save_pretrained writes it (sliding
windows shorter than the rows, query_pre_attn_scalar, a local RoPE base: tests/model/test_gemma.py says what each is)
with a tokenizer in Gemma's form (tests/helpers/gemma_vocab.py: GemmaTokenizer, <start_of_turn> / <end_of_turn>), an
LLaMA-Factory-format LoRA sft recipe with template gemma3 -> build / train / merge as typed; merged/ loads in
transformers as Gemma3ForCausalLM (layer_types, rope_parameters, query_pre_attn_scalar kept) and PEFT's reading of
adapter/ computes what our trained model computes; merged/'s chat template and generation config stop at
<end_of_turn>. Failed before: Gemma3ForCausalLM was refused at validate (unknown architecture)."""
from __future__ import annotations

import json

from tests.acceptance.harness import assert_outputs_compute_ours, pipeline, random_model, refused, write_recipe
from tests.helpers.gemma_vocab import VOCAB_SIZE, write_gemma_tokenizer_dir

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, query_pre_attn_scalar=12, sliding_window=6, sliding_window_pattern=3, rope_theta=10000.0,
            rope_local_base_freq=100.0, max_position_embeddings=256, vocab_size=VOCAB_SIZE)


def test_lora_sft_from_a_save_pretrained_gemma3_merges_to_gemma3(workdir):
    import torch
    import transformers

    base = workdir / "gemma-3-1b-it"
    write_gemma_tokenizer_dir(base)
    model = random_model(transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(**TINY))
    model.save_pretrained(base)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", template="gemma3",
                          output_dir="saves/r", learning_rate=0.05, cutoff_len=256)  # a small vocabulary: long rows
    message = refused("validate", recipe, "template=qwen3", cwd=workdir, as_typed=False)
    assert "'qwen3' needs the special tokens <|im_start|>, <|im_end|>" in message and "gemma3" in message, message
    pipeline("build", recipe, cwd=workdir)
    plain = write_recipe(workdir / "plain.yaml", model_name_or_path=str(base), dataset_dir="data", template=None,
                         output_dir="saves/p", cutoff_len=256)
    notice = pipeline("validate", plain, cwd=workdir, as_typed=False).stderr  # no template: the notice names gemma3
    assert "whose own chat format is template: gemma3" in notice, notice
    pipeline("train", recipe, cwd=workdir)
    pipeline("merge", recipe, cwd=workdir)
    merged = workdir / "saves/r/merged"
    config = json.loads((merged / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["layer_types"], config["query_pre_attn_scalar"],
            config["sliding_window"]) == (["Gemma3ForCausalLM"], "gemma3_text",
                                          ["sliding_attention", "sliding_attention", "full_attention"], 12, 6)
    assert config["rope_parameters"]["sliding_attention"]["rope_theta"] == 100.0
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(theirs).__name__ == "Gemma3ForCausalLM"
    x, want = assert_outputs_compute_ours(recipe, workdir, base, theirs, VOCAB_SIZE)
    with torch.no_grad():  # and the run trained: not the base's logits
        assert (want - model(x).logits).abs().max() > 1e-3
    # merged/ chats in gemma3's format and stops at <end_of_turn> (106), the tokenizer's <eos> (1) beside it
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    stops = json.loads((merged / "generation_config.json").read_text())["eos_token_id"]
    assert 106 in (stops if isinstance(stops, list) else [stops]) and tokenizer.eos_token == "<end_of_turn>"
