"""Problems found while tokenizing name the raw file and line (or row) the user wrote, not the built file.

Each test drives the CLI from raw files in the formats users bring; the lines in the assertions are counted by
hand from the files written here. The build shuffles, de-duplicates, caps and splits rows, so the built row
number says nothing about where to look.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_helpers import jsonl
from pipeline.__main__ import main
from test_data_cli import cli, project

LONG = " ".join(["word"] * 40)  # some 40 tokens: over cutoff_len 60 with the alpaca prompt, which the others fit


def row(instruction: str, output: str = "ok") -> dict[str, str]:
    return {"instruction": instruction, "input": "", "output": output}


@pytest.fixture
def run(tmp_path, monkeypatch, capsys):
    """run(*argv) -> (exit code, stdout, stderr) of the CLI run in-process in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")

    def go(*argv: str) -> tuple[int, str, str]:
        code = main(list(argv))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return code, out, err

    return go


def merged_project(tmp_path: Path) -> dict[str, str]:
    """Five datasets in five raw formats, merged with `dataset:`; returns each row's expected origin -> its
    instruction. The over-long rows' instructions start with 'L'."""
    a = "\n".join([json.dumps(row("q a1")),       # line 1
                   "",                             # line 2: blank, skipped
                   json.dumps(row("q a3")),       # line 3
                   json.dumps(row("L a4", LONG)),  # line 4: over cutoff_len
                   json.dumps(row("q a1")),       # line 5: a duplicate of line 1, removed
                   json.dumps(row("q a6", "")),   # line 6: empty output, removed
                   json.dumps(row("L a7", LONG))]) + "\n"  # line 7: over num_samples 3, removed before tokenizing
    b = ('question,answer\n'             # line 1: the header
         'q b2,ok\n'                     # line 2
         '"q b3\ncontinued",ok\n'        # lines 3-4: one row, a quoted cell over two lines
         f'L b5,{LONG}\n'                # line 5: over cutoff_len
         'q b6,ok\n')                    # line 6
    c = json.dumps([row("q c2"), row("L c7", LONG), row("q c12")], indent=2)  # an object every 5 lines: 2, 7, 12
    e = json.dumps([row("q e1"), row("L e2", LONG), row("q e3")])  # minified: all on line 1, named by row
    files = {"raw/a.jsonl": a, "raw/b.csv": b, "raw/c.json": c, "raw/e.json": e}
    registry = {"a": {"file_name": "raw/a.jsonl", "num_samples": 3},
                "b": {"file_name": "raw/b.csv", "columns": {"prompt": "question", "response": "answer"}},
                "c": {"file_name": "raw/c.json"}, "d": {"file_name": "raw/d.parquet"}, "e": {"file_name": "raw/e.json"}}
    project(tmp_path, registry, files, "dataset: a, b, c, d, e\ncutoff_len: 60\nval_size: 1\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = pa.Table.from_pylist([row("q d1"), row("L d2", LONG), row("q d3")])
    pq.write_table(parquet, tmp_path / "data/raw/d.parquet")
    return {"data/raw/a.jsonl:1 (dataset 'a')": "q a1", "data/raw/a.jsonl:3 (dataset 'a')": "q a3",
            "data/raw/a.jsonl:4 (dataset 'a')": "L a4",
            "data/raw/b.csv:2 (dataset 'b')": "q b2", "data/raw/b.csv:3 (dataset 'b')": "q b3\ncontinued",
            "data/raw/b.csv:5 (dataset 'b')": "L b5", "data/raw/b.csv:6 (dataset 'b')": "q b6",
            "data/raw/c.json:2 (dataset 'c')": "q c2", "data/raw/c.json:7 (dataset 'c')": "L c7",
            "data/raw/c.json:12 (dataset 'c')": "q c12",
            "data/raw/d.parquet:row 1 (dataset 'd')": "q d1", "data/raw/d.parquet:row 2 (dataset 'd')": "L d2",
            "data/raw/d.parquet:row 3 (dataset 'd')": "q d3",
            "data/raw/e.json:1: row 1 (dataset 'e')": "q e1", "data/raw/e.json:1: row 2 (dataset 'e')": "L e2",
            "data/raw/e.json:1: row 3 (dataset 'e')": "q e3"}


def test_merged_datasets_name_raw_lines_through_caps_shuffles_and_splits(tmp_path, run):
    expected = merged_project(tmp_path)
    assert run("build", "recipe.yaml")[0] == 0
    code, out, _ = run("inspect", "recipe.yaml", "--num", "100")
    assert code == 0
    # every sample shown names the raw row it is: its instruction follows the header
    samples = re.findall(r"── sample \d+/\d+ · (.+?) · \d+ tokens.*?\n(.*?)(?=── sample|\ntrain: )", out, re.S)
    assert len(samples) == 7  # 16 rows kept, 5 held out (val_size 1 per dataset), 4 over-long ones dropped
    for origin, text in samples:
        assert f"### Instruction:\n{expected[origin]}\n" in text, origin
    # the dropped rows of both splits: exactly the over-long ones (not line 7 of a.jsonl: num_samples removed it)
    dropped = {split: line.split(", ") for split, line in
               re.findall(r"^(train|val): [^\n]*\n  dropped: ([^\n]*)", out, re.M)}
    assert sorted(sum(dropped.values(), [])) == sorted(o for o, text in expected.items() if text[0] == "L")
    for split, origins in dropped.items():  # each is in the split the build put it in
        built = (tmp_path / "data/build").glob(f"*/{split}.json")
        instructions = {r["instruction"] for path in built for r in json.loads(path.read_text())}
        assert {expected[o] for o in origins} <= instructions


def test_over_cutoff_len_under_error_names_the_raw_line(tmp_path, run):
    rows = [row(f"q {i}") for i in range(1, 7)]
    rows[3] = row("long", LONG)  # line 4
    project(tmp_path, {"a": {"file_name": "raw/a.jsonl"}}, {"raw/a.jsonl": jsonl(rows)},
            "dataset: a\ncutoff_len: 60\nval_size: 0\noverlength_policy: error\nper_device_train_batch_size: 1\n")
    assert run("build", "recipe.yaml")[0] == 0
    code, _, err = run("validate", "recipe.yaml")
    assert code == 2
    lines = err.splitlines()
    assert re.fullmatch(r"error: data/raw/a\.jsonl:4 \(dataset 'a'\): \d+ tokens, over cutoff_len 60", lines[0])
    assert lines[1:] == ["error: 1 example is longer than cutoff_len 60 (overlength_policy: error); raise "
                         "cutoff_len, or set overlength_policy: drop or truncate"]
    done = cli(tmp_path, "train", "recipe.yaml")  # the same message from train, in a process of its own
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert re.search(r"^error: data/raw/a\.jsonl:4 \(dataset 'a'\): \d+ tokens", done.stderr, re.M)
    assert not (tmp_path / "saves").exists()  # nothing half-written


def test_dpo_pair_over_cutoff_len_names_the_raw_line(tmp_path, run):
    pairs = [{"instruction": f"q {i}", "input": "", "chosen": "yes", "rejected": "no"} for i in range(1, 5)]
    pairs[2]["rejected"] = LONG  # line 3
    entry = {"file_name": "raw/p.jsonl", "ranking": True,
             "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}
    project(tmp_path, {"p": entry}, {"raw/p.jsonl": jsonl(pairs)},
            "stage: dpo\ndataset: p\ncutoff_len: 60\nval_size: 0\noverlength_policy: error\n"
            "per_device_train_batch_size: 1\n")
    assert run("build", "recipe.yaml")[0] == 0
    code, _, err = run("validate", "recipe.yaml")
    assert code == 2
    assert re.match(r"error: data/raw/p\.jsonl:3 \(dataset 'p'\): chosen \d+ / rejected \d+ tokens, over "
                    r"cutoff_len 60\nerror: 1 pair is longer than cutoff_len 60", err)


def test_tool_turns_under_a_template_without_tools_name_the_first_raw_row(tmp_path, run):
    def conversation(i: int, tool: bool) -> dict:
        call = [{"from": "function_call", "value": json.dumps({"name": "weather", "arguments": {"day": i}})},
                {"from": "observation", "value": "sunny"}] if tool else []
        return {"conversations": [{"from": "human", "value": f"weather {i}?"}, *call, {"from": "gpt", "value": "ok"}]}

    rows = [conversation(1, False), conversation(2, True), conversation(3, False), conversation(4, True)]
    text = json.dumps(rows, indent=1)  # rows open on lines 2, 14, 34, 46
    assert [n for n, line in enumerate(text.splitlines(), 1) if line == " {"] == [2, 14, 34, 46]
    project(tmp_path, {"t": {"file_name": "raw/t.json", "formatting": "sharegpt"}}, {"raw/t.json": text},
            "dataset: t\nval_size: 0\ntemplate: qwen\nper_device_train_batch_size: 1\n")
    assert run("build", "recipe.yaml")[0] == 0  # qwen renders tool turns; alpaca, chosen afterwards, does not
    code, _, err = run("validate", "recipe.yaml", "template=alpaca")
    assert code == 2
    assert err.startswith("error: data/raw/t.json:14 (dataset 't'): function-calling data (tool descriptions and "
                          "function_call/observation turns) needs a template that renders tools, and template "
                          "'alpaca' does not; use one that does (")
    assert err.endswith(") or name a dataset without tools (2 rows alike; this is the first)\n")


def test_an_edited_built_row_names_the_raw_row_it_came_from(tmp_path, run):
    rows = [row(f"q {i}") for i in range(1, 5)]
    project(tmp_path, {"a": {"file_name": "raw/a.jsonl"}}, {"raw/a.jsonl": jsonl(rows)},
            "dataset: a\nval_size: 0\nper_device_train_batch_size: 1\n")
    assert run("build", "recipe.yaml")[0] == 0
    built = tmp_path / "data/build/a/train.json"
    lines = built.read_text().splitlines()
    k = next(n for n, line in enumerate(lines, 1) if '"q 3"' in line)  # line 3 of the raw file, row k once built
    lines[k - 1] = lines[k - 1].replace('"output": "ok"', '"output": " "')
    built.write_text("\n".join(lines) + "\n")
    code, _, err = run("validate", "recipe.yaml")
    assert code == 2
    assert err == (f"error: data/build/a/train.json:{k}:output: is blank; expected non-empty text; the row was built "
                   "from data/raw/a.jsonl:3 (dataset 'a')\n")


def test_a_build_without_origins_names_the_built_row(tmp_path, run):
    """A build by an older version (no origins.json) is still used: its rows are named by the built file."""
    rows = [row("q 1"), row("long", LONG), row("q 3")]
    project(tmp_path, {"a": {"file_name": "raw/a.jsonl"}}, {"raw/a.jsonl": jsonl(rows)},
            "dataset: a\ncutoff_len: 60\nval_size: 0\noverlength_policy: error\nper_device_train_batch_size: 1\n")
    assert run("build", "recipe.yaml")[0] == 0
    (tmp_path / "data/build/a/origins.json").unlink()
    built = json.loads((tmp_path / "data/build/a/train.json").read_text())
    k = next(n for n, r in enumerate(built, 1) if r["instruction"] == "long")
    code, _, err = run("validate", "recipe.yaml")
    assert code == 2 and err.startswith(f"error: data/build/a/train.json:{k} (dataset 'a'): ")
