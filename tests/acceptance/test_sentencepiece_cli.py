"""The user's path with a sentencepiece tokenizer and its chat template: a transformers-written MistralForCausalLM
(vocabulary 32,768; 2 layers, tiny width) with Mistral-7B-Instruct-v0.3's tokenizer files beside it, as the hub's
folder has them (tests/helpers/sp_vocab.py), an LLaMA-Factory-format LoRA sft recipe with `template: mistral` (and a
new special token) and dataset -> `python -m pipeline build / train / merge / generate` (train as typed, build, merge
and generate in process); merged/ loads in transformers as MistralForCausalLM with the grown vocabulary, AutoTokenizer
on merged/ encodes as on the base, gives the new token the id training used and renders the training prompt with the
exported chat template; generate stops at </s> as transformers' generate does; the training ids are LLaMA-Factory's
(v0.3's [INST] / [/INST] control tokens by id, each template string encoded on its own with add_special_tokens=False,
BOS and EOS by id); an `export` of merged/ with `template: llama2` chats with LLaMA-Factory's llama2 ids.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.harness import answer_in_turn, pipeline, sft_rows, write_data, write_recipe
from tests.data.lf_tool_goldens import GOLDEN, MESSAGES, TOOLS
from tests.helpers.sp_vocab import write_sp_tokenizer_dir
from tests.vocab.test_sentencepiece_templates import lf_example, lf_ids

TEXTS = ["Repeat the words: red river", "  two  spaces\tand a tab\n", "emoji 🦙 and 龘", "</s> typed", ""]
PROMPT = "Repeat the words: red 🦙"
ANSWER = "red 🦙"  # what the checkpoint says after any prompt (answer_in_turn), then </s>
SYSTEM = "You are a weather bot."
TOOL_ANSWERS = ("It is 10:00 in both.", "Both say 10:00.")
LF_ROLES = {"user": "human", "assistant": "gpt", "function": "function_call", "observation": "observation"}


def write_tool_chat(data: Path) -> None:
    """LLaMA-Factory's function-calling data as users bring it: a sharegpt entry with system and tools columns, the
    conversation of tests/data/lf_tool_goldens.py (tools, two function calls, two tool results), with two last answers."""
    conversation = [{"from": LF_ROLES[m["role"]], "value": m["content"]} for m in MESSAGES]
    conversation.append({"from": "observation", "value": '{"Rome": "10:00", "Köln": "10:00"}'})
    rows = [{"conversations": [*conversation, {"from": "gpt", "value": answer}], "system": SYSTEM, "tools": TOOLS}
            for answer in TOOL_ANSWERS]  # a train and a val row
    (data / "raw" / "tool_chat.json").write_text(json.dumps(rows), encoding="utf-8")
    registry = json.loads((data / "dataset_info.json").read_text())
    registry["tool_chat"] = {"file_name": "raw/tool_chat.json", "formatting": "sharegpt",
                             "columns": {"messages": "conversations", "system": "system", "tools": "tools"}}
    (data / "dataset_info.json").write_text(json.dumps(registry, indent=2))


def answer_ids(tokenizer) -> list[int]:
    """" red 🦙" as the answer's pieces ("▁red", "▁", the four <0xNN> bytes of 🦙)."""
    return tokenizer.encode(" " + ANSWER, add_special_tokens=False)


REPO_ID = "mistralai/Mistral-7B-Instruct-v0.3"


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    """A workdir with data/, the checkpoint at base/, one LoRA run trained and merged. base/ is the snapshot of
    Mistral-7B-Instruct-v0.3's hub id in an HF_HUB_OFFLINE=1 cache, laid out as the hub holds it (tests/helpers/
    hub_layout.py): save_pretrained's weights in shards + index, beside them consolidated.safetensors (Mistral's own
    names), params.json and the sentencepiece tokenizer.model / .v3, and pickled pytorch_model-0000i-of-00002.bin +
    index as Llama-2-7b-chat-hf's folder holds them (each creates pickle_ran when unpickled); train names the id."""
    import torch
    import transformers

    from tests.acceptance.harness import cli_env
    from tests.helpers.hub_layout import add_llama2_decoys, add_mistral_decoys, hub_cache, save_sharded

    root = tmp_path_factory.mktemp("sentencepiece")
    write_tool_chat(write_data(root / "data"))
    write_sp_tokenizer_dir(root / "download", "mistral_v3")
    config = transformers.MistralConfig(vocab_size=32768, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                        sliding_window=None, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config)
    answer_in_turn(model, answer_ids(transformers.AutoTokenizer.from_pretrained(root / "download")) + [2])
    save_sharded(model, root / "download")
    add_mistral_decoys(root / "download", config)
    add_llama2_decoys(root / "download", root / "pickle_ran")  # pickled copies, as Llama-2-7b-chat-hf's folder has
    (root / "base").symlink_to(hub_cache(root / "hf", REPO_ID, root / "download"))
    recipe = write_recipe(root / "lora.yaml", model_name_or_path=REPO_ID, dataset_dir="data",
                          template="mistral", output_dir="saves/lora", cutoff_len=400, add_special_tokens="<tool>",
                          dataset="tiny_sft,tool_chat",
                          max_new_tokens=12)
    env = cli_env(HF_HOME=str(root / "hf"))
    pipeline("build", recipe, cwd=root, as_typed=False, env=env)
    pipeline("train", recipe, cwd=root, env=env)  # as typed; the others in process (the same code, no interpreter start)
    pipeline("merge", recipe, cwd=root, as_typed=False, env=env)
    return root


def test_the_hub_layouts_decoys_are_left_alone(session):
    """Nothing unpickled the .bin decoys (they would have created pickle_ran), and merged/ holds none of the hub's
    other files (consolidated.safetensors, params.json, the sentencepiece models, the pickles): the weights as
    safetensors, the tokenizer files that were read."""
    from tests.helpers.hub_layout import LLAMA2_DECOYS, MISTRAL_DECOYS

    assert not (session / "pickle_ran").exists()
    merged = {p.name for p in (session / "saves/lora/merged").iterdir()}
    assert not set(LLAMA2_DECOYS + MISTRAL_DECOYS) & merged and "tokenizer.json" in merged, sorted(merged)


def test_merged_loads_in_transformers_with_the_same_tokenizer(session):
    import transformers

    merged = session / "saves/lora/merged"
    model = transformers.AutoModelForCausalLM.from_pretrained(merged)
    assert type(model).__name__ == "MistralForCausalLM" and model.config.vocab_size == 32832  # 32,769 padded to 64
    base_tok = transformers.AutoTokenizer.from_pretrained(session / "base")
    merged_tok = transformers.AutoTokenizer.from_pretrained(merged)
    for text in TEXTS:
        assert merged_tok.encode(text) == base_tok.encode(text), text
        assert merged_tok.decode(base_tok.encode(text)) == base_tok.decode(base_tok.encode(text)), text
    assert (merged_tok.bos_token, merged_tok.eos_token) == ("<s>", "</s>")
    assert merged_tok.encode("a <tool> b", add_special_tokens=False) == (
        base_tok.encode("a ", add_special_tokens=False) + [32768] + base_tok.encode(" b", add_special_tokens=False))


def test_merged_chats_in_the_training_format_and_stops_at_eos(session):
    """transformers on merged/: the exported chat template renders the prompt training writes (LLaMA-Factory's
    mistral: BOS, "[INST] {query}[/INST]" with v0.3's [INST] 3 and [/INST] 4 by id), greedy generate says " red 🦙"
    and stops at </s> (12 new tokens allowed); `pipeline generate --model merged` prints transformers' decode of the
    same ids, the byte-fallback tokens joined and the prefix space stripped."""
    import torch
    import transformers

    merged = session / "saves/lora/merged"
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    model = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                     return_dict=True)["input_ids"]
    assert prompt == [1] + tok.encode("[INST] " + PROMPT + "[/INST]", add_special_tokens=False)
    assert prompt[1] == 3 and prompt[-1] == 4
    new = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    assert new == answer_ids(tok) + [2]  # stopped at </s>: generation_config.json's eos_token_id
    from tests.acceptance.harness import cli_env

    out = pipeline("generate", session / "lora.yaml", "--prompt", PROMPT, "--model", "merged", cwd=session,
                   as_typed=False, env=cli_env(HF_HOME=str(session / "hf")))  # the recipe names the cached hub id
    assert out.stdout.rstrip("\n") == tok.decode(new, skip_special_tokens=True) == ANSWER


def test_an_export_with_llama2_chats_with_the_training_ids(session):
    """`python -m pipeline export` of merged/ (LLaMA-Factory's export recipe: model_name_or_path, template llama2,
    export_dir) writes a chat template that transformers' apply_chat_template on the export turns into LLaMA-Factory's
    llama2 ids on this vocabulary (test_sentencepiece_templates.lf_ids: each template string encoded on its own by
    AutoTokenizer), which are training's: the prompt after several turns with a system prompt or none, and the whole
    conversation. Failed before: no "▁" before each answer after v0.3's [/INST] token."""
    import transformers

    from tests.acceptance.harness import cli_env
    from tests.vocab.test_chat_template import messages
    from tests.vocab.test_sentencepiece_templates import lf_texts

    (session / "export.yaml").write_text("model_name_or_path: saves/lora/merged\ntemplate: llama2\n"
                                         "export_dir: saves/llama2_export\n")
    pipeline("export", "export.yaml", cwd=session, as_typed=False, env=cli_env(HF_HOME=str(session / "hf")))
    exported = transformers.AutoTokenizer.from_pretrained(session / "saves/llama2_export")
    history = [("What is 2+2?", "4"), ("And 3+3?", " It's 6.")]
    for system in (SYSTEM, None):
        pairs = lf_ids(exported, lf_texts("llama2", [*history, (PROMPT, ANSWER)], system))
        whole = exported.apply_chat_template(messages(system, history, PROMPT, ANSWER), return_dict=True)
        prompt = exported.apply_chat_template(messages(system, history, PROMPT), add_generation_prompt=True,
                                              return_dict=True)
        assert whole["input_ids"] == lf_example(pairs)[0]
        assert prompt["input_ids"] == [t for p, a in pairs[:-1] for t in p + a] + pairs[-1][0]


def test_training_ids_are_llamafactorys(session):
    """LLaMA-Factory's mistral template (data/template.py:1780-1791: format_prefix [{"bos_token"}], format_user
    ["[INST] {{content}}[/INST]"], format_assistant [" {{content}}", {"eos_token"}]), each string element encoded by
    Template._convert_elements_to_ids (:113-130) with tokenizer.encode(elem, add_special_tokens=False); the
    function-calling conversation as LLaMA-Factory renders it (tests/data/lf_tool_goldens.py) plus a tool result
    and an answer (format_observation, format_assistant). Failed before: one "▁" too many after
    [/AVAILABLE_TOOLS]."""
    import transformers

    from pipeline.data.model_tokenizer import load_tokenizer
    from pipeline.data.tokenize import encode_example

    hf = transformers.AutoTokenizer.from_pretrained(session / "base")
    row = sft_rows(1)[0]

    def enc(text: str) -> list[int]:
        return hf.encode(text, add_special_tokens=False)

    prompt = [1] + enc("[INST] " + row["instruction"] + "[/INST]")
    answer = enc(" " + row["output"]) + [2]
    got = encode_example(row, "mistral", load_tokenizer(session / "base"), cutoff_len=64)
    assert got.input_ids == prompt + answer and {3, 4} <= set(prompt)
    assert got.labels == [-100] * len(prompt) + answer
    # the function-calling conversation as build wrote it (train and val split): LLaMA-Factory's own rendering's ids
    built = [r for split in ("train", "val") if (f := session / f"data/build/tool_chat/{split}.json").is_file()
             for r in json.loads(f.read_text("utf-8"))]
    assert sorted(r["output"] for r in built) == sorted(TOOL_ANSWERS)
    for built_row in built:
        pairs = lf_ids(hf, GOLDEN[("mistral", SYSTEM)]) + [(
            enc('[TOOL_RESULTS] {"content": {"Rome": "10:00", "Köln": "10:00"}}[/TOOL_RESULTS]'),
            enc(" " + built_row["output"]) + [2])]
        got = encode_example(built_row, "mistral", load_tokenizer(session / "base"), cutoff_len=400)
        assert (got.input_ids, got.labels) == lf_example(pairs)
    log = [json.loads(line) for line in (session / "saves/lora/trainer_log.jsonl").read_text().splitlines()]
    assert log and all(entry.get("loss", 0) > 0 for entry in log if "loss" in entry)
