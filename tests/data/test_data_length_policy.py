"""overlength_policy: drop / truncate / error, counted exactly; truncation cuts only the response side."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data.tokenize import NO_ROOM, OVER, encode_rows, length_table
from pipeline.data.tokenizer import gpt2
from pipeline.errors import UserError

EOS_ID = 50256  # GPT-2's <|endoftext|> (a published id, not read from the code under test)

HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n")


def enc(text: str) -> list[int]:
    return gpt2().encode(text)


def prompt_ids(q: str) -> list[int]:
    return enc(HEAD + f"### Instruction:\n{q}\n\n### Response:\n")


# Row k has a response of k*10 " word" tokens: lengths are len(prompt) + 10k + 1.
ROWS = [{"instruction": "Repeat.", "input": "", "output": " word" * (10 * k)} for k in range(1, 7)]
P = len(prompt_ids("Repeat."))
LENGTHS = [P + 10 * k + 1 for k in range(1, 7)]
CUTOFF = P + 35  # rows 1..3 fit (P+11, P+21, P+31); rows 4..6 do not


def test_lengths_are_what_we_think():
    assert len(enc(" word" * 10)) == 10
    split = encode_rows(ROWS, "alpaca", gpt2(), cutoff_len=10_000)
    assert split.lengths.tolist() == LENGTHS


def test_drop_counts_exactly():
    origins = [f"t.json:{i}" for i in range(1, 7)]
    split = encode_rows(ROWS, "alpaca", gpt2(), cutoff_len=CUTOFF, policy="drop", origins=origins)
    assert len(split) == 3 and split.dropped == {OVER: 3, NO_ROOM: 0} and split.truncated == 0
    assert list(map(str, split.origins)) == ["t.json:1", "t.json:2", "t.json:3"]
    assert list(map(str, split.dropped_rows)) == ["t.json:4", "t.json:5", "t.json:6"]
    assert split.example_lengths().tolist() == LENGTHS[:3]


def test_truncate_cuts_the_response_and_counts():
    split = encode_rows(ROWS, "alpaca", gpt2(), cutoff_len=CUTOFF, policy="truncate")
    assert len(split) == 6 and split.truncated == 3 and split.dropped == {OVER: 0, NO_ROOM: 0}
    assert split.example_lengths().tolist() == LENGTHS[:3] + [CUTOFF] * 3
    ex = split.example(5)
    assert ex.truncated and not split.example(0).truncated
    full = prompt_ids("Repeat.") + enc(" word" * 60) + [EOS_ID]
    assert ex.input_ids == full[:CUTOFF]
    assert ex.labels == [-100] * P + full[P:CUTOFF]  # the prompt is intact, the response cut


def test_truncate_drops_when_the_prompt_alone_is_too_long():
    rows = [{"instruction": "x " * 200, "input": "", "output": "ok"}]
    split = encode_rows(rows, "alpaca", gpt2(), cutoff_len=50, policy="truncate")
    assert len(split) == 0 and split.dropped == {OVER: 0, NO_ROOM: 1} and split.truncated == 0


def test_truncate_multi_turn_never_ends_inside_a_prompt():
    row = {"instruction": "second question " * 30, "input": "", "output": "second answer",
           "history": [["first?", "first answer"]]}
    p1, a1 = prompt_ids("first?"), enc("first answer")
    cutoff = len(p1) + len(a1) + 1 + 5  # 5 tokens into the second prompt
    split = encode_rows([row], "alpaca", gpt2(), cutoff_len=cutoff, policy="truncate")
    assert split.truncated == 1
    ex = split.example(0)
    assert ex.input_ids == p1 + a1 + [EOS_ID]  # cut back to the end of the first response
    assert ex.labels == [-100] * len(p1) + a1 + [EOS_ID]
    # with mask_history nothing trainable is left, so the row is dropped (and counted) instead
    masked = encode_rows([row], "alpaca", gpt2(), cutoff_len=cutoff, policy="truncate", mask_history=True)
    assert len(masked) == 0 and masked.dropped[NO_ROOM] == 1


def test_error_names_every_row():
    origins = [f"build/d/train.json:{i}" for i in range(1, 7)]
    with pytest.raises(UserError) as err:
        encode_rows(ROWS, "alpaca", gpt2(), cutoff_len=CUTOFF, policy="error", origins=origins)
    messages = err.value.messages
    assert messages[:3] == [f"build/d/train.json:{i}: {LENGTHS[i - 1]} tokens, over cutoff_len {CUTOFF}"
                            for i in (4, 5, 6)]
    assert "3 examples are longer than cutoff_len" in messages[3]


def test_exact_fit_is_kept():
    split = encode_rows(ROWS[:1], "alpaca", gpt2(), cutoff_len=LENGTHS[0], policy="error")
    assert len(split) == 1 and split.example_lengths()[0] == LENGTHS[0]


def test_unknown_policy():
    with pytest.raises(UserError, match="overlength_policy"):
        encode_rows(ROWS, "alpaca", gpt2(), cutoff_len=10, policy="cut")


def test_length_table_counts():
    lengths = np.array([3, 5, 5, 9, 12, 40, 41])
    table = length_table(lengths, cutoff_len=10)
    counted = sum(int(line.split()[3]) for line in table.splitlines()[1:-1])
    assert counted == 7
    over = [line for line in table.splitlines()[1:-1] if "over cutoff_len" in line]
    assert sum(int(line.split()[3]) for line in over) == 3
    assert table.splitlines()[-1].endswith("over cutoff_len 10: 3")
