"""Preference data (stage dpo): LLaMA-Factory ranking entries build into chosen/rejected pairs; row checks,
pair tokenization (only the last response scored) and the over-length policy on the pair as a whole."""
from __future__ import annotations

import json

import pytest

from data_helpers import jsonl
from pipeline.recipe.args import data_args
from pipeline.data.build import build, built_dir
from pipeline.data.check import check_built, pair_ok
from pipeline.data.pairs import encode_pairs
from pipeline.data.tokenize import NO_ROOM, OVER, encode_example
from pipeline.data.tokenizer import gpt2
from pipeline.errors import UserError

# LLaMA-Factory's dataset_info.json entries for ranking data (data/README.md), columns spelled out as there
ALPACA_ENTRY = {"file_name": "raw/pairs.jsonl", "ranking": True,
                "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen", "rejected": "rejected"}}
SHAREGPT_ENTRY = {"file_name": "raw/pairs_sg.json", "formatting": "sharegpt", "ranking": True,
                  "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected"}}
ALPACA_PAIRS = [
    {"instruction": "Name a color", "input": "", "chosen": "red", "rejected": "dog"},
    {"instruction": "Add", "input": "2 and 3", "chosen": "5", "rejected": "6"},
    {"instruction": "Same", "input": "", "chosen": "x", "rejected": "x"},  # identical: removed, counted
    {"instruction": "Blank", "input": "", "chosen": "  ", "rejected": "x"},  # empty chosen: removed, counted
    {"instruction": "Greet", "input": "", "chosen": "hello", "rejected": "go", "history": [["hi", "hey"]]},
    {"instruction": "Name an animal", "input": "", "chosen": "cat", "rejected": "blue"},
]
SHAREGPT_PAIRS = [
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Capital of France?"}],
     "chosen": {"from": "gpt", "value": "Paris"}, "rejected": {"from": "gpt", "value": "Rome"}},
    {"conversations": [{"from": "human", "value": "A?"}, {"from": "gpt", "value": "B"},
                       {"from": "human", "value": "C?"}],
     "chosen": {"from": "gpt", "value": "D"}, "rejected": {"from": "gpt", "value": "E"}},
    {"conversations": [{"from": "human", "value": "Up?"}],
     "chosen": {"from": "gpt", "value": "down"}, "rejected": {"from": "gpt", "value": "left"}},
]


def array(rows: list) -> str:
    """A JSON array with record i on line i + 1 (so a message's line names the record)."""
    return "[\n" + ",\n".join(json.dumps(row) for row in rows) + "\n]\n"


def recipe(make_recipe, **keys):
    files = {"raw/pairs.jsonl": jsonl(ALPACA_PAIRS), "raw/pairs_sg.json": array(SHAREGPT_PAIRS)}
    keys = {"stage": "dpo", "val_size": 0.34, "dataset": ["pa", "ps"], **keys}
    return make_recipe({"pa": ALPACA_ENTRY, "ps": SHAREGPT_ENTRY}, files, **keys)


def rows_of(r, name):
    d = built_dir(r["dataset_dir"], name)
    return json.loads((d / "train.json").read_text()) + json.loads((d / "val.json").read_text())


def test_alpaca_and_sharegpt_ranking_build_into_pairs(make_recipe):
    r = recipe(make_recipe)
    build(data_args(r))
    alpaca = sorted(rows_of(r, "pa"), key=lambda row: row["instruction"])
    assert alpaca == sorted([p for p in ALPACA_PAIRS if p["instruction"] not in ("Same", "Blank")],
                            key=lambda row: row["instruction"])
    manifest = json.loads((built_dir(r["dataset_dir"], "pa") / "manifest.json").read_text())
    assert manifest["removed"]["identical chosen and rejected"] == 1 and manifest["removed"]["empty chosen"] == 1
    assert manifest["rows_read"] == 6 and manifest["rows_kept"] == 4 and manifest["stage"] == "dpo"
    sharegpt = sorted(rows_of(r, "ps"), key=lambda row: row["instruction"])
    assert sharegpt == [
        {"instruction": "C?", "input": "", "chosen": "D", "rejected": "E", "history": [["A?", "B"]]},
        {"instruction": "Capital of France?", "input": "", "chosen": "Paris", "rejected": "Rome",
         "system": "Be brief."},
        {"instruction": "Up?", "input": "", "chosen": "down", "rejected": "left"},
    ]
    assert all(pair_ok(row) for row in alpaca + sharegpt)
    summary = check_built(data_args(r)).summary  # `validate` on the built pairs
    assert {s["dataset"] for s in summary} == {"pa", "ps"}


def test_missing_chosen_and_wrong_message_object_are_named_by_row(make_recipe):
    bad_alpaca = [ALPACA_PAIRS[0], {"instruction": "Q", "input": "", "rejected": "no"}]
    bad_sharegpt = [{"conversations": [{"from": "human", "value": "Q"}], "chosen": "just text",
                     "rejected": {"from": "gpt", "value": "x"}},
                    {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                     "chosen": {"from": "gpt", "value": "x"}, "rejected": {"from": "gpt", "value": "y"}}]
    r = make_recipe({"pa": ALPACA_ENTRY, "ps": SHAREGPT_ENTRY},
                    {"raw/pairs.jsonl": jsonl(bad_alpaca), "raw/pairs_sg.json": array(bad_sharegpt)},
                    stage="dpo", dataset=["pa", "ps"])
    with pytest.raises(UserError) as err:
        build(data_args(r))
    text = "\n".join(err.value.messages)
    assert "pairs.jsonl:2: missing 'chosen'" in text
    assert "pairs_sg.json:2: 'chosen' is a string; expected a message object" in text
    assert "pairs_sg.json:3: 'conversations' ends with a 'gpt' turn; for ranking data" in text
    assert not built_dir(r["dataset_dir"], "pa").exists()  # nothing half-written


def test_stage_and_ranking_must_agree(make_recipe):
    files = {"raw/pairs.jsonl": jsonl(ALPACA_PAIRS), "raw/sft.jsonl": jsonl([{"instruction": "a", "output": "b"}])}
    registry = {"pa": ALPACA_ENTRY, "plain": {"file_name": "raw/sft.jsonl"}}
    with pytest.raises(UserError) as err:
        build(data_args(make_recipe(registry, files, stage="sft", dataset=["pa"])))
    assert len(err.value.messages) == 1
    assert '"pa".ranking: preference data' in err.value.messages[0] and "set stage: dpo" in err.value.messages[0]
    with pytest.raises(UserError) as err:
        build(data_args(make_recipe(registry, files, stage="dpo", dataset=["plain"])))
    assert len(err.value.messages) == 1
    assert "has no preference pairs but the recipe's stage is dpo" in err.value.messages[0]
    assert '"ranking": true' in err.value.messages[0]


def test_only_the_last_response_is_scored_and_tokens_match_sft():
    row = {"instruction": "Greet", "input": "", "chosen": "hello there", "rejected": "go", "history": [["hi", "hey"]]}
    pairs = encode_pairs([row], "alpaca", gpt2(), cutoff_len=512)
    chosen = pairs.chosen.example(0)
    # the same tokens as sft tokenizes the row with output = chosen (mask_history: only the last response)
    sft = encode_example({**{k: v for k, v in row.items() if k not in ("chosen", "rejected")}, "output": "hello there"},
                         "alpaca", gpt2(), cutoff_len=512, mask_history=True)
    assert chosen.input_ids == sft.input_ids and chosen.labels == sft.labels
    enc = gpt2()
    scored = [t for t in chosen.labels if t != -100]
    assert enc.decode(scored) == "hello there<|endoftext|>"
    rejected = pairs.rejected.example(0)
    assert enc.decode([t for t in rejected.labels if t != -100]) == "go<|endoftext|>"
    n_prompt = len(chosen.input_ids) - len(scored)
    assert chosen.input_ids[:n_prompt] == rejected.input_ids[:n_prompt]  # the shared prompt


def pair_with(chosen_words: int, rejected_words: int, prompt: str = "Say it") -> dict:
    return {"instruction": prompt, "input": "", "chosen": " ".join(["word"] * chosen_words),
            "rejected": " ".join(["other"] * rejected_words)}


def test_overlength_policy_applies_to_the_pair_as_a_whole():
    short, long_rejected = pair_with(2, 2), pair_with(2, 60)
    base = len(encode_pairs([short], "alpaca", gpt2(), cutoff_len=512).rejected.example(0).input_ids)
    cutoff = base + 10  # the short pair fits, the long rejected side does not
    dropped = encode_pairs([short, long_rejected], "alpaca", gpt2(), cutoff_len=cutoff, policy="drop")
    assert len(dropped) == 1 and dropped.dropped == {OVER: 1, NO_ROOM: 0}
    assert list(map(str, dropped.dropped_rows)) == ["row 2"]  # the chosen side fitted: the pair still goes
    truncated = encode_pairs([short, long_rejected], "alpaca", gpt2(), cutoff_len=cutoff, policy="truncate")
    assert len(truncated) == 2 and truncated.truncated == 1
    assert len(truncated.rejected.example(1).input_ids) == cutoff
    assert len(truncated.chosen.example(1).input_ids) == len(truncated.chosen.example(0).input_ids)  # fits: uncut
    assert truncated.rejected.example(1).truncated and not truncated.chosen.example(1).truncated
    with pytest.raises(UserError) as err:
        encode_pairs([short, long_rejected], "alpaca", gpt2(), cutoff_len=cutoff, policy="error")
    assert "row 2" in err.value.messages[0] and "over cutoff_len" in err.value.messages[0]


def test_a_prompt_with_no_room_left_drops_the_pair():
    long_prompt = pair_with(1, 1, prompt=" ".join(["long"] * 80))
    out = encode_pairs([pair_with(1, 1), long_prompt], "alpaca", gpt2(), cutoff_len=60, policy="truncate")
    assert len(out) == 1 and out.dropped[NO_ROOM] == 1 and list(map(str, out.dropped_rows)) == ["row 2"]
