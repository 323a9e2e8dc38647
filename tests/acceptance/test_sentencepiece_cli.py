"""The user's path with a sentencepiece tokenizer: a transformers-written LlamaForCausalLM (vocabulary 32,000, the
Mistral 7B v0.1 / Llama 2 shape; 2 layers, tiny width) with Mistral-7B-v0.1's tokenizer files
(tests/helpers/sp_vocab.py) -> `python -m pipeline build / train (LoRA sft, template default, a new special token) /
merge / generate` (train as typed, build, merge and generate in process); merged/ loads in transformers with
the grown vocabulary, AutoTokenizer on merged/ encodes as on the base and gives the new token the id training used,
and the training ids are LLaMA-Factory's: each template piece encoded on its own with add_special_tokens=False
(each with its prefix "▁"), EOS by id, no BOS (the default template has none).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.harness import pipeline, sft_rows, write_data, write_recipe
from tests.helpers.sp_vocab import write_sp_tokenizer_dir

TEXTS = ["Repeat the words: red river", "  two  spaces\tand a tab\n", "emoji 🦙 and 龘", "</s> typed", ""]


REPO_ID = "meta-llama/Llama-2-7b-chat-hf"


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    """A workdir with data/, the checkpoint at base/, one LoRA run trained and merged. base/ is the snapshot of
    Llama-2-7b-chat-hf's hub id in an HF_HUB_OFFLINE=1 cache, laid out as the hub holds it (tests/helpers/
    hub_layout.py): save_pretrained's weights in shards + index, beside them the pickled pytorch_model-0000i-of-00002
    .bin + index (each creates pickle_ran when unpickled) and a sentencepiece tokenizer.model; train names the id."""
    import torch
    import transformers

    from tests.acceptance.harness import cli_env
    from tests.helpers.hub_layout import add_llama2_decoys, hub_cache, save_sharded

    root = tmp_path_factory.mktemp("sentencepiece")
    write_data(root / "data")
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    save_sharded(transformers.LlamaForCausalLM(config), root / "download")
    write_sp_tokenizer_dir(root / "download", "mistral_v1")
    add_llama2_decoys(root / "download", root / "pickle_ran")
    (root / "base").symlink_to(hub_cache(root / "hf", REPO_ID, root / "download"))
    recipe = write_recipe(root / "lora.yaml", model_name_or_path=REPO_ID, dataset_dir="data",
                          template="default", output_dir="saves/lora", cutoff_len=64, add_special_tokens="<tool>")
    env = cli_env(HF_HOME=str(root / "hf"))
    pipeline("build", recipe, cwd=root, as_typed=False, env=env)
    pipeline("train", recipe, cwd=root, env=env)  # as typed; the others in process (the same code, no interpreter start)
    pipeline("merge", recipe, cwd=root, as_typed=False, env=env)
    return root


def test_the_hub_layouts_pickles_and_tokenizer_model_are_left_alone(session):
    """Nothing unpickled the .bin decoys (they would have created pickle_ran), and merged/ holds neither them nor
    the sentencepiece tokenizer.model: the weights as safetensors, the tokenizer files that were read."""
    from tests.helpers.hub_layout import LLAMA2_DECOYS

    assert not (session / "pickle_ran").exists()
    merged = {p.name for p in (session / "saves/lora/merged").iterdir()}
    assert not set(LLAMA2_DECOYS) & merged and "tokenizer.json" in merged, sorted(merged)


def test_merged_loads_in_transformers_with_the_same_tokenizer(session):
    import transformers

    merged = session / "saves/lora/merged"
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.vocab_size == 32064  # 32,001 padded to 64
    base_tok = transformers.AutoTokenizer.from_pretrained(session / "base")
    merged_tok = transformers.AutoTokenizer.from_pretrained(merged)
    for text in TEXTS:
        assert merged_tok.encode(text) == base_tok.encode(text), text
        assert merged_tok.decode(base_tok.encode(text)) == base_tok.decode(base_tok.encode(text)), text
    assert (merged_tok.bos_token, merged_tok.eos_token) == ("<s>", "</s>")
    assert merged_tok.encode("a <tool> b", add_special_tokens=False) == [264, 28705, 32000, 287]


def test_generate_decodes_as_transformers(session):
    """generate (the base model, greedy, the default template) prints what transformers' decode of the same new ids
    gives: the completion text, byte fallback joined, its first prefix space stripped as the sentencepiece decoder
    does. (A recipe without the new token: the rows it grows, never trained, would win greedy on this random model
    and decode to nothing.)"""
    import torch
    import transformers

    prompt = "Repeat the words: red 🦙"
    recipe = write_recipe(session / "plain.yaml", model_name_or_path=str(session / "base"), dataset_dir="data",
                          template="default", output_dir="saves/plain")
    out = pipeline("generate", recipe, "--prompt", prompt, "--model", "base", cwd=session, as_typed=False)
    hf = transformers.AutoTokenizer.from_pretrained(session / "base")
    model = transformers.AutoModelForCausalLM.from_pretrained(session / "base")
    ids = hf.encode("Human: " + prompt, add_special_tokens=False) + [2] + hf.encode("\nAssistant:",
                                                                                   add_special_tokens=False)
    new = model.generate(torch.tensor([ids]), max_new_tokens=4, do_sample=False, eos_token_id=2, pad_token_id=2)
    expected = hf.decode(new[0, len(ids):], skip_special_tokens=True)
    assert expected and out.stdout.rstrip("\n") == expected


def test_training_ids_are_llamafactorys(session):
    """LLaMA-Factory's default template (data/template.py: format_user ["Human: {{content}}", {"eos_token"},
    "\\nAssistant:"], format_assistant ["{{content}}", {"eos_token"}, "\\n"]), each string element encoded by
    Template._convert_elements_to_ids with tokenizer.encode(elem, add_special_tokens=False)."""
    import transformers

    from pipeline.data.model_tokenizer import load_tokenizer
    from pipeline.data.tokenize import encode_example

    hf = transformers.AutoTokenizer.from_pretrained(session / "base")
    row = sft_rows(1)[0]

    def enc(text: str) -> list[int]:
        return hf.encode(text, add_special_tokens=False)

    prompt = enc("Human: " + row["instruction"]) + [2] + enc("\nAssistant:")
    answer = enc(row["output"]) + [2] + enc("\n")
    got = encode_example(row, "default", load_tokenizer(session / "base"), cutoff_len=64)
    assert got.input_ids == prompt + answer
    assert got.labels == [-100] * len(prompt) + answer
    log = [json.loads(line) for line in (session / "saves/lora/trainer_log.jsonl").read_text().splitlines()]
    assert log and all(entry.get("loss", 0) > 0 for entry in log if "loss" in entry)
