"""check_built: schema + rules on the built files with `file:row:field` messages, and the summary."""
from __future__ import annotations

import builtins
import io
import json
import random
from collections import Counter

import jsonschema
import pytest

from data_helpers import alpaca_rows, jsonl
from pipeline.recipe.args import data_args
from pipeline.data.build import build, built_dir
from pipeline.data.check import check_built, format_summary, row_ok, text_ok
from pipeline.data.registry import load_schema
from pipeline.data.tokenizer import gpt2
from pipeline.errors import UserError

HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n")


@pytest.fixture
def built(make_recipe):
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": jsonl(alpaca_rows(30))})
    build(data_args(r))
    return r


def test_summary_rows_with_exact_token_counts(built):
    summary = check_built(data_args(built)).summary
    assert [(s["dataset"], s["split"], s["rows"]) for s in summary] == [("d", "train", 27), ("d", "val", 3)]
    enc = gpt2()
    val = json.loads((built_dir(built["dataset_dir"], "d") / "val.json").read_text())

    def length(row):
        body = row["instruction"] + (f"\n\n### Input:\n{row['input']}" if row["input"] else "")
        return len(enc.encode(HEAD + f"### Instruction:\n{body}\n\n### Response:\n")) + \
            len(enc.encode(row["output"])) + 1

    lengths = [length(row) for row in val]
    assert summary[1]["tokens_min"] == min(lengths) and summary[1]["tokens_max"] == max(lengths)
    assert summary[1]["tokens_mean"] == round(sum(lengths) / 3, 1) and summary[1]["sampled"] is None
    assert summary[1]["over_cutoff_len"] == 0
    table = format_summary(summary)
    assert table.splitlines()[2].split()[:3] == ["d", "val", "3"]


def test_each_built_file_is_read_once_for_the_check_the_digest_and_the_markup_warning(make_recipe, monkeypatch):
    """validate's data check reads each built file once: the rows it checks, the sha256 it compares with
    manifest.json and the warning about markup typed in the rows all come from that read (they took three).
    Golden: GPT-2's <|endoftext|> is id 50256 (its vocabulary); raw line 5 is the row that types it."""
    rows = alpaca_rows(30)
    rows[4]["output"] += " <|endoftext|>"
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": jsonl(rows)})
    build(data_args(r))
    files = {str(built_dir(r["dataset_dir"], "d") / f"{split}.json"): split for split in ("train", "val")}
    reads: Counter[str] = Counter()
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        if str(file) in files:
            reads[files[str(file)]] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", counting_open)  # pathlib's read_bytes
    monkeypatch.setattr(builtins, "open", counting_open)
    checked = check_built(data_args(r))
    monkeypatch.undo()
    assert (reads["train"], reads["val"]) == (1, 1)
    assert checked.warnings == [
        f"warning: {r['dataset_dir']}/raw/d.jsonl:5 (dataset 'd'): output types '<|endoftext|>', which stays literal "
        "text here (split into ordinary tokens, so that data cannot forge a turn); LLaMA-Factory makes it one token "
        "(id 50256)"]


def test_bad_built_rows_are_named_by_file_row_field(built):
    path = built_dir(built["dataset_dir"], "d") / "train.json"
    rows = json.loads(path.read_text())
    # alpaca_rows: "task i: ..." is line i + 1 of raw/d.jsonl; each message adds the raw row its built row came from
    raw = [f"; the row was built from {built['dataset_dir']}/raw/d.jsonl:{int(row['instruction'].split()[1][:-1]) + 1}"
           " (dataset 'd')" for row in rows]
    rows[0]["instruction"] = "   "
    rows[1]["output"] = 7
    rows[2]["history"] = [["only one"]]
    rows[3]["extra"] = 1
    del rows[4]["input"]
    rows[5] = ["not", "a", "row"]
    rows[6]["history"] = [["q", 2]]
    path.write_text(json.dumps(rows))
    with pytest.raises(UserError) as err:
        check_built(data_args(built))
    assert err.value.messages == [
        f"{path}:1:instruction: is blank; expected non-empty text{raw[0]}",
        f"{path}:2:output: is a number; expected a string{raw[1]}",
        f"{path}:3:history[0]: has 1 items; expected [instruction, response]{raw[2]}",
        f"{path}:4:extra: unknown field; expected instruction, input, output, system, history, tools, roles{raw[3]}",
        f"{path}:5:input: missing{raw[4]}",
        f"{path}:6: is a list; expected an object{raw[5]}",
        f"{path}:7:history[0][1]: is a number; expected a string{raw[6]}",
    ]


def test_row_count_mismatch_and_missing_build(built, make_recipe):
    path = built_dir(built["dataset_dir"], "d") / "val.json"
    path.write_text(json.dumps(json.loads(path.read_text())[:2]))
    with pytest.raises(UserError) as err:
        check_built(data_args(built))
    assert err.value.messages == [f"{path}: 2 rows, but manifest.json says 3; run `make data` "
                                  "(python -m pipeline build RECIPE), or set overwrite_cache: true so that train and "
                                  "eval rebuild it themselves"]
    other = make_recipe({"d": {"file_name": "raw/d.jsonl"}, "e": {"file_name": "raw/d.jsonl"}}, dataset=["e"])
    with pytest.raises(UserError, match="dataset 'e' is not built; run `make data`"):
        check_built(data_args(other))


def test_stale_build(built):
    with pytest.raises(UserError, match=r"built with other settings than the recipe's \(seed 42 -> 1\)"):
        check_built(data_args(dict(built, seed=1)))
    with open(built["dataset_dir"] + "/raw/d.jsonl", "a") as handle:
        handle.write(json.dumps({"instruction": "late", "output": "row"}) + "\n")
    with pytest.raises(UserError, match=r"data/build/d: built from other sources .*raw/d.jsonl was edited since"):
        check_built(data_args(built))


def test_fast_path_agrees_with_the_schema():
    validator = jsonschema.Draft202012Validator(load_schema("alpaca.schema.json"))
    text_validator = jsonschema.Draft202012Validator(load_schema("text.schema.json"))
    rng = random.Random(0)
    values = ["", " ", "x", "\u3000", 0, 1.5, None, True, [], ["a", "b"], [["a", "b"]], [["a"]], [["a", 1]],
              [["a", "b", "c"]], {}, [("a", "b")], "\n\t"]
    fields = ["instruction", "input", "output", "system", "history", "extra"]
    for _ in range(3000):
        row = {f: rng.choice(values) for f in fields if rng.random() < 0.7}
        if rng.random() < 0.5:
            row.update({"instruction": "i", "input": "", "output": "o"})
        candidate = json.loads(json.dumps(row))  # what a built file can hold (tuples become lists)
        assert row_ok(candidate) == validator.is_valid(candidate), candidate
        doc = {"text": rng.choice(values)} if rng.random() < 0.8 else rng.choice(values)
        doc = json.loads(json.dumps(doc))
        assert text_ok(doc) == text_validator.is_valid(doc), doc


def test_validate_labels_each_dataset_by_the_name_the_recipe_gives(tmp_path):
    """validate's table of a two-dataset recipe (dataset: tiny_sft,more_sft; eval_dataset: more_sft): one row per
    dataset and split, labelled by the name as the recipe gives it (load.split_parts), in recipe order; the rows
    counted as each stage reads them (tiny_sft, not in eval_dataset, is trained on whole). The label was read back
    off the build folder (path.parent.name): the same text while a registry name is its folder (names with '/' are
    refused), so this passed before too; it guards the label's source."""
    from tests.acceptance.harness import pipeline, write_data, write_recipe

    data = write_data(tmp_path / "data")
    registry = json.loads((data / "dataset_info.json").read_text())
    registry["more_sft"] = {"file_name": "raw/sft.jsonl", "formatting": "alpaca"}
    (data / "dataset_info.json").write_text(json.dumps(registry))
    write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", dataset="more_sft,tiny_sft",
                 output_dir="saves/r")
    pipeline("build", "r.yaml", cwd=tmp_path, as_typed=False)
    out = pipeline("validate", "r.yaml", "eval_dataset=more_sft", cwd=tmp_path, as_typed=False).stdout
    table = out[out.index("\ndataset ") + 1:].splitlines()
    assert [line.split()[:3] for line in table[1:]] == [["more_sft", "train", "21"], ["tiny_sft", "train", "24"],
                                                         ["more_sft", "val", "3"]], out
