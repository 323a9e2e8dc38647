"""The user's path with Llama 2: a transformers-written LlamaForCausalLM (vocabulary 32,000; 2 layers, tiny width) by its
hub id meta-llama/Llama-2-7b-chat-hf from an HF_HUB_OFFLINE=1 cache laid out as the hub holds it (tests/helpers/
hub_layout.py: safetensors shards + index beside the pickled pytorch_model-0000i-of-00002.bin decoys and a
sentencepiece tokenizer.model nothing may read), with Llama-2-7b-hf's tokenizer files (tests/helpers/sp_vocab.py
"llama2": the legacy tokenizer.json form, tokenizer_class LlamaTokenizer, add_bos_token; Mistral v0.1's vocabulary
stands in for Llama 2's, which is not on PyPI), an LLaMA-Factory-format LoRA sft recipe with `template: llama2` and a
system prompt (default_system) -> `python -m pipeline build / train / merge / export / generate` (train as typed, the
others in process). transformers loads merged/ as LlamaForCausalLM; PEFT's merge_and_unload of adapter/ on the
checkpoint gives merged/'s weights; AutoTokenizer + apply_chat_template on the export give the ids training used,
which are LLaMA-Factory's; our greedy generate prints what transformers' greedy generate on merged/ gives.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.harness import answer_in_turn, cli_env, pipeline, write_data, write_recipe
from tests.helpers.sp_vocab import write_sp_tokenizer_dir
from tests.vocab.test_chat_template import messages
from tests.vocab.test_sentencepiece_templates import lf_example, lf_ids, lf_texts

REPO_ID = "meta-llama/Llama-2-7b-chat-hf"
SYSTEM = "You are a terse parrot."
PROMPT = "Repeat the words: red 🦙"
ANSWER = "red 🦙"  # what the checkpoint says after any prompt (answer_in_turn), then </s>


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    """A workdir with data/, base/ (the hub id's cached snapshot, decoys included), and one LoRA run trained (as
    typed), merged and exported by the LLaMA-Factory export recipe (model_name_or_path + adapter_name_or_path +
    export_dir), each naming the hub id."""
    import torch
    import transformers

    from tests.helpers.hub_layout import add_llama2_decoys, hub_cache, save_sharded

    root = tmp_path_factory.mktemp("llama2")
    write_data(root / "data")
    write_sp_tokenizer_dir(root / "download", "llama2")
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    tok = transformers.AutoTokenizer.from_pretrained(root / "download")
    answer_in_turn(model, tok.encode(ANSWER, add_special_tokens=False) + [2])
    save_sharded(model, root / "download")
    add_llama2_decoys(root / "download", root / "pickle_ran")
    (root / "base").symlink_to(hub_cache(root / "hf", REPO_ID, root / "download"))
    recipe = write_recipe(root / "lora.yaml", model_name_or_path=REPO_ID, dataset_dir="data", template="llama2",
                          default_system=SYSTEM, output_dir="saves/lora", cutoff_len=96, max_new_tokens=12)
    (root / "export.yaml").write_text(f"model_name_or_path: {REPO_ID}\nadapter_name_or_path: saves/lora\n"
                                      f"template: llama2\ndefault_system: {SYSTEM}\nexport_dir: saves/export\n")
    env = cli_env(HF_HOME=str(root / "hf"))
    pipeline("build", recipe, cwd=root, as_typed=False, env=env)
    pipeline("train", recipe, cwd=root, env=env)  # as typed; the others in process (the same code, no interpreter start)
    pipeline("merge", recipe, cwd=root, as_typed=False, env=env)
    pipeline("export", "export.yaml", cwd=root, as_typed=False, env=env)
    return root


def test_merged_is_peft_merge_and_unload_of_the_adapter(session):
    """merged/ loads in transformers as LlamaForCausalLM (32,000 rows, no token added) and holds what PEFT's
    merge_and_unload of adapter/ on the checkpoint gives, tensor by tensor; the export is the same model. Nothing
    unpickled the .bin decoys, and neither output holds them or the tokenizer.model."""
    import peft
    import torch
    import transformers

    from tests.helpers.hub_layout import LLAMA2_DECOYS

    merged = transformers.AutoModelForCausalLM.from_pretrained(session / "saves/lora/merged")
    assert type(merged).__name__ == "LlamaForCausalLM" and merged.config.vocab_size == 32000
    base = transformers.AutoModelForCausalLM.from_pretrained(session / "base")
    theirs = peft.PeftModel.from_pretrained(base, session / "saves/lora/adapter").merge_and_unload().state_dict()
    exported = transformers.AutoModelForCausalLM.from_pretrained(session / "saves/export").state_dict()
    ours = merged.state_dict()
    assert ours.keys() == theirs.keys() == exported.keys()
    for key, value in ours.items():
        assert torch.allclose(value, theirs[key], atol=1e-6, rtol=0), key
        assert torch.equal(value, exported[key]), key
    assert not (session / "pickle_ran").exists()
    for out in ("saves/lora/merged", "saves/export"):
        names = {p.name for p in (session / out).iterdir()}
        assert not set(LLAMA2_DECOYS) & names and "tokenizer.json" in names, sorted(names)


def test_the_exports_chat_template_gives_the_training_ids(session, monkeypatch):
    """AutoTokenizer + apply_chat_template on the export (its chat template: llama2 with the recipe's system prompt)
    give, for every training row, the ids training used (tokenized_split: the build's rows through the recipe's
    template) and, for the prompt alone, the ids generation starts from; both are LLaMA-Factory's llama2 ids
    (tests/vocab/test_sentencepiece_templates.lf_ids: each template string encoded on its own by AutoTokenizer on the
    checkpoint, <s> / </s> by id)."""
    import transformers

    from pipeline.data.tokenize import tokenized_split
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    exported = transformers.AutoTokenizer.from_pretrained(session / "saves/export")
    golden = transformers.AutoTokenizer.from_pretrained(session / "base")
    rows = json.loads((session / "data/build/tiny_sft/train.json").read_text("utf-8"))
    monkeypatch.setenv("HF_HOME", str(session / "hf"))  # where the hub id resolves (read from the environment)
    monkeypatch.chdir(session)
    split = tokenized_split(data_args(resolve(Path("lora.yaml"), [], command="train", env=cli_env(WORLD_SIZE="1"))),
                            "train")
    assert len(split) == len(rows) > 0
    for i, row in enumerate(rows):
        trained = split.example(i)
        pairs = lf_ids(golden, lf_texts("llama2", [(row["instruction"], row["output"])], SYSTEM))
        assert (trained.input_ids, trained.labels) == lf_example(pairs), i
        chat = messages(None, [], row["instruction"], row["output"])
        assert exported.apply_chat_template(chat, return_dict=True)["input_ids"] == trained.input_ids, i
        prompt = exported.apply_chat_template(chat[:-1], add_generation_prompt=True, return_dict=True)["input_ids"]
        assert prompt == pairs[0][0] == trained.input_ids[:len(prompt)], i
    assert pairs[0][0][:2] == [1, golden.convert_tokens_to_ids("▁[")]  # <s>, then "▁[": Llama 2's "<s> [INST]"


def test_generate_equals_transformers_greedy_generate(session):
    """`pipeline generate --model merged` (greedy, the recipe's llama2 template and system prompt) prints
    transformers' decode of transformers' greedy generate on merged/ from apply_chat_template's prompt: " red 🦙"'s
    ids, then </s> (12 new tokens allowed)."""
    import torch
    import transformers

    merged = session / "saves/lora/merged"
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                     return_dict=True)["input_ids"]
    new = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert new == tok.encode(ANSWER, add_special_tokens=False) + [2]
    out = pipeline("generate", session / "lora.yaml", "--prompt", PROMPT, "--model", "merged", cwd=session,
                   as_typed=False, env=cli_env(HF_HOME=str(session / "hf")))
    assert out.stdout.rstrip("\n") == tok.decode(new, skip_special_tokens=True) == ANSWER
