"""new_special_tokens as a LLaMA-Factory user brings it: a save_pretrained Qwen2 (tied embeddings, 384 rows, a small
byte-level BPE of 381 ids), alpaca data whose answers hold `<think>` ... `</think>`, a LoRA recipe adding four tokens
-> `python -m pipeline build`, `train` (ZeRO-3; a run killed after step 1 resumes to the same adapter), `merge` ->
transformers' AutoTokenizer on merged/ encodes `<think>` as the new id training used, AutoModelForCausalLM on merged/
gives our logits, and PEFT loads adapter/ onto the base grown as the adapter's tokenizer says (the steps
docs/tokenizers-templates.md gives)."""
from __future__ import annotations

import json

from tests.acceptance.harness import (assert_close, assert_same_run, crash_copy, pipeline, trained_model,
                                     write_hf_checkpoint, write_recipe)

NEW = ["<think>", "</think>", "<tool_call>", "</tool_call>"]  # 381 + 4 ids > the 384 rows: the embedding grows
ROWS = [{"instruction": f"question {i}", "input": "",
         "output": f"<think>step {i} then {i + 1}</think>the answer is {i}"} for i in range(8)]


def test_new_special_tokens_train_merge_and_load_in_transformers_and_peft(tmp_path):
    import torch
    import transformers
    from peft import PeftModel

    base = tmp_path / "qwen2"
    write_hf_checkpoint(base, "qwen2", small_vocab=True)  # 384 ids, tied head
    data = tmp_path / "data"
    data.mkdir()
    (data / "think.json").write_text(json.dumps(ROWS), encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({"think": {"file_name": "think.json"}}), encoding="utf-8")
    recipe = write_recipe(tmp_path / "think.yaml", model_name_or_path=str(base), dataset_dir="data", dataset="think",
                          template="qwen", new_special_tokens=",".join(NEW), cutoff_len=256, val_size=0,
                          learning_rate=0.05, max_steps=2, output_dir="saves/think", zero_stage=3, save_steps=1)
    for command in ("build", "train", "merge"):
        pipeline(command, recipe, cwd=tmp_path)
    out = tmp_path / "saves/think"
    # exact resume (ZeRO-3 partitions the grown embedding): a run killed after step 1 ends where this one did
    crash_copy(out, tmp_path / "saves/crashed", 1)
    pipeline("train", recipe, "output_dir=saves/crashed", "resume_from_checkpoint=latest", cwd=tmp_path)
    assert_same_run(out, tmp_path / "saves/crashed", "adapter/adapter_model.safetensors")

    theirs = transformers.AutoTokenizer.from_pretrained(base)
    first = len(theirs)
    assert theirs.add_tokens(NEW, special_tokens=True) == 4  # as LLaMA-Factory adds them
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "merged")
    assert tokenizer.convert_tokens_to_ids(NEW) == list(range(first, first + 4))
    text = "<think>step 1</think>the answer"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == first and first + 1 in ids
    assert theirs(text, add_special_tokens=False)["input_ids"] == ids
    assert json.loads((out / "merged/config.json").read_text())["vocab_size"] == 448  # 385 ids padded to 64

    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert merged.get_output_embeddings().weight.data_ptr() == merged.get_input_embeddings().weight.data_ptr()
    ours = trained_model(recipe, tmp_path)
    batch = torch.tensor([ids + [first + 3, first + 2]])
    with torch.no_grad():
        mine = ours(batch)
        assert_close(merged(batch).logits, mine)

        # the new rows trained (LoRA makes the embedding and tied head modules_to_save): not the base's init
        start = transformers.AutoModelForCausalLM.from_pretrained(base)
        assert start.get_input_embeddings().weight.shape[0] == 384
        adapter_tok = transformers.AutoTokenizer.from_pretrained(out / "adapter")
        start.resize_token_embeddings(len(adapter_tok), pad_to_multiple_of=64, mean_resizing=False)
        peft = PeftModel.from_pretrained(start, out / "adapter").eval()
        assert_close(peft(batch).logits, mine)
        config = json.loads((out / "adapter/adapter_config.json").read_text())
        assert {name.split(".")[-1] for name in config["modules_to_save"]} == {"embed_tokens", "lm_head"}

    # the new rows trained: merged/ holds other values than the rows the run started from (the base grown as
    # pipeline.model.vocab grows it, with the recipe's seed)
    from pipeline.model.vocab import resize_vocab
    from pipeline.model.weights import load_model

    started = load_model(base)
    resize_vocab(started, first + 4, seed=7)
    rows = merged.get_input_embeddings().weight[first:first + 2]
    assert not torch.allclose(rows, started.embed_tokens.weight[first:first + 2])
