"""The model's tokenizer: GPT-2's ranks or a checkpoint's own byte-level BPE run through tiktoken, or a checkpoint's
sentencepiece-style tokenizer.json (Llama 2, Mistral) run through Hugging Face `tokenizers`
(pipeline.data.hf_encoding), each behind one interface (pipeline.data.encoding.Encoding).

`load_tokenizer(model_name_or_path)` is the one way every stage gets token ids, so the end-of-text id,
BOS, padding and the stop tokens are properties of the model's tokenizer, never literals:

- a GPT-2 preset (or "gpt2", or a GPT-2 checkpoint without tokenizer files): GPT-2's ranks, which
  `make setup` places at `.cache/gpt2.tiktoken` (from the openai-whisper sdist on PyPI, sha256 checked);
- a checkpoint directory (or a hub id, resolved into the Hugging Face cache by pipeline.model.hub):
  its tokenizer.json / vocab.json + merges.txt / Meta's original/tokenizer.model, read by
  pipeline.data.tokenizer_files.

User text is encoded with markup-token strings kept literal ("<|im_end|>" typed by a user is text,
not the end of a turn: EOS, BOS, pad, stop tokens and the templates' markup); only template markup goes
through `encode_special` / `token_id`. Every other token the checkpoint's files add, special or not (Qwen3's
<think>, <tool_call>, a token an earlier run added), is recognised in any text, as the Hugging Face tokenizer
does (pipeline.data.tokenizer_files.markup_tokens).

Pathological input (a run of tens of MB without whitespace) is bounded before tiktoken encodes it
(pipeline.data.encoding.bounded).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Sequence

import tiktoken

from pipeline.data.encoding import Encoding, TiktokenEncoding
from pipeline.data.hf_encoding import Continued
from pipeline.errors import UserError

GPT2_EOS = "<|endoftext|>"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_SDIST = "openai-whisper==20250625"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Same pattern as tiktoken_ext.openai_public.r50k_pat_str (GPT-2's original split, faster form).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
BATCH_MIN = 4096  # texts below which one thread encodes
CHUNK = 8192  # texts per thread task


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """An Encoding (pipeline.data.encoding: tiktoken's for a byte-level BPE, HFEncoding for a sentencepiece-style
    tokenizer.json), plus what the checkpoint says about its special tokens. Neither this class nor the rest of the
    pipeline asks which encoding it has: each difference is the Encoding's to answer.

    eos_id ends a response and separates pt documents (the checkpoint's eos_token); stop_ids are
    every id generation stops at (eos_id plus generation_config.json's eos_token_id list, e.g.
    Llama 3's <|eot_id|>, <|eom_id|>, <|end_of_text|>); pad_id fills batches (masked out); bos_id is
    None when the family has no BOS (Qwen).
    """

    encoding: Encoding
    name: str  # "gpt2", or the file it was read from
    eos_id: int
    pad_id: int
    bos_id: int | None = None
    stop_ids: tuple[int, ...] = ()
    special: frozenset[str] = frozenset()  # special: decode(skip_special=True) drops them
    added: frozenset[str] = frozenset()  # recognised in any text: every added token but the markup (tokenizer_files)
    nfc: bool = False  # the checkpoint normalises text to NFC first (Qwen2)
    files: tuple[Path, ...] = ()  # the checkpoint's tokenizer files, copied into exports
    read_from: tuple[Path, ...] = ()  # every file it was read from (tokenizer_files.READ_FILES): what counts key on
    new_tokens: tuple[str, ...] = ()  # added by the recipe (with_tokens), not in the files: exports add them
    split_special_tokens: bool = False  # special tokens literal in user text (split_special): exports say so too
    # the checkpoint's additional_special_tokens as ids, in order (tokenizer_files.additional_special_ids): where
    # LLaMA-Factory's PPO also stops its rollouts (Template.ppo_stop_ids); nothing else reads them
    additional_special_ids: tuple[int, ...] = ()
    # tokenizer_config.json's clean_up_tokenization_spaces (absent: false, as transformers 4.57 reads it): whether
    # transformers 4's decode removes the spaces before punctuation (clean_up_tokenization); only the texts a reward
    # server is sent follow it (decode_transformers4), as LLaMA-Factory's PPO on transformers 4 sends them
    clean_up_tokenization_spaces: bool = False
    _ids: dict[str, int] = field(default_factory=dict, repr=False)
    # with_tokens' results by their tokens: the build, the model, the skeleton and the export each ask for the
    # recipe's tokenizer, and a new tiktoken Encoding of a 128k vocabulary costs ~0.1 s each time (init=False: a
    # derived tokenizer starts with its own)
    _derived: dict[tuple[tuple[str, ...], ...], "Tokenizer"] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_ids", dict(self.encoding.added_token_ids))
        object.__setattr__(self, "stop_ids", tuple(dict.fromkeys((self.eos_id, *self.stop_ids))))

    @property
    def n_vocab(self) -> int:
        """Ids run 0..n_vocab-1 (a model's embedding may be larger: Qwen pads to 151,936)."""
        return self.encoding.n_vocab

    @property
    def prepend_scheme(self) -> str | None:
        """How a text encoded on its own gets a prefix "▁" (a sentencepiece Metaspace's "first" / "always" /
        "never": Encoding.prepend_scheme); None for byte-level BPE, where a space is a token of its own."""
        return self.encoding.prepend_scheme

    @property
    def eos_text(self) -> str:
        return self.decode([self.eos_id])

    def _prepare(self, text: str) -> str:
        if self.nfc and not unicodedata.is_normalized("NFC", text):
            return unicodedata.normalize("NFC", text)
        return text

    def encode(self, text: str) -> list[int]:
        """User text: markup-token strings stay literal; the other added tokens are recognised. A template's Continued
        text is encoded as the rest of its string (pipeline.data.hf_encoding.Continued; only a sentencepiece
        Metaspace encodes it otherwise)."""
        return self.encoding.encode(self._prepare(text), allowed_special=self.added,
                                    continued=isinstance(text, Continued))

    def encode_batch(self, texts: Sequence[str], done: Callable[[int], None] | None = None) -> list[list[int]]:
        """encode() for many texts, in chunks on several threads (tiktoken releases the GIL). `done`: told the
        characters of each text (one thread) or chunk (several) once encoded, for a progress bar."""
        threads = min(8, os.cpu_count() or 1)
        size = len(texts) if len(texts) < BATCH_MIN or threads < 2 else CHUNK
        tell = done or (lambda _: None)

        def work(chunk: Sequence[str]) -> list[list[int]]:
            encoded = [self.encode(t) for t in chunk]
            tell(sum(map(len, chunk)))
            return encoded

        if size == len(texts):
            return [ids for t in texts for ids in work([t])]
        with ThreadPoolExecutor(threads) as pool:
            parts = pool.map(work, [texts[i:i + size] for i in range(0, len(texts), size)])  # in order
            return list(chain.from_iterable(parts))

    def encode_special(self, text: str) -> list[int]:
        """Template markup: every special token of the vocabulary is recognised."""
        return self.encoding.encode(self._prepare(text), allowed_special="all")

    def has_token(self, token: str) -> bool:
        return token in self._ids

    @property
    def kept_literal(self) -> frozenset[str]:
        """The added tokens that user text keeps literal (split into BPE pieces): the markup, and with
        split_special_tokens every special token (split_special)."""
        return frozenset(self._ids) - self.added

    @property
    def cache_key(self) -> tuple:
        """What the encodings of user text depend on besides the files (`name`): the recipe's new tokens and which
        added tokens are recognised (split_special_tokens), for the per-process caches of tokenized splits."""
        return self.name, self.new_tokens, self.added

    def split_special(self) -> Tokenizer:
        """This tokenizer as transformers' split_special_tokens=True reads user text (LLaMA-Factory's
        split_special_tokens): every special token, the checkpoint's and the recipe's, stays literal text; the added
        tokens that are not special (Qwen3's <think>, add_tokens' ones) stay one token, as the fast tokenizer's
        encode_special_tokens skips only the special ones. Template markup is placed as before (encode_special)."""
        key = ((), (), ("split_special_tokens",))
        if key not in self._derived:
            self._derived[key] = dataclasses.replace(self, added=self.added - self.special, split_special_tokens=True)
        return self._derived[key]

    def token_id(self, token: str) -> int:
        """The id of a special (or added) token; UserError naming the tokenizer when it has none."""
        try:
            return self._ids[token]
        except KeyError:
            raise UserError(f"{self.name}: the tokenizer has no token {token!r}") from None

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """skip_special: without the special tokens, as transformers' skip_special_tokens (an answer's stray
        <|im_start|>); added tokens that are not special (Qwen3's <think>) stay, as there.

        Ids without a token (a model's rows past n_vocab: Qwen's spare rows, the padding to a multiple of 64 that
        added tokens grow) decode to nothing, as transformers' decode drops them: a model can generate them, and
        tiktoken would raise a KeyError mid-eval."""
        drop = {self._ids[token] for token in self.special if token in self._ids} if skip_special else set()
        return self.encoding.decode([i for i in ids if i not in drop and 0 <= i < self.n_vocab])

    def decode_transformers4(self, ids: Iterable[int]) -> str:
        """decode(ids) with the special tokens kept, then clean_up_tokenization where the checkpoint's
        clean_up_tokenization_spaces says so: the text transformers 4.57's decode / batch_decode gives
        (tokenization_utils_fast.py:684-693), which LLaMA-Factory 0.9.5's PPO posts to a reward server (its PPO
        needs TRL 0.8.6-0.9.6, released for transformers 4). transformers 5 skips that step for byte-level BPE
        tokenizers, and decode() follows transformers 5: eval, chat and generate keep it. Meta's Llama 3 files set
        the flag (the text loses the spaces before punctuation: "is n't ." -> "isn't."); Qwen2.5's do not."""
        text = self.decode(ids)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def token_bytes(self, token: int) -> bytes:
        return self.encoding.decode_single_token_bytes(token)

    def present(self, token: str) -> bool:
        """Whether `token` already has an id: a special / added token, or one BPE token of the vocabulary."""
        return token in self._ids or self.encoding.in_vocabulary(token)

    def with_special_tokens(self, tokens: Sequence[str]) -> Tokenizer:
        """This tokenizer with `tokens` added as special tokens (with_tokens)."""
        return self.with_tokens((), tokens)

    def with_tokens(self, plain: Sequence[str], special: Sequence[str]) -> Tokenizer:
        """This tokenizer with a recipe's tokens added, new ids from n_vocab up, as LLaMA-Factory adds them with
        transformers: add_tokens(plain, special_tokens=False) first (the recipe's add_tokens), then add_tokens(special,
        special_tokens=True) (new_special_tokens and its other spellings: pipeline.data.added_tokens), each in order.

        Unlike the checkpoint's own specials, which stay literal in user text, every new token is recognised in
        any text (`added`), as the Hugging Face tokenizer matches every added token: a "<think>" in the training
        data is the new id. decode(skip_special=True) drops the special ones and keeps the plain ones, as
        skip_special_tokens does. Tokens already present (`present`) keep their ids (the recipe's notice says so);
        a special token of the checkpoint named here is recognised in any text from now on, as transformers does
        with every added token: a recipe that starts from a run's merged/ (whose files hold the tokens) and names
        the same tokens encodes its data as the first run did."""
        key = (tuple(dict.fromkeys(plain)), tuple(dict.fromkeys(special)))
        if key not in self._derived:
            self._derived[key] = self._with_tokens(*key)
        return self._derived[key]

    def _with_tokens(self, plain: tuple[str, ...], special: tuple[str, ...]) -> Tokenizer:
        named = tuple(dict.fromkeys((*plain, *special)))  # a name in both: added once, plain (added first there)
        new = [t for t in named if not self.present(t)]
        known = {t for t in named if t in self._ids} - self.added
        if not new and not known:
            return self
        encoding = self.encoding.with_added([(t, t not in plain) for t in new]) if new else self.encoding
        return dataclasses.replace(self, encoding=encoding, special=self.special | {t for t in new if t not in plain},
                                   added=self.added | set(new) | known, new_tokens=self.new_tokens + tuple(new))


def clean_up_tokenization(text: str) -> str:
    """transformers 4.57's PreTrainedTokenizerBase.clean_up_tokenization (tokenization_utils_base.py:3971-3994),
    re-typed: English tokenization artifacts undone, each replacement in its order over the whole text."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))


def new_token_names(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """add_tokens / new_special_tokens as LLaMA-Factory reads them: a comma-separated string (or a list), each name
    stripped.
    An empty name stays "" here: the recipe's check (pipeline.recipe.rules) reports it."""
    if value is None:
        return ()
    names = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    return tuple(name.strip() for name in names)


# ---------------------------------------------------------------- GPT-2

def ranks_path() -> Path:
    return Path(os.environ.get("PIPELINE_GPT2_RANKS", REPO_ROOT / ".cache" / "gpt2.tiktoken"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def gpt2_encoding() -> TiktokenEncoding:
    """GPT-2's encoding: from the offline ranks file when present, else tiktoken's download."""
    path = ranks_path()
    if path.is_file():
        from tiktoken.load import load_tiktoken_bpe

        ranks = load_tiktoken_bpe(str(path), expected_hash=RANKS_SHA256)
        return TiktokenEncoding(tiktoken.Encoding(name="gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                                  special_tokens={GPT2_EOS: len(ranks)},
                                                  explicit_n_vocab=len(ranks) + 1))
    return TiktokenEncoding(tiktoken.get_encoding("gpt2"))


@functools.lru_cache(maxsize=1)
def gpt2() -> Tokenizer:
    """GPT-2's tokenizer (gpt2_encoding): <|endoftext|> is its EOS, pad, BOS and stop."""
    encoding = gpt2_encoding()
    eos = encoding.tiktoken.eot_token
    return Tokenizer(encoding, "gpt2", eos_id=eos, pad_id=eos, bos_id=eos, stop_ids=(eos,),
                     special=frozenset({GPT2_EOS}))


def install(dest: Path | None = None) -> Path:
    """Fetch the ranks from PyPI (openai-whisper sdist), verify sha256, place them atomically. Idempotent."""
    dest = dest or ranks_path()
    if dest.is_file() and _sha256(dest) == RANKS_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", WHISPER_SDIST, "-d", tmp],
            check=True,
        )
        (sdist,) = Path(tmp).glob("openai_whisper-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
        if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
            raise SystemExit(f"gpt2.tiktoken from {WHISPER_SDIST} has an unexpected sha256; refusing to install it")
        tmp_dest = dest.with_suffix(".tmp")
        tmp_dest.write_bytes(data)
        os.replace(tmp_dest, dest)
    return dest


if __name__ == "__main__":
    where = install()
    tok = gpt2()
    ids = tok.encode_special("Hello, do you like tea? <|endoftext|> In the sunlit terraces")
    assert ids[:9] == [15496, 11, 466, 345, 588, 8887, 30, 220, tok.eos_id], ids
    print(f"GPT-2 tokenizer ready (offline ranks at {where}, sha256 verified)")
