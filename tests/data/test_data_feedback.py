"""KTO data (stage kto): LLaMA-Factory's kto_tag entries build into tagged rows; each row's KL sequence is the
prompt with the previous row's response, as LLaMA-Factory's FeedbackDatasetProcessor builds it; tags stay with
their rows through the length policy; the stage and the kto_tag column must agree."""
from __future__ import annotations

import json

import pytest

from data_helpers import jsonl
from pipeline.data.build import build, built_dir
from pipeline.data.check import check_built, feedback_ok
from pipeline.data.feedback import KL_CHUNK, encode_feedback, kl_rows
from pipeline.data.tokenize import encode_example
from pipeline.data.tokenizer import gpt2
from pipeline.errors import UserError
from pipeline.recipe.args import data_args

ALPACA_ENTRY = {"file_name": "raw/kto.jsonl", "columns": {"prompt": "instruction", "response": "output",
                                                          "kto_tag": "tag"}}
SHAREGPT_ENTRY = {"file_name": "raw/kto_sg.jsonl", "formatting": "sharegpt",
                  "columns": {"messages": "messages", "kto_tag": "label"},
                  "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                           "assistant_tag": "assistant"}}
ALPACA_ROWS = [{"instruction": "Name a color", "output": "red", "tag": True},
               {"instruction": "Name an animal", "output": "blue", "tag": False},
               {"instruction": "Add 2 and 3", "output": "5", "tag": True}]
SHAREGPT_ROWS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital?"},
                               {"role": "assistant", "content": "Rome"}], "label": False}]


def test_both_forms_build_into_tagged_rows_that_validate(make_recipe):
    r = make_recipe({"ka": ALPACA_ENTRY, "ks": SHAREGPT_ENTRY},
                    {"raw/kto.jsonl": jsonl(ALPACA_ROWS), "raw/kto_sg.jsonl": jsonl(SHAREGPT_ROWS)},
                    stage="kto", dataset=["ka", "ks"], val_size=0)
    build(data_args(r))
    rows = [json.loads((built_dir(r["dataset_dir"], name) / "train.json").read_text()) for name in ("ka", "ks")]
    assert sorted(rows[0], key=lambda row: row["instruction"]) == [
        {"instruction": "Add 2 and 3", "input": "", "output": "5", "kto_tag": True},
        {"instruction": "Name a color", "input": "", "output": "red", "kto_tag": True},
        {"instruction": "Name an animal", "input": "", "output": "blue", "kto_tag": False}]
    assert rows[1] == [{"instruction": "Capital?", "input": "", "output": "Rome", "system": "Be brief.",
                        "kto_tag": False}]
    assert all(feedback_ok(row) for part in rows for row in part)
    assert not feedback_ok({**rows[1][0], "kto_tag": "false"})
    assert {s["dataset"] for s in check_built(data_args(r)).summary} == {"ka", "ks"}


@pytest.mark.parametrize("stage, entry, words", [
    ("sft", ALPACA_ENTRY, ['"k".columns.kto_tag', "trains with stage: kto", "set stage: kto"]),
    ("kto", {"file_name": "raw/kto.jsonl"}, ["has no kto_tag column but the recipe's stage is kto",
                                             '"kto_tag"', "or set stage: sft"]),
    ("kto", {**ALPACA_ENTRY, "ranking": True}, ['"k".ranking', "train with stage: dpo"]),
], ids=["kto_tag-under-sft", "kto-without-kto_tag", "ranking-under-kto"])
def test_stage_and_kto_tag_must_agree(make_recipe, stage, entry, words):
    r = make_recipe({"k": entry}, {"raw/kto.jsonl": jsonl(ALPACA_ROWS)}, stage=stage, dataset=["k"], val_size=0)
    with pytest.raises(UserError) as err:
        build(data_args(r))
    text = "\n".join(err.value.messages)
    assert all(w in text for w in words), text
    assert text.count('"k".ranking') <= 1, text  # one message for the one mistake (not kto's and dpo's both)


def test_a_tag_that_is_not_a_boolean_is_named_by_row(make_recipe):
    rows = [ALPACA_ROWS[0], {"instruction": "Q", "output": "A", "tag": "true"}, {"instruction": "Q2", "output": "B"}]
    r = make_recipe({"k": ALPACA_ENTRY}, {"raw/kto.jsonl": jsonl(rows)}, stage="kto", dataset=["k"])
    with pytest.raises(UserError) as err:
        build(data_args(r))
    text = "\n".join(err.value.messages)
    assert "kto.jsonl:2: 'tag' (kto_tag) is a string; expected true" in text
    assert "kto.jsonl:3: missing 'tag' (kto_tag)" in text


def test_kl_sequences_take_the_previous_rows_response_within_chunks_of_lf_batches():
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}", "kto_tag": i % 2 == 0}
            for i in range(KL_CHUNK + 2)]
    pairs = kl_rows(rows)
    assert [p["rejected"] for p in pairs[:3]] == [f"a{KL_CHUNK - 1}", "a0", "a1"]  # LF: [last] + responses[:-1]
    assert pairs[KL_CHUNK]["rejected"] == f"a{KL_CHUNK + 1}" and pairs[KL_CHUNK + 1]["rejected"] == f"a{KL_CHUNK}"
    assert all(p["chosen"] == r["output"] and p["instruction"] == r["instruction"] and "kto_tag" not in p
               for p, r in zip(pairs, rows))


def test_examples_are_tokenized_as_sft_and_tags_follow_the_kept_rows():
    rows = [{"instruction": "Greet", "input": "", "output": "hello there", "kto_tag": True},
            {"instruction": "Bye", "input": "", "output": "see you", "kto_tag": False},
            {"instruction": "Again", "input": "", "output": "see you", "kto_tag": True},  # KL = its own response
            {"instruction": "Long", "input": "", "output": "word " * 80, "kto_tag": False},  # over cutoff: dropped
            {"instruction": "Last", "input": "", "output": "ok", "kto_tag": True}]  # its KL sequence is over too
    data = encode_feedback(rows, "alpaca", gpt2(), cutoff_len=48)
    assert len(data) == 3 and data.tags.tolist() == [True, False, True]
    assert data.dropped["over cutoff_len"] == 2
    sft = encode_example({"instruction": "Again", "input": "", "output": "see you"}, "alpaca", gpt2(), cutoff_len=48,
                         mask_history=True)
    assert data.chosen.example(2).input_ids == sft.input_ids == data.rejected.example(2).input_ids
