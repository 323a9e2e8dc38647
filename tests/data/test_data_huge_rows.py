"""An over-length row is dropped, rejected or truncated per overlength_policy without encoding all of it: a row
of megabytes without spaces costs what its first (cutoff_len + 1) x 128 + MAX_RUN characters cost. The
tokenizer's encode is wrapped to record what it is asked to encode; the kept tokens are checked against
tiktoken encoding the whole text itself."""
from __future__ import annotations

import pytest

from pipeline.data.tokenize import encode_cap, encode_rows
from pipeline.data.tokenizer import Tokenizer, gpt2
from pipeline.errors import UserError

HUGE = "ab" * (1 << 20)  # 2 MB, one run of letters: the slowest kind of text for BPE
PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
          "request.\n\n### Instruction:\nSay a lot.\n\n### Response:\n")


@pytest.fixture
def longest(monkeypatch) -> list[int]:
    """[the longest text the tokenizer was asked to encode], updated as it encodes."""
    seen = [0]
    original = Tokenizer.encode

    def encode(self, text):
        seen[0] = max(seen[0], len(text))
        return original(self, text)
    monkeypatch.setattr(Tokenizer, "encode", encode)
    return seen


def rows():
    return [{"instruction": "Say a lot.", "input": "", "output": HUGE},
            {"instruction": "Hi", "input": "", "output": "ok"}]


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_a_huge_row_is_decided_from_a_bounded_prefix(policy, longest):
    tok = gpt2()
    split = encode_rows(rows(), "alpaca", tok, cutoff_len=64, policy=policy)
    assert longest[0] <= encode_cap(tok, 64) < len(HUGE) // 10
    if policy == "drop":
        assert split.dropped["over cutoff_len"] == 1 and len(split) == 1
    else:
        assert split.truncated == 1 and len(split) == 2
        kept = split.example(0)
        whole = tok.encoding.tiktoken.encode_ordinary(PROMPT) + tok.encoding.tiktoken.encode_ordinary(HUGE)  # all of it
        assert list(kept.input_ids) == whole[:len(kept.input_ids)] and len(kept.input_ids) <= 64


def test_a_huge_row_under_policy_error_is_named_with_a_lower_bound(longest):
    tok = gpt2()
    with pytest.raises(UserError) as err:
        encode_rows(rows(), "alpaca", tok, cutoff_len=64, policy="error")
    assert "row 1" in err.value.messages[0] and "more than" in err.value.messages[0]
    assert longest[0] <= encode_cap(tok, 64)


def test_the_longest_token_is_remembered_per_encoding_object():
    """encode_cap's longest-token length was keyed by id(encoding): once an encoding was freed, a new one given the
    same number inherited its value. Held by the object (weakly), each encoding gets its own, and a freed one's
    entry goes with it."""
    import gc
    from types import SimpleNamespace

    from pipeline.data import tokenize

    class Encoding:  # the one operation encode_cap asks of an encoding
        def __init__(self, longest: int):
            self.values = [b"x" * longest]

        def token_byte_values(self) -> list[bytes]:
            return self.values

    caps, held = [], len(tokenize._MAX_TOKEN_BYTES)
    for longest in (3, 7):  # the first is freed before the second is made: CPython may reuse its id
        encoding = Encoding(longest)
        caps.append(encode_cap(SimpleNamespace(encoding=encoding), 9) - tokenize.MAX_RUN)
        del encoding
        gc.collect()
    assert caps == [10 * 3, 10 * 7]
    assert len(tokenize._MAX_TOKEN_BYTES) <= held  # nothing kept for the freed encodings
