"""Every class of bad row gives `file:line: problem`, all reported together, capped, nothing written."""
from __future__ import annotations

import json
import os

import pandas as pd
import pytest

from data_helpers import jsonl
from pipeline.recipe.args import data_args
from pipeline.data.build import build, built_dir
from pipeline.data.load import load_split
from pipeline.errors import UserError

GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi."}


def good(i: int) -> dict:
    return {"instruction": f"Say {i}.", "input": "", "output": f"{i}."}


def snapshot(folder: str) -> dict[str, bytes]:
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                out[os.path.relpath(os.path.join(root, name), folder)] = handle.read()
    return out


def build_errors(r) -> list[str]:
    """The build's messages; the build folder is exactly as before (a failed build writes nothing)."""
    folder = os.path.join(r["dataset_dir"], "build")
    before = snapshot(folder)
    with pytest.raises(UserError) as err:
        build(data_args(r))
    assert snapshot(folder) == before
    return err.value.messages


def test_jsonl_every_bad_row_with_its_line(make_recipe):
    lines = [
        json.dumps(good(1)),                                                   # 1
        '{"instruction": "broken", "output": ',                                # 2 broken JSON
        '{"instruction": "nan", "input": "", "output": NaN}',                  # 3 NaN
        '{"instruction": "inf", "input": "", "output": -Infinity}',            # 4 -Infinity
        "[1, 2]",                                                              # 5 not an object
        json.dumps({"instrution": "typo", "output": "x"}),                    # 6 missing column
        json.dumps({"instruction": "num", "output": 42}),                      # 7 output is a number
        json.dumps({"instruction": "list", "output": ["a", "b"]}),             # 8 output is a list
        json.dumps({"instruction": "h", "output": "o", "history": [["q"]]}),   # 9 history shape
        json.dumps({"instruction": "h", "output": "o", "history": "no"}),      # 10 history type
        "",                                                                    # 11 blank: skipped
        json.dumps({"instruction": True, "output": "o"}),                     # 12 boolean
        json.dumps(good(2)),                                                   # 13
    ]
    data = "\n".join(lines).encode() + b"\n" + b'{"instruction": "caf\xe9", "output": "x"}\n'  # 14: Latin-1
    offset = len("\n".join(lines).encode()) + 1 + len(b'{"instruction": "caf')
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": data})
    f = os.path.join(r["dataset_dir"], "raw", "d.jsonl")
    assert build_errors(r) == [
        f"{f}:2: invalid JSON at column 37: Expecting value",
        f"{f}:3: NaN is not valid JSON (write a number, null or a string)",
        f"{f}:4: -Infinity is not valid JSON (write a number, null or a string)",
        f"{f}:5: expected a JSON object (one row), got a list",
        f"{f}:6: missing 'instruction' (did you mean 'instrution'?); the row has: instrution, output",
        f"{f}:7: 'output' is a number (42); expected a string",
        f"{f}:8: 'output' is a list; expected a string",
        f"{f}:9: 'history'[0] is a list of 1; expected [instruction, response]",
        f"{f}:10: 'history' is a string; expected a list of [instruction, response] pairs",
        f"{f}:12: 'instruction' is a boolean (true); expected a string",
        f"{f}:14: not valid UTF-8 at byte offset {offset} (byte 0xe9); save the file as UTF-8",
    ]


def test_bom_crlf_and_nulls_are_accepted(make_recipe):
    rows = [good(i) for i in range(8)] + [{"instruction": "Null input.", "input": None, "output": "ok"}]
    data = b"\xef\xbb\xbf" + jsonl(rows).replace("\n", "\r\n").encode()
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": data}, val_size=0.2)
    build(data_args(r))
    got = load_split(data_args(r), "train") + load_split(data_args(r), "val")
    assert sorted(x["instruction"] for x in got) == sorted(x["instruction"] for x in rows)
    assert {"instruction": "Null input.", "input": "", "output": "ok"} in got


def test_json_array_rows_know_their_lines(make_recipe):
    text = '[\n  {"instruction": "a", "output": "1"},\n  {"instruction": "b",\n   "output": 2},\n' \
           '  {"instruction": "c", "output": "3"},\n  {"instruction": "d", "output": [1]}\n]\n'
    r = make_recipe({"d": {"file_name": "raw/d.json"}}, files={"raw/d.json": text})
    f = os.path.join(r["dataset_dir"], "raw", "d.json")
    assert build_errors(r) == [f"{f}:3: 'output' is a number (2); expected a string",
                               f"{f}:6: 'output' is a list; expected a string"]


def test_minified_json_array_names_the_row(make_recipe):
    """json.dump's default writes the whole array on line 1: a problem names the row in the array as well, so
    that the messages do not all read `d.json:1:`."""
    rows = [good(0), {"instruction": "b", "output": 2}, good(2), {"instruction": "d", "output": [1]}]
    r = make_recipe({"d": {"file_name": "raw/d.json"}}, files={"raw/d.json": json.dumps(rows)})
    f = os.path.join(r["dataset_dir"], "raw", "d.json")
    assert build_errors(r) == [f"{f}:1: row 2: 'output' is a number (2); expected a string",
                               f"{f}:1: row 4: 'output' is a list; expected a string"]


def test_null_where_a_row_or_a_conversation_goes_is_called_null(make_recipe):
    r = make_recipe({"s": {"file_name": "raw/s.jsonl", "formatting": "sharegpt"}},
                    files={"raw/s.jsonl": '{"conversations": null}\nnull\n{"conversations": [null]}\n'})
    f = os.path.join(r["dataset_dir"], "raw", "s.jsonl")
    assert build_errors(r) == [f"{f}:1: 'conversations' is null; expected a non-empty list of turns",
                               f"{f}:2: expected a JSON object (one row), got null",
                               f"{f}:3: conversations[0] is null; expected an object with 'from' and 'value'"]


def test_lone_surrogate_escape_is_a_row_problem(make_recipe):
    """JSON may spell "\\ud800" without its low half; Python decodes it to a code point UTF-8 cannot encode, and
    the build died with a UnicodeEncodeError traceback when writing train.json. A valid pair (an emoji) is fine."""
    text = ('{"instruction": "bad \\ud800 here", "output": "o"}\n'
            '{"instruction": "emoji \\ud83d\\ude00", "output": "o"}\n'
            '{"instruction": "q", "output": "o", "history": [["h", "r\\udc00"]]}\n')
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": text})
    f = os.path.join(r["dataset_dir"], "raw", "d.jsonl")
    assert build_errors(r) == [
        f"{f}:1: 'instruction' holds \\ud800 at character 5, half of a UTF-16 surrogate pair (JSON escapes "
        "\\ud800-\\udfff come in high/low pairs); remove it or complete the pair",
        f"{f}:3: 'history'[0][1] holds \\udc00 at character 2, half of a UTF-16 surrogate pair (JSON escapes "
        "\\ud800-\\udfff come in high/low pairs); remove it or complete the pair"]


def test_json_array_broken_and_not_an_array(make_recipe):
    r = make_recipe({"d": {"file_name": "raw/d.json"}},
                    files={"raw/d.json": '[\n {"instruction": "a", "output": "1"},\n {"instruction": }\n]'})
    f = os.path.join(r["dataset_dir"], "raw", "d.json")
    assert build_errors(r) == [f"{f}:3: invalid JSON at column 18: Expecting value (rows after this point were "
                               "not read)"]
    r = make_recipe({"d": {"file_name": "raw/d.json"}}, files={"raw/d.json": '\n"rows"'})
    assert build_errors(r) == [f"{f}:2: expected a JSON array of rows ([{{...}}, {{...}}]) or JSON Lines "
                               "(one object per line)"]
    r = make_recipe({"d": {"file_name": "raw/d.json"}}, files={"raw/d.json": "  \n"})
    assert build_errors(r) == [f"{f}:1: empty file; expected a JSON array of rows"]


def test_json_file_with_json_lines_is_read_as_jsonl(make_recipe):
    r = make_recipe({"d": {"file_name": "raw/d.json"}}, files={"raw/d.json": jsonl([good(i) for i in range(10)])})
    build(data_args(r))
    assert len(load_split(data_args(r), "train")) == 9


def test_utf16_file(make_recipe):
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}},
                    files={"raw/d.jsonl": "\ufeff" .encode("utf-16-le").join([b"\xff\xfe", b""]) + b"{\x00}\x00"})
    f = os.path.join(r["dataset_dir"], "raw", "d.jsonl")
    assert build_errors(r) == [f"{f}:1: the file is UTF-16 (byte-order mark at byte offset 0); save it as UTF-8"]


def test_csv_lines_are_physical_lines(make_recipe):
    text = ('question,answer,extra\r\n'            # 1 header
            'What is 1+1?,2,x\r\n'                 # 2
            '"A question\nover two lines",4,y\r\n'  # 3-4
            'too,many,fields,here\r\n'             # 5
            'Blank answer,,z\r\n'                  # 6 (empty output: removed, counted)
            'Last?,7,w\r\n')                       # 7
    r = make_recipe({"d": {"file_name": "raw/d.csv", "columns": {"prompt": "question", "response": "answer"}}},
                    files={"raw/d.csv": text})
    f = os.path.join(r["dataset_dir"], "raw", "d.csv")
    assert build_errors(r) == [f"{f}:5: 4 fields, but the header has 3 (check the delimiter and quoting)"]
    with open(f, "w", newline="") as handle:
        handle.write(text.replace("too,many,fields,here\r\n", "Fine,5,v\r\n"))
    build(data_args(r))
    rows = load_split(data_args(r), "train") + load_split(data_args(r), "val")
    assert {"instruction": "A question\nover two lines", "input": "", "output": "4"} in rows
    assert len(rows) == 4
    manifest = json.loads((built_dir(r["dataset_dir"], "d") / "manifest.json").read_text())
    assert manifest["removed"]["empty output"] == 1


def test_csv_missing_column_and_tsv(make_recipe):
    r = make_recipe({"d": {"file_name": "raw/d.csv", "columns": {"prompt": "question", "response": "answr"}}},
                    files={"raw/d.csv": "question,answer\nq,a\n"})
    f = os.path.join(r["dataset_dir"], "raw", "d.csv")
    assert build_errors(r) == [f"{f}:1: missing column 'answr' (columns.response) (did you mean 'answer'?); "
                               "the header has: question, answer"]
    rows = "".join(f"q{i}\t\"a{i}\"\tsys{i}\n" for i in range(10))
    r = make_recipe({"t": {"file_name": "raw/t.tsv", "columns": {"prompt": "q", "response": "a", "system": "s"}}},
                    files={"raw/t.tsv": "q\ta\ts\n" + rows}, dataset=["t"])
    build(data_args(r))
    got = sorted(load_split(data_args(r), "train") + load_split(data_args(r), "val"), key=lambda x: x["instruction"])
    assert got[0] == {"instruction": "q0", "input": "", "output": "a0", "system": "sys0"}


def test_csv_header_with_spaces_after_the_commas_says_so(make_recipe):
    """`instruction, output` makes the column ' output' (pandas and LLaMA-Factory read it the same): the message
    said "did you mean ' output'?", which reads like a typo of the user's, not the header's spaces."""
    r = make_recipe({"d": {"file_name": "raw/d.csv"}}, files={"raw/d.csv": "instruction, output\nq,a\n"})
    f = os.path.join(r["dataset_dir"], "raw", "d.csv")
    assert build_errors(r) == [f"{f}:1: missing column 'output' (columns.response) (' output' has spaces around "
                               "it: in CSV a space after the separator is part of the column's name, so write the "
                               "header without it); the header has: instruction,  output"]


def test_parquet_column_mapping_and_types(make_recipe, tmp_path):
    r = make_recipe({"p": {"file_name": "raw/p.parquet",
                           "columns": {"prompt": "q", "query": "ctx", "response": "a", "history": "turns"}}})
    os.makedirs(os.path.join(r["dataset_dir"], "raw"), exist_ok=True)
    f = os.path.join(r["dataset_dir"], "raw", "p.parquet")
    frame = pd.DataFrame({"q": [f"q{i}" for i in range(10)], "ctx": [None] + ["c"] * 9,
                          "a": [f"a{i}" for i in range(10)],
                          "turns": [[["h", "r"]]] + [[] for _ in range(9)]})
    frame.to_parquet(f)
    build(data_args(r))
    got = {x["instruction"]: x for x in load_split(data_args(r), "train") + load_split(data_args(r), "val")}
    assert got["q0"] == {"instruction": "q0", "input": "", "output": "a0", "history": [["h", "r"]]}
    assert got["q5"] == {"instruction": "q5", "input": "c", "output": "a5"}
    pd.DataFrame({"q": ["x", "y", "z"], "ctx": ["", "", ""], "a": [1, 2, 3], "turns": [[], [], []]}).to_parquet(f)
    assert build_errors(r) == [f"{f}:row {i}: 'a' (output) is a number ({i}); expected a string" for i in (1, 2, 3)]
    pd.DataFrame({"question": ["x"]}).to_parquet(f)
    assert build_errors(r) == [f"{f}: missing column 'q' (columns.prompt); the header has: question",
                               f"{f}: missing column 'a' (columns.response); the header has: question"]
    with open(f, "wb") as handle:
        handle.write(b"PAR1 not really")
    assert build_errors(r)[0].startswith(f"{f}: not a readable Parquet file")


def test_problems_are_capped_with_totals_and_across_datasets(make_recipe):
    bad = "\n".join("{broken" for _ in range(30)) + "\n"
    r = make_recipe({"a": {"file_name": "raw/a.jsonl"}, "b": {"file_name": "raw/b.jsonl"}},
                    files={"raw/a.jsonl": bad, "raw/b.jsonl": '{"output": "x"}\n'}, dataset=["a", "b"])
    messages = build_errors(r)
    fa = os.path.join(r["dataset_dir"], "raw", "a.jsonl")
    fb = os.path.join(r["dataset_dir"], "raw", "b.jsonl")
    assert messages[0] == f"{fa}:1: invalid JSON at column 2: Expecting property name enclosed in double quotes"
    assert len([m for m in messages if m.startswith(fa)]) == 20
    assert messages[20].startswith(f"{fb}:1: missing 'instruction'")
    assert messages[21] == f"... and 10 more problems not shown (31 in all; {fa}: 30, {fb}: 1)"
    assert len(messages) == 22


def test_empty_files(make_recipe):
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": "\n\n"})
    f = os.path.join(r["dataset_dir"], "raw", "d.jsonl")
    assert build_errors(r) == [f"{f}: dataset 'd' has no rows"]
    r = make_recipe({"c": {"file_name": "raw/c.csv"}}, files={"raw/c.csv": ""}, dataset=["c"])
    c = os.path.join(r["dataset_dir"], "raw", "c.csv")
    assert build_errors(r) == [f"{c}:1: empty file; expected a header line naming the columns"]
