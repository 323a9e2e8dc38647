"""pipeline.data.encoding: Tokenizer runs any encoding that honours the Encoding interface, without asking which it
has. A third encoding (below: one id per printable character, the added tokens after them) goes through Tokenizer's
user-text and markup encodes, a recipe's new tokens, decode and an sft row's tokenization unchanged; tiktoken's
wrapper keeps the long-run bound. Golden values by hand. Failed before the interface: Tokenizer read tiktoken's private
_special_tokens / _mergeable_ranks from any encoding that was not an HFEncoding.
"""
from __future__ import annotations

import string
from typing import Collection, Literal, Sequence

from pipeline.data.encoding import MAX_RUN, TiktokenEncoding
from pipeline.data.tokenize import encode_example
from pipeline.data.tokenizer import Tokenizer, gpt2

ALPHABET = string.printable  # 100 characters, ids 0..99


class CharEncoding:
    """A third encoding: each character of ALPHABET is the id of its place; added tokens follow, in order."""

    name = "chars"
    prepend_scheme = None

    def __init__(self, added: Sequence[str] = ()):
        self.added_token_ids = {token: len(ALPHABET) + i for i, token in enumerate(added)}
        self.n_vocab = len(ALPHABET) + len(added)

    def encode(self, text: str, *, allowed_special: Collection[str] | Literal["all"] = frozenset(),
               continued: bool = False) -> list[int]:
        allowed = sorted(self.added_token_ids if allowed_special == "all" else allowed_special, key=len, reverse=True)
        ids, i = [], 0
        while i < len(text):
            token = next((t for t in allowed if text.startswith(t, i)), text[i])
            ids.append(self.added_token_ids[token] if token in allowed else ALPHABET.index(token))
            i += len(token)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.decode_single_token_bytes(i).decode() for i in ids)

    def decode_single_token_bytes(self, token: int) -> bytes:
        names = {i: t for t, i in self.added_token_ids.items()}
        return (ALPHABET[token] if token < len(ALPHABET) else names[token]).encode()

    def token_byte_values(self) -> list[bytes]:
        return [self.decode_single_token_bytes(i) for i in range(self.n_vocab)]

    def in_vocabulary(self, token: str) -> bool:
        return token in self.added_token_ids or (len(token) == 1 and token in ALPHABET)

    def with_added(self, tokens: Sequence[tuple[str, bool]]) -> CharEncoding:
        return CharEncoding([*self.added_token_ids, *(t for t, _ in tokens)])


def chars(text: str) -> list[int]:
    return [ALPHABET.index(c) for c in text]


def test_a_third_encoding_runs_behind_tokenizer_unchanged():
    eos = len(ALPHABET)  # "</s>", the checkpoint's only added token: markup, literal in user text
    tok = Tokenizer(CharEncoding(["</s>"]), "chars", eos_id=eos, pad_id=eos, special=frozenset({"</s>"}))
    assert tok.n_vocab == 101 and tok.prepend_scheme is None and tok.token_id("</s>") == eos
    assert tok.encode("a</s>") == chars("a</s>")  # typed markup stays text
    assert tok.encode_special("a</s>") == chars("a") + [eos]  # template markup is one token
    assert tok.present("a") and not tok.present("ab") and tok.present("</s>")

    tuned = tok.with_tokens(["<t>"], ["<s2>"])  # add_tokens first, then add_special_tokens: ids 101, 102
    assert (tuned.token_id("<t>"), tuned.token_id("<s2>"), tuned.new_tokens) == (101, 102, ("<t>", "<s2>"))
    assert tuned.encode("x<t>y<s2></s>") == chars("x") + [101] + chars("y") + [102] + chars("</s>")
    assert tuned.decode([101, 102, eos], skip_special=True) == "<t>"  # the special ones dropped, the plain one kept
    assert tok.encode("<t>") == chars("<t>")  # the checkpoint's tokenizer is left as it was

    got = encode_example({"instruction": "Hi", "input": "", "output": "Yo"}, "default", tok, cutoff_len=64)
    prompt = chars("Human: Hi") + [eos] + chars("\nAssistant:")  # LLaMA-Factory's default template, by hand
    answer = chars("Yo") + [eos] + chars("\n")
    assert got.input_ids == prompt + answer and got.labels == [-100] * len(prompt) + answer


def test_tiktokens_wrapper_bounds_long_runs():
    """GPT-2's encoding through the interface: a run past MAX_RUN characters is encoded in MAX_RUN pieces (each a
    whole tiktoken encode), ordinary text as tiktoken's own encode_ordinary."""
    encoding = gpt2().encoding
    assert isinstance(encoding, TiktokenEncoding) and encoding.prepend_scheme is None
    run = "x" * (MAX_RUN + 3)
    assert encoding.encode(run) == encoding.tiktoken.encode_ordinary(run[:MAX_RUN]) + \
        encoding.tiktoken.encode_ordinary("xxx")
    assert encoding.encode("Hello <|endoftext|>") == encoding.tiktoken.encode_ordinary("Hello <|endoftext|>")
    assert encoding.encode("Hello <|endoftext|>", allowed_special="all")[-1] == 50256
