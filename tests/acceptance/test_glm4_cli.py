"""The GLM-4-0414 user path through the CLI: a Glm4ForCausalLM as transformers' save_pretrained writes it (q / k / v
biases, the fused gate_up_proj, half of each head rotated in adjacent pairs, four norms per block, GQA) with a small
byte-level tokenizer holding GLM's special tokens, an LLaMA-Factory-format LoRA sft recipe with template glm4,
lora_target all and neat_packing, on alpaca rows and multi-turn sharegpt rows with a system prompt -> build / train /
merge as typed; the packed batches carry glm4's efficient_eos labels; merged/ loads in transformers as
Glm4ForCausalLM and PEFT reads adapter/, both computing what our trained model computes; the exported chat template
renders the training prompt."""
from __future__ import annotations

import json

from tests.acceptance.harness import (assert_outputs_compute_ours, build_train_merge, cli_env, pipeline, refused,
                                      save_pretrained_small, write_recipe)

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, max_position_embeddings=256, tie_word_embeddings=False)


def write_chat_data(data) -> None:
    """LLaMA-Factory's sharegpt format with a system column: three-turn conversations (dataset glm_chat)."""
    rows = [{"system": "Be brief.", "conversations": [
        {"from": "human", "value": f"Say {w}."}, {"from": "gpt", "value": w},
        {"from": "human", "value": "Again, twice."}, {"from": "gpt", "value": f"{w} {w}"},
        {"from": "human", "value": "Once more?"}, {"from": "gpt", "value": f"{w} ({k})"}]}
        for k, w in enumerate(("red", "blue", "green", "hill", "river", "stone", "cloud", "tree"))]
    (data / "raw" / "chat.json").write_text(json.dumps(rows), encoding="utf-8")
    registry = json.loads((data / "dataset_info.json").read_text())
    registry["glm_chat"] = {"file_name": "raw/chat.json", "formatting": "sharegpt",
                            "columns": {"messages": "conversations", "system": "system"}}
    (data / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")


def test_lora_sft_from_a_save_pretrained_glm4_merges_to_glm4(workdir, monkeypatch):
    import torch
    import transformers

    base = workdir / "GLM-4-9B-0414"
    save_pretrained_small(base, "glm4", "Glm4ForCausalLM", "Glm4Config", ("eos_token_id", "pad_token_id"), **TINY)
    write_chat_data(workdir / "data")
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset="tiny_sft,glm_chat",
                          dataset_dir="data", template="glm4", lora_target="all", output_dir="saves/r",
                          learning_rate=0.05, cutoff_len=96, packing=True, neat_packing=True)
    message = refused("validate", recipe, "train_on_prompt=true", cwd=workdir, as_typed=False)
    assert "train_on_prompt: given true, but template glm4 (LLaMA-Factory's efficient_eos" in message, message
    message = refused("validate", recipe, "stage=dpo", cwd=workdir, as_typed=False)
    assert "template: given 'glm4' with stage: dpo, but its efficient_eos rows are written for stage sft" in message
    # a recipe without template gets the notice naming GLM-4's own (FAMILY_TEMPLATES; validate then refuses the
    # unbuilt data)
    told = pipeline("validate", write_recipe(workdir / "n.yaml", model_name_or_path=str(base), dataset_dir="data",
                                             template=None), cwd=workdir, as_typed=False, expect=None).stderr
    assert "this glm4 model, whose own chat format is template: glm4" in told, told
    config, adapter = build_train_merge(recipe, workdir)
    # inspect marks each later <|user|> as trained: it says the label there is the EOS, not the token
    shown = pipeline("inspect", recipe, "--num", "40", cwd=workdir, as_typed=False).stdout
    assert "<|user|>]]" in shown and "template glm4 (efficient_eos) writes no EOS after an answer: the first " \
        "token of each later prompt, marked, is trained to predict the EOS <|endoftext|>" in shown, shown
    merged = workdir / "saves/r/merged"
    assert (config["architectures"], config["model_type"], config["partial_rotary_factor"], config["attention_bias"],
            config["head_dim"]) == (["Glm4ForCausalLM"], "glm4", 0.5, True, 8)
    assert adapter["target_modules"] == ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(theirs).__name__ == "Glm4ForCausalLM"
    x, want = assert_outputs_compute_ours(recipe, workdir, base, theirs, config["vocab_size"])
    with torch.no_grad():  # and the run trained: not the base's logits
        assert (want - transformers.AutoModelForCausalLM.from_pretrained(base)(x).logits).abs().max() > 1e-3

    # the packed training rows carry efficient_eos's labels: the answer before a later <|user|> learns the EOS there
    from pipeline.data.loaders import make_loader
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    monkeypatch.chdir(workdir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    eos, user = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|user|>")
    batches = list(make_loader(data_args(resolve(str(recipe), [], command="train", env=cli_env(WORLD_SIZE="1"))),
                               "train", rank=0, world_size=1, shuffle=False))
    assert "segment_ids" in batches[0]
    relabelled = sum(int(((b["labels"][:, :-1] == eos) & (b["input_ids"][:, 1:] == user)).sum()) for b in batches)
    assert relabelled > 0

    # the export's chat template renders the prompt training builds
    from pipeline.data.model_tokenizer import load_tokenizer
    from pipeline.data.tokenize import encode_prompt

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompt = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]
    assert prompt == encode_prompt("glm4", "Name a colour.", system="Be brief.", tokenizer=load_tokenizer(base))
    assert tokenizer.decode(prompt) == "[gMASK]<sop><|system|>\nBe brief.<|user|>\nName a colour.<|assistant|>"
