"""preprocessing_num_workers: a build read in worker processes (files, and blocks of JSON Lines files) is the
serial build: the same files byte for byte, the same problems with the same file:line."""
from __future__ import annotations

import json

import pytest

from data_helpers import alpaca_rows, jsonl
from pipeline.recipe.args import data_args
from pipeline.data import build as build_module
from pipeline.data.build import build, built_dir, jsonl_blocks
from pipeline.errors import UserError


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(build_module, "BLOCK_MIN_BYTES", 1500)  # a few kB of rows become several blocks
    monkeypatch.setattr(build_module, "usable_cores", lambda: 4)  # worker processes even on a 1-core machine


def outputs(r) -> dict[str, bytes]:
    folder = built_dir(r["dataset_dir"], r["dataset"][0])
    return {name: (folder / name).read_bytes() for name in ("train.json", "val.json", "origins.json")}


def test_blocks_cover_the_file_at_line_starts(tmp_path):
    path = tmp_path / "a.jsonl"
    text = jsonl(alpaca_rows(50))
    path.write_text(text, encoding="utf-8")
    blocks = jsonl_blocks(path, 4)
    assert len(blocks) == 4 and blocks[0][:1] == (0,) and blocks[-1][1] == len(text.encode())
    lines = text.splitlines(keepends=True)
    for start, end, first in blocks:
        assert text.encode()[start:end].decode() == "".join(lines[first - 1:first - 1 + text.encode()[start:end].count(b"\n")])


def test_parallel_build_equals_serial(make_recipe, small_blocks):
    files = {"raw/a.jsonl": jsonl(alpaca_rows(120)), "raw/b.jsonl": jsonl(alpaca_rows(30, prefix="other")),
             "raw/c.json": json.dumps(alpaca_rows(20, prefix="third"))}
    r = make_recipe({"all": {"file_name": "raw"}}, files=files, dataset=["all"])
    build(data_args(r))
    serial = outputs(r)
    manifest = json.loads((built_dir(r["dataset_dir"], "all") / "manifest.json").read_text())
    build_module.remove_leftovers(built_dir(r["dataset_dir"], "all"))
    import shutil

    shutil.rmtree(built_dir(r["dataset_dir"], "all"))
    build(data_args({**r, "preprocessing_num_workers": 3}))
    assert outputs(r) == serial
    again = json.loads((built_dir(r["dataset_dir"], "all") / "manifest.json").read_text())
    assert again["sources"] == manifest["sources"] and again["rows_read"] == 170
    # each row's origin is its line in its file, also for rows read from blocks of a.jsonl in a worker process
    folder = built_dir(r["dataset_dir"], "all")
    origins = json.loads((folder / "origins.json").read_text())
    assert [s["path"] for s in manifest["sources"]] == ["raw/a.jsonl", "raw/b.jsonl", "raw/c.json"]
    for split in ("train", "val"):
        rows = json.loads((folder / f"{split}.json").read_text())
        for built, (source, where) in zip(rows, origins[split], strict=True):
            if source == 0:
                assert built["instruction"] == f"task {where - 1}: say the number"


def test_parallel_build_reports_the_same_problems(make_recipe, small_blocks):
    rows = alpaca_rows(120)
    text = jsonl(rows).splitlines(keepends=True)
    text[90] = '{"instruction": "x", "output": 3}\n'  # line 91, in a later block
    text[100] = "{broken\n"  # line 101
    r = make_recipe({"d": {"file_name": "raw/a.jsonl"}}, files={"raw/a.jsonl": "".join(text)}, dataset=["d"])
    with pytest.raises(UserError) as serial:
        build(data_args(r))
    with pytest.raises(UserError) as parallel:
        build(data_args({**r, "preprocessing_num_workers": 4}))
    assert parallel.value.messages == serial.value.messages
    assert any(":91: 'output' is a number (3)" in m for m in serial.value.messages)
    assert any(":101: invalid JSON" in m for m in serial.value.messages)
    bad = "".join(text[:90]).encode() + b'{"instruction": "\xff", "output": "y"}\n'
    (built_dir(r["dataset_dir"], "d").parent.parent / "raw" / "a.jsonl").write_bytes(bad)
    with pytest.raises(UserError) as serial:
        build(data_args(r))
    with pytest.raises(UserError) as parallel:
        build(data_args({**r, "preprocessing_num_workers": 4}))
    assert parallel.value.messages == serial.value.messages and "byte offset" in serial.value.messages[0]


def test_parallel_build_cleans_like_the_serial_one(make_recipe, small_blocks):
    """Duplicates across blocks and files, blank rows and rows with a system prompt or history: removed and
    kept the same way, the same bytes (workers send each row's JSON text and drop reason, not the row)."""
    import shutil

    rows = alpaca_rows(60)
    rows[5]["output"] = "  "  # blank
    rows += [dict(r) for r in rows[10:30]]  # duplicates of rows in the first block
    rows += [{**r, "system": "Be brief."} for r in rows[:10]]  # not duplicates: another system prompt
    rows += [{**r, "history": [["Hi", "Hello."]]} for r in rows[:10]] * 2  # duplicates among themselves
    files = {"raw/a.jsonl": jsonl(rows), "raw/b.jsonl": jsonl(rows[:15])}
    r = make_recipe({"all": {"file_name": "raw"}}, files=files, dataset=["all"], max_samples=70)
    build(data_args(r))
    serial = outputs(r)
    folder = built_dir(r["dataset_dir"], "all")
    manifest = json.loads((folder / "manifest.json").read_text())
    # 125 rows read: 5 blank (row 5 and its 4 copies), 43 duplicates (20 + 9 history copies + 14 in b.jsonl),
    # 77 left, 7 over max_samples
    assert manifest["removed"] == {"empty instruction": 0, "empty output": 5, "exact duplicate": 43,
                                   "over num_samples": 0, "over max_samples": 7} and manifest["rows_kept"] == 70
    shutil.rmtree(folder)
    build(data_args({**r, "preprocessing_num_workers": 2}))
    assert outputs(r) == serial
    assert json.loads((folder / "manifest.json").read_text())["removed"] == manifest["removed"]
