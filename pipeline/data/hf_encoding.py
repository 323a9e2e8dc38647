"""A sentencepiece-style BPE tokenizer.json (Llama 2, Mistral) run through Hugging Face `tokenizers`, behind the
few operations of tiktoken's Encoding that pipeline.data.tokenizer.Tokenizer uses.

Why `tokenizers` and not tiktoken: these vocabularies are no byte-level BPE. Text is normalised to "▁" for each
space with a prefix "▁" (Metaspace), merges follow the pieces' scores rather than the ids, and a character the
vocabulary lacks becomes its UTF-8 bytes as <0xNN> tokens (byte_fallback). tiktoken's ranks cannot say any of it;
the library that wrote the file runs it exactly, and transformers runs it the same way.

What transformers 5 changes on loading, done here too so that the ids equal AutoTokenizer's from the same folder:
a checkpoint whose tokenizer_config.json names LlamaTokenizer / LlamaTokenizerFast as its tokenizer_class gets the
normalizer, pre-tokenizer and decoder that class builds in its __init__
(transformers/models/llama/tokenization_llama.py:101-133, transformers 5.24): no normalizer, Metaspace(prepend_scheme "first", or
"always" with legacy: true, "never" with add_prefix_space: false; split false) and Replace / ByteFallback / Fuse /
Strip(1 left). The file's own (the legacy Prepend + Replace normalizer of Llama 2's hub file) is not what
transformers runs. Another class (PreTrainedTokenizerFast, TokenizersBackend), or none - whatever config.json's
model_type: transformers 5.24 then loads TokenizersBackend - runs the file as written. GemmaTokenizer (Gemma 3's
class) rebuilds alike, its own way (_as_gemma_tokenizer): "▁" for spaces, no prefix "▁".

Every template piece and every text is encoded on its own without the post-processor's BOS (transformers'
encode(text, add_special_tokens=False), as LLaMA-Factory's Template._convert_elements_to_ids calls it): each gets
the prefix "▁" of its Metaspace, as there. Which added tokens a text may contain as one token is the caller's
(`encode(text, allowed_special=...)`): the others are read as text, as transformers' split_special_tokens reads
the special ones; one `tokenizers.Tokenizer` per such set, made from the same JSON with the others left out of its
added tokens (the vocabulary pieces of <s>, [INST], ... are then never produced from text, as sentencepiece never
produces a control piece).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Iterable, Literal, Mapping, Sequence

if TYPE_CHECKING:  # imported where used: a byte-level checkpoint's commands never load the library (~30 ms)
    from tokenizers import Tokenizer

LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
GEMMA_CLASSES = ("GemmaTokenizer", "GemmaTokenizerFast")  # Gemma 1 / 2 / 3's tokenizer_config.json
METASPACE = "▁"


class Continued(str):
    """A template's text that goes on after a markup token inside one of its strings ("\\n\\nWhat ..." after Mistral
    v0.3's [/AVAILABLE_TOOLS]; pipeline.data.templates marks it). LLaMA-Factory encodes each string in one call, which
    transformers' tokenizer splits at the added token: a Metaspace with prepend_scheme "first" gives the text after
    it no prefix "▁", where a text encoded on its own gets one. Tokenizer.encode passes it as encode(continued=True);
    byte-level vocabularies encode it as any text."""

    __slots__ = ()


def is_sentencepiece_bpe(data: Mapping[str, Any]) -> bool:
    """Whether a tokenizer.json is a sentencepiece-style BPE: model BPE with byte_fallback (its <0xNN> pieces)."""
    model = data.get("model")
    return isinstance(model, dict) and model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def transformers_class_is_llama(config: Mapping[str, Any]) -> bool:
    """Whether AutoTokenizer (transformers 5.24) loads the folder as LlamaTokenizer, which rebuilds the pipeline: only
    where tokenizer_config.json names that class. Without a tokenizer_class it loads TokenizersBackend (the file as
    written) whatever config.json's model_type (llama, mistral: measured, tests/vocab/test_sentencepiece_tokenizers.py)."""
    return config.get("tokenizer_class") in LLAMA_CLASSES


def _as_llama_tokenizer(tokenizer: Tokenizer, config: Mapping[str, Any]) -> None:
    """transformers 5's LlamaTokenizer.__init__ steps, re-typed (tokenization_llama.py:101-133 with
    tokenization_utils_base.py:3770-3777): the config's legacy (default false) and add_prefix_space (default
    true) pick the prepend scheme."""
    from tokenizers import decoders, pre_tokenizers

    add_prefix_space = config.get("add_prefix_space")
    add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=METASPACE, prepend_scheme=scheme, split=False)
    steps = [decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1))
    tokenizer.decoder = decoders.Sequence(steps)


def _as_gemma_tokenizer(tokenizer: Tokenizer) -> None:
    """transformers 5's GemmaTokenizer.__init__ steps, re-typed (tokenization_gemma.py:82-101, 5.24): spaces
    normalised to "▁" with no prefix, a Split on " " (which then finds none), Replace / ByteFallback / Fuse decoding;
    the BPE model (byte_fallback, fuse_unk) is the file's."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    tokenizer.normalizer = normalizers.Replace(" ", METASPACE)
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(METASPACE, " "), decoders.ByteFallback(), decoders.Fuse()])


def _not_first(pre_tokenizer: Any) -> Any:
    """A tokenizer.json's pre_tokenizer with Metaspace's prepend_scheme "first" as "never" (inside a Sequence too):
    how it treats a split that does not start the text."""
    if not isinstance(pre_tokenizer, dict):
        return pre_tokenizer
    if pre_tokenizer.get("type") == "Sequence":
        return {**pre_tokenizer, "pretokenizers": [_not_first(p) for p in pre_tokenizer.get("pretokenizers") or []]}
    if pre_tokenizer.get("type") == "Metaspace" and pre_tokenizer.get("prepend_scheme") == "first":
        return {**pre_tokenizer, "prepend_scheme": "never"}
    return pre_tokenizer


def _metaspace_scheme(pre_tokenizer: Any) -> str | None:
    """The prepend_scheme of a tokenizer.json pre_tokenizer's Metaspace (inside a Sequence too), None without one."""
    if not isinstance(pre_tokenizer, dict):
        return None
    if pre_tokenizer.get("type") == "Sequence":
        return next(filter(None, map(_metaspace_scheme, pre_tokenizer.get("pretokenizers") or [])), None)
    if pre_tokenizer.get("type") == "Metaspace":  # files before tokenizers 0.14 say add_prefix_space
        return pre_tokenizer.get("prepend_scheme") or ("always" if pre_tokenizer.get("add_prefix_space", True)
                                                       else "never")
    return None


def _never_matched(content: str) -> str:
    """A stand-in for an added token that holds its id in an encoding that must not match it: U+FFFF, a Unicode
    noncharacter (never in interchanged text), around the token it stands for (each stand-in its own)."""
    return f"\uffff{content}\uffff"


class HFEncoding:
    """The tokenizer.json of a checkpoint as Tokenizer's encoding (pipeline.data.encoding.Encoding: tiktoken
    Encoding's names for the operations the pipeline uses, the added tokens as added_token_ids, with_added for a
    recipe's new tokens)."""

    def __init__(self, name: str, text: str, added: Sequence[tuple[str, bool]] = ()):
        self.name = name
        self._text = text  # the tokenizer.json (after the class's rebuild), without the recipe's tokens
        self._new = tuple(added)  # the recipe's tokens: (content, special), in the order they were added
        self._data: dict[str, Any] = json.loads(text)  # for the variants (_build), parsed once
        self._full = self._build(None, False)
        self._variants: dict[tuple[frozenset[str], bool], Tokenizer] = {}  # _variant's
        self.added_tokens: dict[str, tuple[int, bool]] = {t.content: (i, t.special)  # content -> (id, special)
                                                          for i, t in self._full.get_added_tokens_decoder().items()}
        self.added_token_ids: dict[str, int] = {content: i for content, (i, _) in self.added_tokens.items()}
        self._added_ids = frozenset(self.added_token_ids.values())
        self.n_vocab: int = max(self._full.get_vocab_size(with_added_tokens=True),
                                max(self.added_token_ids.values(), default=-1) + 1)

    @classmethod
    def from_file(cls, path: Path, config: Mapping[str, Any]) -> HFEncoding:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
        if transformers_class_is_llama(config):
            _as_llama_tokenizer(tokenizer, config)
        elif config.get("tokenizer_class") in GEMMA_CLASSES:
            _as_gemma_tokenizer(tokenizer)
        tokenizer.post_processor = None  # never used: every encode is add_special_tokens=False
        return cls(str(path), tokenizer.to_str())

    def _build(self, recognised: frozenset[str] | None, continued: bool) -> Tokenizer:
        """The tokenizer that matches only the `recognised` added tokens in text (None: all of them); `continued`:
        one for text after an added token inside a string (no "first" prefix space)."""
        from tokenizers import AddedToken, Tokenizer

        if recognised is None and not continued:
            tokenizer = Tokenizer.from_str(self._text)
        else:
            data = dict(self._data)
            if recognised is not None:
                data["added_tokens"] = self._left_out(data.get("added_tokens") or [], recognised)
            if continued:
                data["pre_tokenizer"] = _not_first(data.get("pre_tokenizer"))
            tokenizer = Tokenizer.from_str(json.dumps(data))
        # transformers' add_tokens: AddedToken(normalized=not special, special=special), plain ones then special ones
        for content, special in self._new:
            if recognised is not None and content not in recognised:  # its id held, never matched (_left_out)
                content, special = _never_matched(content), True
            token = AddedToken(content, normalized=not special, special=special)
            (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
        return tokenizer

    def _left_out(self, entries: list[dict[str, Any]], recognised: frozenset[str]) -> list[dict[str, Any]]:
        """tokenizer.json's added_tokens for an encoding that reads those not `recognised` as text. A token that is
        a vocabulary piece ([INST], <s>) is left out: its id is the piece's. One past the vocabulary keeps its entry
        under a content no text holds: `tokenizers` numbers those in order from the vocabulary's end whatever ids
        the file gives, so leaving one out moved the ids of every later one down by one."""
        vocab = (self._data.get("model") or {}).get("vocab") or {}
        return [t if t["content"] in recognised else {**t, "content": _never_matched(t["content"]), "special": True,
                                                      "normalized": False}
                for t in entries if t["content"] in recognised or t["content"] not in vocab]

    def _variant(self, recognised: frozenset[str], continued: bool) -> Tokenizer:
        """The tokenizer for `recognised` and `continued` (_build), made once per encoding: a handful of sets for its
        lifetime, kept on the instance so that they go with it (two threads may both build one: either will do)."""
        key = (recognised, continued)
        if key not in self._variants:
            every = recognised >= frozenset(self.added_token_ids)
            self._variants[key] = (self._full if every and (not continued or not self._prepends_first) else
                                   self._build(None if every else recognised, continued and self._prepends_first))
        return self._variants[key]

    @functools.cached_property
    def _prepends_first(self) -> bool:
        """Whether the pre-tokenizer is a Metaspace with prepend_scheme "first" (a continued text differs)."""
        return self.prepend_scheme == "first"

    @functools.cached_property
    def prepend_scheme(self) -> str | None:
        """The prepend_scheme of the pre-tokenizer's Metaspace (inside a Sequence too): "first" (transformers'
        LlamaTokenizer with legacy false: only a text's start gets the prefix "▁", not the text after an added token
        in it), "always" (legacy true: every split between added tokens gets one) or "never"; None without a
        Metaspace (the legacy Prepend normalizer a PreTrainedTokenizerFast-class file runs as written). The exported
        chat template writes the space that becomes the prefix "▁" by it (pipeline.data.chat_template)."""
        return _metaspace_scheme(self._data.get("pre_tokenizer"))

    def encode(self, text: str, *, allowed_special: Collection[str] | Literal["all"] = frozenset(),
               continued: bool = False) -> list[int]:
        """`text` as transformers' encode(text, add_special_tokens=False); of the added tokens, only
        `allowed_special` ("all": every one) is one token where it appears, the rest is text. continued: `text`
        follows an added token inside the string transformers encodes (the module's docstring). The text is encoded
        whole, however long (no bounded pieces): the merge of `tokenizers` is not quadratic, and a Metaspace would
        give each cut piece a prefix "▁" of its own."""
        recognised = frozenset(self.added_token_ids) if allowed_special == "all" else frozenset(allowed_special)
        return self._variant(recognised, continued).encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        """transformers 5's decode(ids, skip_special_tokens=False) (the decoder's ByteFallback, Fuse, the first
        space stripped); the caller drops the special tokens it skips."""
        return self._full.decode(list(ids), skip_special_tokens=False)

    def decode_single_token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for: <0xNN> its byte, an added token its text, a piece its text with "▁" a
        space (the prefix space included: what the token adds after another)."""
        piece = self._full.id_to_token(token)
        if piece is None:
            raise KeyError(token)
        if token not in self._added_ids and len(piece) == 6 and piece.startswith("<0x") and piece[5] == ">":
            return bytes([int(piece[3:5], 16)])
        return piece.replace(METASPACE, " ").encode("utf-8")

    def token_byte_values(self) -> list[bytes]:
        return [self.decode_single_token_bytes(i) for i in range(self.n_vocab) if self._full.id_to_token(i) is not None]

    def vocabulary_id(self, token: str) -> int | None:
        """The id of a piece or added token spelled `token`, None when there is none."""
        return self._full.token_to_id(token)

    def in_vocabulary(self, token: str) -> bool:
        """Whether `token` has an id already (transformers' add_tokens then adds nothing): a piece or added token."""
        return self.vocabulary_id(token) is not None

    def with_config_tokens(self, entries: Sequence[Mapping[str, Any]]) -> HFEncoding:
        """This encoding with tokenizer_config.json's added_tokens_decoder entries that tokenizer.json lacks
        (tokenizer_files.decoder_only_tokens), added as transformers 5 adds them on loading: AddedToken with the
        entry's flags (special, normalized, lstrip, rstrip, single_word), each given its vocabulary piece's id, else
        the next free one; the recipe's tokens come after them. Written into the file's added_tokens, which the
        variants are built from (_build), so a variant that reads one of them as text keeps every id (_left_out)."""
        from tokenizers import AddedToken, Tokenizer

        tokenizer = Tokenizer.from_str(self._text)
        flags = ("special", "normalized", "lstrip", "rstrip", "single_word")
        tokenizer.add_tokens([AddedToken(e["content"], **{k: bool(e[k]) for k in flags if k in e}) for e in entries])
        return HFEncoding(self.name, tokenizer.to_str(), self._new)

    def with_added(self, tokens: Sequence[tuple[str, bool]]) -> HFEncoding:
        """This encoding with a recipe's new tokens, (content, special) each, ids from n_vocab up."""
        return HFEncoding(self.name, self._text, (*self._new, *tokens))
