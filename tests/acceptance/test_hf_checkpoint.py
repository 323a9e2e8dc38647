"""Training from a checkpoint in the layout users download (transformers' save_pretrained), via the CLI.

Regression for issue 19: Conv1D weights transposed on load were strided views that became parameters,
and DeepSpeed's broadcast (p.data.view(torch.uint8)) refused them; every such run exited 1.
"""
from __future__ import annotations

import json
import shutil

import torch

from tests.acceptance.harness import pipeline, write_recipe

WINDOW_PROMPT = "Say the colours: red, green, blue"  # its chat prompt is longer than Mistral's 8-position window


def test_one_lora_step_from_a_save_pretrained_gpt2(workdir, hf_checkpoint):
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                          output_dir="saves/r", max_steps=1)
    pipeline("build", recipe, cwd=workdir)
    done = pipeline("train", recipe, cwd=workdir)
    assert "must be 1 to view" not in done.stderr
    results = json.loads((workdir / "saves/r/all_results.json").read_text(encoding="utf-8"))
    assert results["global_step"] == 1
    assert (workdir / "saves/r/adapter/adapter_model.safetensors").is_file()


def test_lora_sft_from_a_save_pretrained_mistral_exports_mistral(workdir, monkeypatch):
    """A MistralForCausalLM (a sliding window in every layer, as Mistral-7B-v0.1's config) as a user brings it from
    the hub, with LLaMA-Factory's `template: mistral`: by its hub id from the offline cache (HF_HUB_OFFLINE=1), the
    snapshot laid out as the hub's Mistral-7B-Instruct-v0.3 (tests/helpers/hub_layout.py: save_pretrained's weights
    in 3 shards + index, beside them consolidated.safetensors in Mistral's names, params.json, tokenizer.model,
    tokenizer.model.v3). Build, LoRA sft and merge as typed; PEFT loads adapter/ on the checkpoint, merged/ loads as
    MistralForCausalLM with model_type and sliding_window kept and chats in mistral's format, and both compute what
    our trained model computes on rows longer than the 8-position window (so the shards were read, not the decoy,
    and the window is transformers'); no decoy is copied into merged/. cutoff_len (48) is past the window: a
    window bounds what a layer sees, not a row."""
    import transformers

    from tests.acceptance.harness import assert_outputs_compute_ours, write_hf_checkpoint
    from tests.helpers.hub_layout import MISTRAL_DECOYS, add_mistral_decoys, hub_cache, save_sharded

    folder = workdir / "download"
    model = write_hf_checkpoint(folder, "mistral", small_vocab=True)
    save_sharded(model, folder)
    add_mistral_decoys(folder, model.config)
    monkeypatch.setenv("HF_HOME", str(workdir / "hf"))  # the CLI's environment (cli_env) and trained_model's
    base = hub_cache(workdir / "hf", "mistralai/Mistral-7B-Instruct-v0.3", folder)
    shutil.rmtree(folder)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path="mistralai/Mistral-7B-Instruct-v0.3",
                          dataset_dir="data", template="mistral", output_dir="saves/r", learning_rate=0.05)
    pipeline("build", recipe, cwd=workdir)
    pipeline("train", recipe, cwd=workdir)
    pipeline("merge", recipe, cwd=workdir)
    merged = workdir / "saves/r/merged"
    assert not {*MISTRAL_DECOYS} & {p.name for p in merged.iterdir()}, sorted(p.name for p in merged.iterdir())
    config = json.loads((merged / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["sliding_window"]) == (
        ["MistralForCausalLM"], "mistral", 8)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(theirs).__name__ == "MistralForCausalLM" and theirs.config.sliding_window == 8
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)  # its chat template: the recipe's, as trained
    assert tokenizer.apply_chat_template([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}],
                                         tokenize=False) == "<s>[INST] S\n\nHi[/INST]"
    assert_outputs_compute_ours(recipe, workdir, base, theirs, config["vocab_size"])
    # `generate --model base --raw` past the window (prompt + new tokens > 8): the KV cache keeps only each layer's
    # last 7 positions (tests/model/test_window_cache.py); the text is transformers' greedy continuation (the random
    # base: the trained model answers EOS at once)
    original = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    prompt = tokenizer.encode(WINDOW_PROMPT, add_special_tokens=False)
    with torch.no_grad():
        new = original.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                pad_token_id=0)[0, len(prompt):].tolist()
    new = new[:next((i for i, t in enumerate(new) if t == tokenizer.eos_token_id), len(new))]
    assert len(prompt) + len(new) > 8 and len(new) > 2, (prompt, new)
    got = pipeline("generate", recipe, "--model", "base", "--raw", "--prompt", WINDOW_PROMPT, "max_new_tokens=12",
                   cwd=workdir, as_typed=False).stdout
    assert got == tokenizer.decode(new) + "\n", (got, tokenizer.decode(new))
