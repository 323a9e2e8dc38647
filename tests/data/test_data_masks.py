"""Loss masks token by token; expected ids come from separate tokenizer calls on hand-written pieces."""
from __future__ import annotations

import pytest

from pipeline.data.origins import Origin
from pipeline.data.templates import Segment, Template, get_template
from pipeline.data.tokenize import Dropped, Encoded, encode_example, encode_rows
from pipeline.data.tokenizer import gpt2
from pipeline.errors import UserError

EOS_ID = 50256  # GPT-2's <|endoftext|> (a published id, not read from the code under test)

HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n")
M = -100


def enc(text: str) -> list[int]:
    return gpt2().encode(text)


def encode(row, **kw):
    kw.setdefault("cutoff_len", 1024)
    return encode_example(row, get_template(kw.pop("template", "alpaca")), gpt2(), **kw)


def test_single_turn_trains_response_and_eos_only():
    row = {"instruction": "Name a primary colour.", "input": "", "output": "Red."}
    prompt = enc(HEAD + "### Instruction:\nName a primary colour.\n\n### Response:\n")
    response = enc("Red.")
    got = encode(row)
    assert isinstance(got, Encoded)
    assert got.input_ids == prompt + response + [EOS_ID]
    assert got.labels == [M] * len(prompt) + response + [EOS_ID]
    assert not got.truncated


def test_input_and_system():
    row = {"instruction": "Add.", "input": "2 and 3", "output": "5", "system": "You are terse."}
    prompt = enc("You are terse.\n\n### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
    got = encode(row)
    assert got.input_ids == prompt + enc("5") + [EOS_ID]
    assert got.labels == [M] * len(prompt) + enc("5") + [EOS_ID]


def test_history_every_assistant_turn_trained():
    row = {"instruction": "And 3+3?", "input": "", "output": "6", "history": [["What is 1+1?", "2"]]}
    p1 = enc(HEAD + "### Instruction:\nWhat is 1+1?\n\n### Response:\n")
    a1 = enc("2")
    p2 = enc("\n\n### Instruction:\nAnd 3+3?\n\n### Response:\n")
    a2 = enc("6")
    got = encode(row)
    assert got.input_ids == p1 + a1 + [EOS_ID] + p2 + a2 + [EOS_ID]
    assert got.labels == [M] * len(p1) + a1 + [EOS_ID] + [M] * len(p2) + a2 + [EOS_ID]
    masked = encode(row, mask_history=True)
    assert masked.input_ids == got.input_ids
    assert masked.labels == [M] * (len(p1) + len(a1) + 1 + len(p2)) + a2 + [EOS_ID]


def test_train_on_prompt():
    row = {"instruction": "And 3+3?", "input": "", "output": "6", "history": [["What is 1+1?", "2"]]}
    got = encode(row, train_on_prompt=True)
    assert got.labels == got.input_ids
    p1 = enc(HEAD + "### Instruction:\nWhat is 1+1?\n\n### Response:\n")
    # with mask_history too, every prompt stays trained and only the earlier responses (their EOS included) are
    # masked, as LLaMA-Factory 0.9.5's supervised processor labels them (data/processor/supervised.py:83-91:
    # source_label = source_ids under train_on_prompt for every turn; target_label IGNORE for turn_idx != 0 of the
    # reversed pairs)
    both = encode(row, train_on_prompt=True, mask_history=True)
    answer = len(enc("2")) + 1
    assert both.labels == p1 + [M] * answer + got.input_ids[len(p1) + answer:]


def test_default_template_masks():
    """LLaMA-Factory's default template: each block encoded on its own, EOS by id inside the blocks."""
    row = {"instruction": "Hi", "input": "", "output": "Hello!", "system": "Be kind.", "history": [["Q", "A"]]}
    E = [EOS_ID]
    p1 = enc("System: Be kind.") + E + enc("\n") + enc("Human: Q") + E + enc("\nAssistant:")
    a1 = enc("A") + E + enc("\n")
    p2 = enc("Human: Hi") + E + enc("\nAssistant:")
    a2 = enc("Hello!") + E + enc("\n")
    got = encode(row, template="default")
    assert got.input_ids == p1 + a1 + p2 + a2
    assert got.labels == [M] * len(p1) + a1 + [M] * len(p2) + a2
    assert encode(row, template="default", mask_history=True).labels == [M] * (len(p1) + len(a1) + len(p2)) + a2


def test_user_eos_text_is_not_a_special_token():
    row = {"instruction": "say <|endoftext|>", "input": "", "output": "<|endoftext|>"}
    got = encode(row)
    assert got.input_ids.count(EOS_ID) == 1 and got.input_ids[-1] == EOS_ID


def test_batch_equals_single_rows():
    rows = [{"instruction": f"q{i}", "input": "x" * i, "output": f"a{i}", "history": [["h", "r"]] * (i % 3)}
            for i in range(7)]
    split = encode_rows(rows, "alpaca", gpt2(), cutoff_len=1024, mask_history=True)
    for i, row in enumerate(rows):
        assert split.example(i) == encode(row, mask_history=True)


def test_zero_trainable_tokens_is_a_hard_error():
    class Silent(Template):
        def segments(self, row, *, train_on_prompt=False, mask_history=False, enable_thinking=True):
            return [Segment((row["instruction"],), False, False), Segment((row["output"],), False, True)]

    base = get_template("alpaca")
    silent = Silent(**{k: getattr(base, k) for k in base.__dataclass_fields__})
    with pytest.raises(UserError) as err:
        encode_rows([{"instruction": "a", "input": "", "output": "b"}] * 2, silent, gpt2(), cutoff_len=64,
                    origins=[Origin("data/raw/x.jsonl", 7, "x"), Origin("data/raw/y.parquet", "row 2", "y")])
    # named by the raw row each was built from (no template of the pipeline trains nothing: no CLI reaches this)
    assert err.value.messages[0].startswith("data/raw/x.jsonl:7 (dataset 'x'): no trainable token")
    assert err.value.messages[1].startswith("data/raw/y.parquet:row 2 (dataset 'y'): no trainable token")


def test_encode_example_drops_an_example_over_cutoff_len():
    row = {"instruction": "Q", "input": "", "output": "A " * 50}
    got = encode_example(row, get_template("alpaca"), gpt2(), cutoff_len=20, policy="drop")
    assert isinstance(got, Dropped) and got.reason == "over cutoff_len"
    assert got.length == len(enc(HEAD + "### Instruction:\nQ\n\n### Response:\n")) + len(enc("A " * 50)) + 1


def test_render_marks_trained_runs():
    from pipeline.data.inspect import GREEN, RESET, render

    ids = enc("Q: hi") + enc(" A: yo") + [EOS_ID]
    flags = [False] * len(enc("Q: hi")) + [True] * (len(enc(" A: yo")) + 1)
    assert render(ids, flags, color=False, tokenizer=gpt2()) == "Q: hi[[ A: yo<|endoftext|>]]"
    assert render(ids, flags, color=True, tokenizer=gpt2()) == f"Q: hi{GREEN} A: yo<|endoftext|>{RESET}"


def test_threaded_encoding_matches_sequential():
    texts = [f"row {i}: {'é' * (i % 7)} text" for i in range(9000)]
    assert gpt2().encode_batch(texts) == [gpt2().encode(t) for t in texts]


def test_row_chunks_join_seamlessly(monkeypatch):
    import pipeline.data.tokenize as tokenize

    rows = [{"instruction": f"q{i}", "input": "x" * i, "output": f"a{i} " * i, "history": [["h", "r"]] * (i % 3)}
            for i in range(1, 12)]
    whole = encode_rows(rows, "alpaca", gpt2(), cutoff_len=50, policy="truncate")
    monkeypatch.setattr(tokenize, "ROW_CHUNK", 3)
    chunked = encode_rows(rows, "alpaca", gpt2(), cutoff_len=50, policy="truncate")
    assert chunked.ids.tolist() == whole.ids.tolist() and chunked.offsets.tolist() == whole.offsets.tolist()
    assert chunked.trainable.tolist() == whole.trainable.tolist() and chunked.truncated == whole.truncated
    for i, row in enumerate(rows):
        assert chunked.example(i) == encode(row, cutoff_len=50, policy="truncate")
