"""Build: manifest counts add up, deterministic disjoint split, dedup after NFC, rebuild only when stale,
sharegpt conversion with custom tags, pt corpora split like the book."""
from __future__ import annotations

import hashlib
import json
import math
import os

import pytest

from data_helpers import alpaca_rows, jsonl
from pipeline.prepare import build as build_command
from pipeline.recipe.args import data_args
from pipeline.recipe.resolve import count_train_examples
from pipeline.data.build import build, built_dir, split_text
from pipeline.data.load import load_split, split_files
from pipeline.data.tokenizer import gpt2
from pipeline.errors import UserError


def manifest(r, name):
    return json.loads((built_dir(r["dataset_dir"], name) / "manifest.json").read_text(encoding="utf-8"))


def rows_of(r, name):
    d = built_dir(r["dataset_dir"], name)
    return [json.loads((d / f"{s}.json").read_text(encoding="utf-8")) for s in ("train", "val")]


def key(row):
    return json.dumps(row, sort_keys=True)


@pytest.fixture
def messy(make_recipe):
    rows = alpaca_rows(40)
    rows += [
        {"instruction": "blank output", "input": "", "output": "  \n"},
        {"instruction": "null output", "input": "", "output": None},
        {"instruction": "\t", "input": "", "output": "no instruction"},
        dict(rows[0]), dict(rows[1]),                                     # exact duplicates
        {"instruction": "Caf\u00e9?", "input": "", "output": "Yes."},
        {"instruction": "Cafe\u0301?", "input": "", "output": "Yes."},    # same after NFC
    ]
    return make_recipe({"m": {"file_name": "raw/m.jsonl"}}, files={"raw/m.jsonl": jsonl(rows)}), rows


def test_manifest_counts_add_up(messy):
    r, rows = messy
    lines = build(data_args(r))
    m = manifest(r, "m")
    assert m["rows_read"] == len(rows) == 47
    assert m["removed"] == {"empty instruction": 1, "empty output": 2, "exact duplicate": 3,
                            "over num_samples": 0, "over max_samples": 0}
    assert m["rows_kept"] == 41 == m["rows_read"] - sum(m["removed"].values())
    assert m["splits"] == {"train": 41 - math.ceil(0.1 * 41), "val": math.ceil(0.1 * 41)} == {"train": 36, "val": 5}
    raw = os.path.join(r["dataset_dir"], "raw", "m.jsonl")
    assert m["sources"] == [{"path": "raw/m.jsonl", "sha256": hashlib.sha256(open(raw, "rb").read()).hexdigest(),
                             "rows": 47}]
    assert m["schema_version"] == 1 and m["stage"] == "sft"
    assert m["build_keys"] == {"stage": "sft", "val_size": 0.1, "seed": 42, "max_samples": None}
    train, val = rows_of(r, "m")
    assert len(train) == 36 and len(val) == 5
    for f in ("train.json", "val.json"):
        blob = (built_dir(r["dataset_dir"], "m") / f).read_bytes()
        assert m["files"][f] == {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob)}
    assert "removed: empty instruction 1, empty output 2, exact duplicate 3" in lines[1]
    # NFC: the decomposed form became the composed one, and counted as a duplicate of it
    assert {"instruction": "Caf\u00e9?", "input": "", "output": "Yes."} in train + val
    assert not any("\u0301" in row["instruction"] for row in train + val)


def test_rows_sit_on_their_own_lines(messy):
    r, _ = messy
    build(data_args(r))
    text = (built_dir(r["dataset_dir"], "m") / "train.json").read_text(encoding="utf-8").splitlines()
    rows = json.loads("\n".join(text))
    assert len(text) == len(rows)
    for i, line in enumerate(text):  # row i+1 on line i+1
        assert json.loads(line.lstrip("[").rstrip(",]")) == rows[i]


def test_split_is_deterministic_disjoint_and_covering(make_recipe, tmp_path):
    rows = alpaca_rows(100)
    a = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": jsonl(rows)}, val_size=0.25)
    build(data_args(a))
    train, val = rows_of(a, "d")
    assert len(val) == 25 and len(train) == 75
    assert not {key(x) for x in train} & {key(x) for x in val}
    assert sorted(map(key, train + val)) == sorted(map(key, rows))
    # the same inputs elsewhere build the same files, byte for byte
    other = dict(a, dataset_dir=str(tmp_path / "copy"))
    os.makedirs(other["dataset_dir"] + "/raw")
    for f in ("dataset_info.json", "raw/d.jsonl"):
        with open(os.path.join(a["dataset_dir"], f), "rb") as src, open(os.path.join(other["dataset_dir"], f), "wb") as dst:
            dst.write(src.read())
    build(data_args(other))
    for s in ("train.json", "val.json"):
        assert (built_dir(a["dataset_dir"], "d") / s).read_bytes() == (built_dir(other["dataset_dir"], "d") / s).read_bytes()
    # another seed, another split; the order inside a split is shuffled too
    build(data_args(dict(other, seed=7)))
    assert rows_of(other, "d")[1] != val
    assert [x["instruction"] for x in train] != sorted((x["instruction"] for x in train),
                                                       key=lambda s: int(s.split()[1][:-1]))


def test_unchanged_inputs_are_not_rebuilt(make_recipe):
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": jsonl(alpaca_rows(20))})
    build(data_args(r))
    stat = os.stat(built_dir(r["dataset_dir"], "d") / "manifest.json")
    assert build(data_args(r)) == [f"d: up to date ({built_dir(r['dataset_dir'], 'd')}/manifest.json)"]
    assert os.stat(built_dir(r["dataset_dir"], "d") / "manifest.json").st_mtime_ns == stat.st_mtime_ns

    def rebuilt(**changes) -> bool:
        return "built" in build(data_args(dict(r, **changes)))[0].split(":")[1]

    assert rebuilt(val_size=0.2)
    assert rebuilt(val_size=0.2) is False
    assert rebuilt(seed=1) and rebuilt(seed=1) is False
    assert rebuilt(max_samples=10)
    assert not rebuilt(max_samples=10, template="chatml", cutoff_len=99)  # tokenization keys do not matter
    with open(os.path.join(r["dataset_dir"], "raw", "d.jsonl"), "a") as handle:
        handle.write(json.dumps({"instruction": "new", "output": "row"}) + "\n")
    assert rebuilt(max_samples=10)
    with open(os.path.join(r["dataset_dir"], "dataset_info.json"), "w") as handle:
        json.dump({"d": {"file_name": "raw/d.jsonl", "num_samples": 5}}, handle)
    assert rebuilt(max_samples=10)
    (built_dir(r["dataset_dir"], "d") / "train.json").write_text("[]\n")  # a damaged output is rebuilt
    assert rebuilt(max_samples=10)
    assert not [p for p in os.listdir(built_dir(r["dataset_dir"], "d").parent) if p.startswith(".")]  # no temp dirs left


def test_num_samples_written_as_a_whole_float(make_recipe):
    """`"num_samples": 3.0` passes the registry schema (JSON Schema counts 3.0 as an integer); it crashed the build
    with a TypeError traceback (a float slice index)."""
    r = make_recipe({"d": {"file_name": "raw/d.jsonl", "num_samples": 3.0}},
                    files={"raw/d.jsonl": jsonl(alpaca_rows(10))}, val_size=1)
    build(data_args(r))
    assert manifest(r, "d")["rows_kept"] == 3 and manifest(r, "d")["removed"]["over num_samples"] == 7


def test_caps_and_too_few_rows(make_recipe):
    r = make_recipe({"d": {"file_name": "raw/d.jsonl", "num_samples": 30}},
                    files={"raw/d.jsonl": jsonl(alpaca_rows(50))}, max_samples=20)
    build(data_args(r))
    m = manifest(r, "d")
    assert m["removed"]["over num_samples"] == 20 and m["removed"]["over max_samples"] == 10
    assert m["rows_kept"] == 20
    kept = {x["instruction"] for x in sum(rows_of(r, "d"), [])}
    assert kept == {x["instruction"] for x in alpaca_rows(20)}  # the first rows, in file order
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}},
                    files={"raw/d.jsonl": jsonl(alpaca_rows(1) + [{"instruction": "x", "output": ""}])})
    with pytest.raises(UserError, match=r"dataset 'd' .*: 1 rows remain after cleaning \(read 2; removed: "
                                        r"empty output 1\); val_size 0.1 leaves 0 for training and 1 for validation"):
        build(data_args(r))


def test_sharegpt_with_custom_tags(make_recipe):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."},
    ]
    rows = [{"messages": conv}] + [{"messages": [{"role": "user", "content": f"q{i}"},
                                                 {"role": "assistant", "content": f"a{i}"}], "sys": "S"}
                                   for i in range(9)]
    entry = {"file_name": "raw/c.json", "formatting": "sharegpt", "columns": {"messages": "messages", "system": "sys"},
             "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                      "assistant_tag": "assistant", "system_tag": "system"}}
    r = make_recipe({"c": entry}, files={"raw/c.json": json.dumps(rows)})
    build(data_args(r))
    got = {x["instruction"]: x for x in load_split(data_args(r), "train") + load_split(data_args(r), "val")}
    assert got["Bye?"] == {"instruction": "Bye?", "input": "", "output": "Bye.", "system": "Be brief.",
                           "history": [["Hi", "Hello"]]}
    assert got["q3"] == {"instruction": "q3", "input": "", "output": "a3", "system": "S"}


def test_sharegpt_openai_tool_calls_are_refused_not_emptied(make_recipe):
    """An OpenAI-style assistant turn carries its function call in 'tool_calls' with content null: read as a sharegpt
    turn it became an empty answer (trained on the closing token alone) and the call was lost without a word."""
    call = {"role": "assistant", "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": "{}"}}]}
    rows = [{"messages": [{"role": "user", "content": "weather?"}, call, {"role": "tool", "content": "sunny"},
                          {"role": "assistant", "content": "It is sunny"}]}]
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "observation_tag": "tool"}
    r = make_recipe({"o": {"file_name": "raw/o.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
                           "tags": tags}}, files={"raw/o.jsonl": jsonl(rows)}, template="qwen", val_size=0)
    f = os.path.join(r["dataset_dir"], "raw", "o.jsonl")
    with pytest.raises(UserError) as err:
        build(data_args(r))
    (message,) = err.value.messages
    assert message.startswith(f"{f}:1: messages[1] has 'tool_calls' (an OpenAI-style function call), which a "
                              "sharegpt turn does not carry; write the call as a 'function_call' turn")


def test_sharegpt_bad_conversations(make_recipe):
    def turns(*pairs):
        return {"conversations": [{"from": f, "value": v} for f, v in pairs]}

    rows = [
        turns(("human", "a"), ("gpt", "b")),                          # 1 fine
        turns(("human", "a"), ("gpt", "b"), ("human", "c")),          # 2 ends with human
        turns(("humen", "a"), ("gpt", "b")),                          # 3 unknown role
        turns(("gpt", "a"), ("human", "b")),                          # 4 wrong order
        {"conversations": []},                                        # 5 empty
        {"conv": []},                                                 # 6 missing column
        turns(("human", "a"), ("gpt", "b"), ("system", "c"), ("gpt", "d")),  # 7 system late
        {"conversations": [{"from": "human", "text": "a"}]},          # 8 missing value
        turns(("human", "a"), ("function_call", '{"name": "f", "arguments": {}}'), ("observation", "r"),
              ("gpt", "b")),                                          # 9 a tool turn, template alpaca
        turns(("human", "a"), ("observation", "b")),                  # 10 a tool result where a response goes
    ]
    r = make_recipe({"s": {"file_name": "raw/s.jsonl", "formatting": "sharegpt"}}, files={"raw/s.jsonl": jsonl(rows)})
    with pytest.raises(UserError) as err:
        build(data_args(r))
    f = os.path.join(r["dataset_dir"], "raw", "s.jsonl")
    assert err.value.messages == [
        f"{f}:2: 'conversations' ends with 'human' turn; the last turn must be 'gpt' (the response) or 'function_call'",
        f"{f}:3: conversations[0].from is 'humen'; expected 'human' or 'gpt' (or 'system' as the first turn, "
        "'function_call' / 'observation' for tool use) (did you mean 'human'?)",
        f"{f}:4: conversations[0].from is 'gpt' where 'human' was expected; turns must alternate 'human' (or "
        "'observation'), 'gpt' (or 'function_call'), ... starting with 'human'",
        f"{f}:5: 'conversations' is an empty list; expected a non-empty list of turns",
        f"{f}:6: missing 'conversations' (the conversation); the row has: conv",
        f"{f}:7: conversations[2].from is 'system' where 'human' was expected; a system turn is only allowed first",
        f"{f}:8: conversations[0]: missing 'value' (the text)",
        f"{f}:9: conversations[1].from is 'function_call': function-calling data (tool descriptions and "
        "function_call/observation turns) needs a template that renders tools, and template 'alpaca' does not; use "
        "one that does (chatml, qwen, qwen3, qwen3_nothink, llama3, deepseekr1, llama2, mistral, default, empty, phi4_mini, "
        "gemma, gemma3, gemma2, glm4, glmz1, glm4_moe, gpt_oss, qwen2_vl, qwen3_vl, qwen3_vl_nothink, mistral_small, "
        "deepseek3, moonlight) or name a dataset without tools",
        f"{f}:10: conversations[1].from is 'observation' where 'gpt' was expected; turns must alternate 'human' (or "
        "'observation'), 'gpt' (or 'function_call'), ... starting with 'human'",
    ]


def test_pt_single_document_split_like_the_book(make_recipe):
    words = [f"w{i}" for i in range(200)]
    text = " ".join(words) + "\r\n"
    r = make_recipe({"book": {"file_name": "raw/verdict.txt", "formatting": "text"}},
                    files={"raw/verdict.txt": text.encode()}, stage="pt")
    lines = build(data_args(r))
    train, val = rows_of(r, "book")
    clean = text.replace("\r\n", "\n")
    assert train[0]["text"] + val[0]["text"] == clean
    cut = len(train[0]["text"])
    assert clean[cut].isspace() and cut >= int(0.9 * len(clean)) and not clean[int(0.9 * len(clean)):cut].count(" ")
    m = manifest(r, "book")
    enc = gpt2()
    assert m["tokens"] == {"train": len(enc.encode(train[0]["text"])),
                           "val": len(enc.encode(val[0]["text"]))}
    assert m["split_mode"] == "within documents" and m["splits"] == {"train": 1, "val": 1}
    assert any("tokens: train" in line for line in lines)


def test_split_text_edges():
    assert split_text("abcdefghij", 0.9) == ("abcdefghi", "j")  # no whitespace: the book's exact cut
    assert split_text("aaaa bbbb", 0.9) == ("aaaa", " bbbb")  # back to the last whitespace
    assert split_text("aa bb cc dd", 0.5) == ("aa bb", " cc dd")


def test_pt_folder_of_documents_and_eos_join(make_recipe):
    files = {f"corpus/doc{i:02d}.txt": f"document number {i}." for i in range(20)}
    files["corpus/.hidden.txt"] = "skip me"
    r = make_recipe({"c": {"file_name": "corpus", "formatting": "text"}}, files=files, stage="pt")
    build(data_args(r))
    m = manifest(r, "c")
    assert m["split_mode"] == "documents" and m["splits"] == {"train": 18, "val": 2}
    assert len(m["sources"]) == 20
    train, val = rows_of(r, "c")
    enc = gpt2()
    assert m["tokens"]["train"] == sum(len(enc.encode(d["text"])) for d in train) + 17
    assert sorted(d["text"] for d in train + val) == sorted(f"document number {i}." for i in range(20))


def test_pt_from_alpaca_rows_uses_the_prompt(make_recipe):
    r = make_recipe({"a": {"file_name": "raw/a.jsonl", "columns": {"prompt": "body"}}},
                    files={"raw/a.jsonl": jsonl([{"body": f"text {i}"} for i in range(10)])}, stage="pt")
    build(data_args(r))
    assert sorted(d["text"] for d in load_split(data_args(r), "train") + load_split(data_args(r), "val")) == \
        sorted(f"text {i}" for i in range(10))


def test_pt_from_alpaca_rows_joins_only_the_non_empty_fields(make_recipe):
    """LLaMA-Factory's pretrain document is the first user turn, "\\n".join of the non-empty instruction and input
    (converter.py): an empty instruction leaves the input alone, with no leading newline."""
    rows = [{"instruction": "", "input": "only input"}, {"instruction": "ins", "input": "inp"},
            {"instruction": "alone", "input": ""}]
    r = make_recipe({"a": {"file_name": "raw/a.jsonl"}}, files={"raw/a.jsonl": jsonl(rows)}, stage="pt", val_size=0)
    build(data_args(r))
    assert sorted(d["text"] for d in load_split(data_args(r), "train")) == ["alone", "ins\ninp", "only input"]


def test_alpaca_row_with_only_an_input_is_kept_as_its_instruction(make_recipe):
    """LLaMA-Factory's user turn is "\\n".join of the non-empty instruction and input (converter.py), so a row with
    an empty instruction trains on its input as the prompt; it was removed as "empty instruction"."""
    rows = [{"instruction": "", "input": "only input", "output": "a"},
            {"instruction": None, "input": "in2", "output": "b"},
            {"instruction": "", "input": "", "output": "c"}, {"instruction": "ins", "input": "inp", "output": "d"}]
    r = make_recipe({"a": {"file_name": "raw/a.jsonl"}}, files={"raw/a.jsonl": jsonl(rows)}, val_size=0)
    build(data_args(r))
    assert sorted(load_split(data_args(r), "train"), key=lambda x: x["output"]) == [
        {"instruction": "only input", "input": "", "output": "a"}, {"instruction": "in2", "input": "", "output": "b"},
        {"instruction": "ins", "input": "inp", "output": "d"}]
    assert manifest(r, "a")["removed"]["empty instruction"] == 1


def test_whole_number_float_val_size_counts_rows(make_recipe):
    """`val_size: 2.0` passes the recipe schema as an integer (JSON Schema's rule) and LLaMA-Factory reads any
    val_size > 1 as int(val_size) rows; it was taken as the fraction 2.0 (every row held out), yet a build made with
    `val_size: 2` counted as up to date for it."""
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": jsonl(alpaca_rows(10))}, val_size=2.0)
    build(data_args(r))
    assert (len(load_split(data_args(r), "train")), len(load_split(data_args(r), "val"))) == (8, 2)
    docs = [{"instruction": f"document {i} " + "word " * 20} for i in range(5)]
    p = make_recipe({"c": {"file_name": "raw/c.jsonl"}}, files={"raw/c.jsonl": jsonl(docs)}, stage="pt", val_size=3.0)
    build(data_args(p))
    assert (len(load_split(data_args(p), "train")), len(load_split(data_args(p), "val"))) == (2, 3)


def test_eval_dataset_and_load_split(make_recipe):
    r = make_recipe({"a": {"file_name": "raw/a.jsonl"}, "b": {"file_name": "raw/b.jsonl"}},
                    files={"raw/a.jsonl": jsonl(alpaca_rows(20, "a")), "raw/b.jsonl": jsonl(alpaca_rows(10, "b"))},
                    dataset=["a"], eval_dataset=["b"])
    build_command(r, None)
    assert len(load_split(data_args(r), "train")) == 20  # a's val split too: nothing else would read it
    assert [p.name for p in split_files(data_args(r), "train")] == ["train.json", "val.json"]
    assert count_train_examples(r) == 20  # what plan counts, before anything is tokenized
    assert sorted(x["instruction"] for x in load_split(data_args(r), "val")) == sorted(x["instruction"] for x in alpaca_rows(10, "b"))
    both = dict(r, eval_dataset=["a", "b"])  # a name also trained on contributes only its val split
    assert len(load_split(data_args(both), "val")) == 2 + 10 and len(load_split(data_args(both), "train")) == 18
    assert [p.name for p in split_files(data_args(both), "val")] == ["val.json", "train.json", "val.json"]


def test_small_eval_only_dataset_is_not_refused_for_its_split(make_recipe):
    """A dataset named only in eval_dataset is evaluated whole (train.json and val.json) and never trained, so a
    val_size that holds out all of its rows is fine; it was refused with "leaves 0 for training"."""
    r = make_recipe({"a": {"file_name": "raw/a.jsonl"}, "b": {"file_name": "raw/b.jsonl"}},
                    files={"raw/a.jsonl": jsonl(alpaca_rows(20, "a")), "raw/b.jsonl": jsonl(alpaca_rows(3, "b"))},
                    dataset=["a"], eval_dataset=["b"], val_size=5)
    build(data_args(r))
    assert sorted(x["instruction"] for x in load_split(data_args(r), "val")) == \
        sorted(x["instruction"] for x in alpaca_rows(3, "b"))
    with pytest.raises(UserError, match="dataset 'a' .*val_size 25 leaves 0 for training"):  # a trains: refused
        build(data_args(dict(r, val_size=25)))
    with pytest.raises(UserError, match="dataset 'b' .*val_size 5 leaves 0 for training"):  # b's build, now trained
        build(data_args(dict(r, dataset=["b"], eval_dataset=None)))


def test_load_split_missing_or_stale_build(make_recipe):
    r = make_recipe({"a": {"file_name": "raw/a.jsonl"}}, files={"raw/a.jsonl": jsonl(alpaca_rows(20))})
    with pytest.raises(UserError, match=r"dataset 'a' is not built; run `make data`"):
        load_split(data_args(r), "train")
    build(data_args(r))
    with pytest.raises(UserError, match=r"built with other settings than the recipe's \(val_size 0.1 -> 0.3\); "
                                        r"run `make data`"):
        load_split(data_args(dict(r, val_size=0.3)), "train")
    (built_dir(r["dataset_dir"], "a") / "train.json").write_text('[{"instruction": "x",\n oops]')
    with pytest.raises(UserError, match=r"train.json:2: invalid JSON"):
        load_split(data_args(r), "train")


def test_dump_rows_is_json_one_row_per_line():
    from pipeline.data.build import _dump_rows

    rows = [{"instruction": 'quote " back \\ slash', "input": "tab\tnew\nline \u2028 \x00", "output": "é 中 🙂"},
            {"output": "o", "input": "", "instruction": "reordered"},
            {"instruction": "i", "input": "", "output": "o", "system": "s", "history": [["a", "b"]]},
            {"text": "doc"}]
    blob = _dump_rows(rows).decode("utf-8")
    assert json.loads(blob) == rows
    assert [json.loads(line.lstrip("[").rstrip(",]")) for line in blob.rstrip("\n").split("\n")] == rows
    assert _dump_rows([]) == b"[]\n"
