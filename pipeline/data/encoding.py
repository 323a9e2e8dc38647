"""What Tokenizer asks of the encoding under it (`Encoding`), and tiktoken's Encoding behind that interface
(`TiktokenEncoding`).

Two libraries run a checkpoint's vocabulary: tiktoken a byte-level BPE (GPT-2, Llama 3, Qwen), Hugging Face
`tokenizers` a sentencepiece-style tokenizer.json (Llama 2, Mistral: pipeline.data.hf_encoding.HFEncoding).
pipeline.data.tokenizer.Tokenizer holds one of them and never asks which: every way they differ is an operation or a
property of the interface - which added tokens a text may contain as one token (encode's allowed_special), how a text
that follows a markup token inside a template string is encoded (continued), whether a text encoded on its own gets a
prefix "▁" (prepend_scheme), where a long text is cut before encoding (tiktoken's bounded pieces; none for
`tokenizers`), how the recipe's tokens are added (with_added). A third library implements Encoding and leaves
Tokenizer as it is.

Pathological input is bounded before tiktoken encodes it, as Meta's Llama 3 tokenizer does: a run of more than
MAX_RUN characters without whitespace (or of whitespace) is cut into MAX_RUN pieces, because tiktoken's merge is
quadratic in the length of one pre-token (openai/tiktoken#195) and a tens-of-MB row without spaces would otherwise
stall build or train. Ordinary text never has such runs and is unaffected.
"""
from __future__ import annotations

import re
from itertools import chain
from typing import Collection, Literal, Mapping, Protocol, Sequence

import tiktoken

MAX_RUN = 25_000  # Meta's MAX_NO_WHITESPACES_CHARS (llama3/tokenizer.py)
_LONG_RUN = re.compile(r"(?<!\S)\S{%d,}|(?<!\s)\s{%d,}" % (MAX_RUN + 1, MAX_RUN + 1))


def bounded(text: str) -> list[str]:
    """`text` cut so that no run of whitespace or of non-whitespace exceeds MAX_RUN characters.

    Cuts fall at run start + k * MAX_RUN, as in Meta's `_split_whitespaces_or_nonwhitespaces`. The
    lookbehinds make the scan linear: a run is only tried from its first character.
    """
    if len(text) <= MAX_RUN:
        return [text]
    cuts = [c for m in _LONG_RUN.finditer(text) for c in range(m.start() + MAX_RUN, m.end(), MAX_RUN)]
    if not cuts:
        return [text]
    edges = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(edges[:-1], edges[1:])]


class Encoding(Protocol):
    """The operations Tokenizer uses, by tiktoken Encoding's names where it has one. Ids run 0..n_vocab-1."""

    name: str  # the file it was read from, or "gpt2"

    @property
    def n_vocab(self) -> int: ...

    @property
    def added_token_ids(self) -> Mapping[str, int]:
        """Every added token (special or not: tiktoken calls them all special tokens) -> its id."""
        ...

    @property
    def prepend_scheme(self) -> str | None:
        """How a text encoded on its own gets a prefix "▁": a sentencepiece Metaspace's "first" / "always" / "never";
        None where a space is a token of its own (byte-level BPE). The exported chat template writes its spaces by it
        (pipeline.data.chat_template_blocks)."""
        ...

    def encode(self, text: str, *, allowed_special: Collection[str] | Literal["all"] = frozenset(),
               continued: bool = False) -> list[int]:
        """`text` as transformers' encode(text, add_special_tokens=False): only the added tokens in `allowed_special`
        ("all": every one) are one token where they appear, the rest is text; `continued`: the text follows a markup
        token inside one template string (pipeline.data.hf_encoding.Continued)."""
        ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def decode_single_token_bytes(self, token: int) -> bytes: ...

    def token_byte_values(self) -> list[bytes]: ...

    def in_vocabulary(self, token: str) -> bool:
        """Whether `token` has an id already (a vocabulary piece or an added token): add_tokens then adds nothing."""
        ...

    def with_added(self, tokens: Sequence[tuple[str, bool]]) -> Encoding:
        """This encoding with a recipe's new tokens, (content, special) each in order, ids from n_vocab up."""
        ...


class TiktokenEncoding:
    """A tiktoken Encoding (byte-level BPE) as an Encoding. `tiktoken` is the wrapped Encoding itself, for a caller
    that needs tiktoken's own view (GPT-2's ranks for the exported vocab.json / merges.txt, tests' references)."""

    prepend_scheme = None  # byte-level BPE: a space is a token of its own, nothing is prepended

    def __init__(self, encoding: tiktoken.Encoding):
        self.tiktoken = encoding
        self.name = encoding.name

    @property
    def n_vocab(self) -> int:
        return self.tiktoken.n_vocab

    @property
    def added_token_ids(self) -> Mapping[str, int]:
        return self.tiktoken._special_tokens

    @property
    def ranks(self) -> Mapping[bytes, int]:
        """The mergeable ranks: token bytes -> id (= merge priority), the vocabulary without the added tokens."""
        return self.tiktoken._mergeable_ranks

    def encode(self, text: str, *, allowed_special: Collection[str] | Literal["all"] = frozenset(),
               continued: bool = False) -> list[int]:
        """`text` in bounded pieces, each encoded on its own (a byte-level BPE's split cuts at a run's edges anyway);
        a continued text is encoded as any text (no prefix space to leave out)."""
        del continued
        pieces = bounded(text)
        if not allowed_special:  # tiktoken's faster path: no added token can be matched
            if len(pieces) == 1:
                return self.tiktoken.encode_ordinary(text)
            return list(chain.from_iterable(self.tiktoken.encode_ordinary(p) for p in pieces))
        return [t for piece in pieces
                for t in self.tiktoken.encode(piece, allowed_special=allowed_special, disallowed_special=())]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tiktoken.decode(ids)

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.tiktoken.decode_single_token_bytes(token)

    def token_byte_values(self) -> list[bytes]:
        return self.tiktoken.token_byte_values()

    def in_vocabulary(self, token: str) -> bool:
        return token in self.added_token_ids or token.encode() in self.ranks

    def with_added(self, tokens: Sequence[tuple[str, bool]]) -> TiktokenEncoding:
        """tiktoken has one kind of added token: the special flag is the Tokenizer's (decode's skip_special)."""
        specials = {**self.added_token_ids, **{t: self.n_vocab + i for i, (t, _) in enumerate(tokens)}}
        return TiktokenEncoding(tiktoken.Encoding(name=self.name, pat_str=self.tiktoken._pat_str,
                                                  mergeable_ranks=self.ranks, special_tokens=specials))
