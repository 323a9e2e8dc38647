"""A checkpoint's tokenizer files -> a Tokenizer, or one exit-2 message saying why not.

Read, in this order of preference:
- tokenizer.json (Hugging Face `tokenizers`): a byte-level BPE whose merge order follows the token ids (what
  tiktoken's ranks are: GPT-2, Llama 3, Qwen2/2.5/3) runs on tiktoken, with the pre-tokenizer regex and an NFC
  normaliser taken from the file; a sentencepiece-style BPE (byte_fallback: Llama 2, Mistral) runs on `tokenizers`
  as transformers loads it (pipeline.data.hf_encoding), for the tokenizer classes it reproduces
  (SENTENCEPIECE_CLASSES); other sentencepiece models (Unigram, Metaspace without byte fallback) are refused.
- vocab.json + merges.txt (GPT-2's slow-tokenizer files, as our merged/ exports write them).
- original/tokenizer.model in Meta's tiktoken format (base64 token, rank per line).
- no tokenizer file at all, in a GPT-2 checkpoint (config.json model_type gpt2, or our own format):
  GPT-2's ranks (never in a folder without config.json).
Special tokens come from tokenizer.json's added_tokens and tokenizer_config.json's added_tokens_decoder;
BOS / EOS / pad from tokenizer_config.json (else special_tokens_map.json), the stop ids from
generation_config.json's eos_token_id (an id or a list), with config.json as the last fallback;
clean_up_tokenization_spaces from tokenizer_config.json (the text stage ppo sends a reward server).
"""
from __future__ import annotations

import base64
import functools
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tiktoken

from pipeline.data.encoding import Encoding, TiktokenEncoding
from pipeline.data.hf_encoding import GEMMA_CLASSES, LLAMA_CLASSES, HFEncoding, is_sentencepiece_bpe
from pipeline.data.tokenizer import GPT2_PATTERN, Tokenizer, gpt2
from pipeline.errors import UserError
from pipeline.io import write_json

# Meta's pattern for Llama 3 (llama_models/llama3/tokenizer.py), used for original/tokenizer.model.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# What a checkpoint's tokenizer is made of; all of it travels into merged/, model/ and export_dir, so that
# transformers loads the same tokenizer from there. transformers 4.43+ writes the chat template to a file of its
# own (chat_template.jinja; chat_template.json for processors) rather than into tokenizer_config.json, and reads it
# from there first; an export that writes the recipe's template leaves them out (pipeline.merge).
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", *CHAT_TEMPLATE_FILES)
# Every file a tokenizer may be read from (read_tokenizer): the tokenizer files, the stop ids' generation_config.json
# and config.json, and a tiktoken tokenizer.model (Meta's original/ or top-level). What the per-process cache and the
# counts kept beside a build (pipeline.data.counts) watch, where TOKENIZER_FILES is only what exports copy.
READ_FILES = (*TOKENIZER_FILES, "generation_config.json", "config.json", "original/tokenizer.model", "tokenizer.model")
SUPPORTED = ("byte-level BPE tokenizers (GPT-2, Llama 3.x, Qwen2 / Qwen2.5 / Qwen3) and sentencepiece-style BPE "
             "tokenizer.json files with byte_fallback (Llama 2, Mistral)")
# The tokenizer classes transformers runs a sentencepiece-style tokenizer.json with that hf_encoding reproduces.
SENTENCEPIECE_CLASSES = (*LLAMA_CLASSES, "PreTrainedTokenizerFast", "TokenizersBackend", *GEMMA_CLASSES)
SUPPORTED_SENTENCEPIECE = f"tokenizer_class {' / '.join(SENTENCEPIECE_CLASSES)} (Llama 2, Mistral, Gemma) or none"
# The fix a refused tokenizer_class's message names where the general one (set LlamaTokenizerFast or
# PreTrainedTokenizerFast) needs more: transformers 5.24's CodeLlamaTokenizer (tokenization_code_llama.py) is the
# LlamaTokenizer rebuild with legacy ignored (Metaspace prepend_scheme "first") plus infilling - <FILL_ME> and
# ▁<PRE> / ▁<SUF> / ▁<MID> / ▁<EOT> as special tokens, and a text holding <FILL_ME> encoded as an infilling prompt -
# which this pipeline does not reproduce (tests/vocab/test_tokenizer_refusals.py measures the edit it names)
CODE_LLAMA_FIX = ("CodeLlamaTokenizer is LlamaTokenizer with legacy false plus infilling (a text holding <FILL_ME> "
                  "becomes an infilling prompt: ▁<PRE> ... ▁<SUF> ... ▁<MID>), which this pipeline does not train; to "
                  "fine-tune on data without <FILL_ME>, set tokenizer_class in that file to LlamaTokenizerFast and "
                  "legacy to false: transformers and this pipeline then read text as CodeLlamaTokenizer does (compare "
                  "AutoTokenizer's ids on your text before and after the edit)")
CLASS_FIXES = {"CodeLlamaTokenizer": CODE_LLAMA_FIX, "CodeLlamaTokenizerFast": CODE_LLAMA_FIX}
# What stays literal in user text (markup_tokens), in the words of the messages about it.
MARKUP_WORDS = "EOS, BOS, pad, the stop tokens and the templates' markup such as <|im_end|> and <|eot_id|>"


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


@functools.lru_cache(maxsize=None)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _unicode_to_byte_chars() -> dict[str, str]:
    """The inverse map as a str.translate table source: printable char -> the latin-1 char of its byte; the
    latin-1 chars that are not byte-level text (space, controls) -> a char latin-1 cannot encode."""
    table = {chr(b): "\uffff" for b in range(256)}
    table.update({c: chr(b) for c, b in _unicode_to_byte().items()})
    return table


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable as JSON ({err})") from None


def optional_json(path: Path) -> dict[str, Any]:
    """A JSON object file's content, {} when the file is absent; UserError when it is not a JSON object."""
    if not path.is_file():
        return {}
    data = _json(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _stamp(directory: Path) -> tuple:
    """What the cache key watches: the tokenizer files' sizes and mtimes."""
    return tuple((n, p.stat().st_mtime_ns, p.stat().st_size) for n in READ_FILES if (p := directory / n).is_file())


def read_tokenizer(directory: str | Path) -> Tokenizer:
    """The Tokenizer of a checkpoint directory (cached per directory and file stamps)."""
    directory = Path(directory).resolve()
    return _read(directory, _stamp(directory))


def tokenizer_file(directory: str | Path) -> Path | None:
    """The file a checkpoint directory's tokenizer is read from, in the order read_tokenizer tries them
    (tokenizer.json, vocab.json with merges.txt, original/tokenizer.model, tokenizer.model); None when it holds none
    (a GPT-2 checkpoint saved without them reads as GPT-2's)."""
    directory = Path(directory)
    sources = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("original/tokenizer.model",), ("tokenizer.model",))
    return next((directory / names[0] for names in sources if all((directory / n).is_file() for n in names)), None)


@functools.lru_cache(maxsize=8)
def _read(directory: Path, _stamp: tuple) -> Tokenizer:
    source = tokenizer_file(directory)
    if source is not None and source.name == "tokenizer.json":
        return _from_tokenizer_json(directory)
    if source is not None and source.name == "vocab.json":
        return _from_vocab_merges(directory)
    if source is not None:
        return _from_tiktoken_model(source, directory)
    config = optional_json(directory / "config.json")
    # HF GPT-2 checkpoints saved without tokenizer files, and our own GPT-2 checkpoints. A folder without
    # config.json is no checkpoint (an empty folder, the hub cache's models--Org--Name): reading it as GPT-2
    # added a wrong template message beside the model's own
    if config and config.get("model_type", "gpt2") == "gpt2" and config.get("family", "gpt2") == "gpt2":
        return gpt2()
    raise UserError(f"{directory}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt, or "
                    "original/tokenizer.model); copy the checkpoint's tokenizer files next to its config.json "
                    "(`hf download ORG/NAME tokenizer.json tokenizer_config.json "
                    "generation_config.json --local-dir DIR`)")


# ---------------------------------------------------------------- tokenizer.json

def _pattern(pre: Any, path: Path) -> str:
    """The split regex of a byte-level pre-tokenizer (GPT-2's when ByteLevel splits itself)."""
    where = f"{path}: pre_tokenizer"
    if not isinstance(pre, dict):
        raise UserError(f"{where} is {pre!r}; expected ByteLevel or Sequence[Split, ByteLevel] ({SUPPORTED})")
    kind = pre.get("type")
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise UserError(f"{where}: ByteLevel add_prefix_space=true is not supported ({SUPPORTED})")
        if not pre.get("use_regex", True):
            raise UserError(f"{where}: ByteLevel without a split regex is not supported ({SUPPORTED})")
        return GPT2_PATTERN
    if kind == "Sequence":
        steps = pre.get("pretokenizers") or []
        if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
                and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")):
            split = steps[0]
            regex = (split.get("pattern") or {}).get("Regex")
            if regex and split.get("behavior") == "Isolated" and not split.get("invert"):
                return regex
        raise UserError(f"{where}: Sequence {[s.get('type') for s in steps]} is not the byte-level form "
                        f"Sequence[Split(Regex, Isolated), ByteLevel(use_regex=false)] ({SUPPORTED})")
    if kind == "Metaspace":
        raise UserError(f"{path}: a sentencepiece tokenizer (pre_tokenizer Metaspace) is not supported; "
                        f"supported: {SUPPORTED}")
    raise UserError(f"{where}: type {kind!r} is not supported ({SUPPORTED})")


def _nfc(normalizer: Any, path: Path) -> bool:
    if normalizer is None:
        return False
    if isinstance(normalizer, dict) and normalizer.get("type") == "NFC":
        return True
    kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
    hint = " (a sentencepiece tokenizer)" if kind in ("Replace", "Prepend", "Sequence") else ""
    raise UserError(f"{path}: normalizer {kind!r}{hint} is not supported; only none or NFC ({SUPPORTED})")


def _ranks(vocab: Mapping[str, int], merges: Sequence[Any], path: Path, skip: set[str]) -> dict[bytes, int]:
    """tiktoken ranks from a byte-level BPE vocab, checking that merge order follows the ids (ranks = ids).

    tiktoken merges the adjacent pair whose union has the lowest rank; a Hugging Face BPE merges the pair
    listed first. The two agree when the merges are listed in the order of their results' ids, as in the
    files converted from tiktoken ranks (Llama 3, Qwen) and GPT-2's.
    """
    table = str.maketrans(_unicode_to_byte_chars())
    ranks: dict[bytes, int] = {}
    try:
        for token, index in vocab.items():
            if token not in skip:
                ranks[token.translate(table).encode("latin-1")] = int(index)
    except UnicodeEncodeError:
        bad = next(t for t in vocab if any(c not in _unicode_to_byte() for c in t))
        raise UserError(f"{path}: vocab token {bad!r} is not byte-level BPE text; supported: {SUPPORTED}") from None
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise UserError(f"{path}: the vocabulary lacks {len(missing)} of the 256 single bytes; not a byte-level BPE "
                        f"({SUPPORTED})")
    get = vocab.get
    results = [get(m.replace(" ", "", 1)) if isinstance(m, str) else get(m[0] + m[1]) for m in merges]
    order = np.array([-1 if r is None else r for r in results], dtype=np.int64)
    bad = np.flatnonzero((order < 0) | (np.diff(order, prepend=0) < 0))
    if len(bad):
        k = int(bad[0])
        raise UserError(f"{path}: merge {k + 1} ({merges[k]!r}) does not follow the token ids, so the ranks are not "
                        f"tiktoken ranks; supported: {SUPPORTED}")
    return ranks


def _from_tokenizer_json(directory: Path) -> Tokenizer:
    path = directory / "tokenizer.json"
    data = _json(path)
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict):
        raise UserError(f"{path}: no 'model' object; not a Hugging Face tokenizer.json")
    if is_sentencepiece_bpe(data):
        return _from_sentencepiece_json(directory)
    kind = model.get("type")
    if kind != "BPE":
        what = " (sentencepiece)" if kind == "Unigram" else ""
        raise UserError(f"{path}: model.type {kind!r}{what} is not supported; supported: {SUPPORTED}")
    pattern = _pattern(data.get("pre_tokenizer"), path)
    nfc = _nfc(data.get("normalizer"), path)
    added = {t["content"]: (int(t["id"]), bool(t.get("special"))) for t in data.get("added_tokens") or []}
    ranks = _ranks(model.get("vocab") or {}, model.get("merges") or [], path, set(added))
    return _assemble(directory, path, pattern, ranks, added, nfc)


def _from_sentencepiece_json(directory: Path) -> Tokenizer:
    """A sentencepiece-style BPE (byte_fallback: Llama 2, Mistral) run by Hugging Face `tokenizers`, as transformers
    loads it (pipeline.data.hf_encoding)."""
    path = directory / "tokenizer.json"
    config = optional_json(directory / "tokenizer_config.json")
    named = config.get("tokenizer_class")
    if named not in (None, *SENTENCEPIECE_CLASSES):
        # the two classes the fix names give AutoTokenizer's ids here (tests/vocab: test_tokenizer_refusals.py,
        # test_sentencepiece_tokenizers.py)
        fix = CLASS_FIXES.get(named) or (
            "to train it, set tokenizer_class in that file to LlamaTokenizerFast if it is a Llama 2 / Mistral tokenizer "
            "(transformers then rebuilds it as LlamaTokenizer, as this pipeline does), or to PreTrainedTokenizerFast to "
            f"run tokenizer.json as written; transformers and this pipeline then read it alike, perhaps not as {named} "
            "did: compare AutoTokenizer's ids on your text before and after the edit")
        raise UserError(f"{directory / 'tokenizer_config.json'}: tokenizer_class {named!r} with a sentencepiece-style "
                        f"tokenizer.json is not supported (transformers rebuilds it its own way); supported: "
                        f"{SUPPORTED_SENTENCEPIECE}; {fix}")
    try:
        encoding = HFEncoding.from_file(path, config)
    except Exception as err:  # tokenizers raises its own Exception subclass on a file it cannot read
        raise UserError(f"{path}: not readable by the tokenizers library {_tokenizers_version()} ({err}); the file is "
                        "damaged (a cut-off download, an edit) or not one this version reads: copy "
                        "tokenizer.json again from the checkpoint it came from (`hf download ORG/NAME tokenizer.json "
                        f"--local-dir {directory}`)") from None
    extra = decoder_only_tokens(config, encoding.added_tokens)
    if extra:
        encoding = encoding.with_config_tokens(extra)
    return _special_tokens(directory, path, encoding, encoding.added_tokens, False, encoding.vocabulary_id)


def _tokenizers_version() -> str:
    """The installed tokenizers' version, for a message (its import is lazy: byte-level commands do without)."""
    import tokenizers

    return tokenizers.__version__


def decoder_only_tokens(config: Mapping[str, Any], listed: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The entries of tokenizer_config.json's added_tokens_decoder whose token tokenizer.json's added_tokens
    (`listed`) lacks, in id order: transformers adds them on loading, after the file's own tokens
    (tokenization_utils_tokenizers.py:478-513, transformers 5.24: each decoder entry not among the backend's added
    tokens, one add_tokens call in id order)."""
    entries = sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda item: int(item[0]))
    return [entry for _, entry in entries
            if isinstance(entry, dict) and isinstance(entry.get("content"), str) and entry["content"] not in listed]


def _from_vocab_merges(directory: Path) -> Tokenizer:
    vocab = _json(directory / "vocab.json")
    lines = (directory / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [line for line in lines if line and not line.startswith("#version")]
    config = optional_json(directory / "tokenizer_config.json")
    named = {_content(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")} - {None}
    added = {tok: (vocab[tok], True) for tok in named if tok in vocab}
    ranks = _ranks(vocab, merges, directory / "vocab.json", set(added))
    return _assemble(directory, directory / "vocab.json", GPT2_PATTERN, ranks, added, False)


def _from_tiktoken_model(path: Path, directory: Path) -> Tokenizer:
    """Meta's tokenizer.model: `base64 rank` lines; the 256 specials follow the ranks (Llama 3's names)."""
    blob = path.read_bytes()
    ranks: dict[bytes, int] = {}
    try:
        for line in blob.splitlines():
            if line:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
    except (ValueError, TypeError):
        raise UserError(f"{path}: not a tiktoken BPE file (base64 token and rank per line); a sentencepiece "
                        f"tokenizer.model is not supported; copy the checkpoint's tokenizer.json next to it (Llama 2 "
                        f"and Mistral ship one); supported: {SUPPORTED}") from None
    n = len(ranks)
    added: dict[str, tuple[int, bool]] = {}
    config = optional_json(directory / "tokenizer_config.json")
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        added[entry["content"]] = (int(index), bool(entry.get("special", True)))
    defaults: dict[str, Any] = {}
    if not added:  # Meta's own tokenizer: its 256 specials, BOS, EOS and stop tokens (eom, eot)
        added = {name: (n + i, True) for i, name in enumerate(llama3_special_tokens())}
        defaults = {"bos": added["<|begin_of_text|>"][0], "eos": added["<|end_of_text|>"][0],
                    "stops": [added["<|eom_id|>"][0], added["<|eot_id|>"][0]]}
    return _assemble(directory, path, LLAMA3_PATTERN, ranks, added, False, defaults)


def llama3_special_tokens(count: int = 256) -> list[str]:
    """Meta's Llama 3.1+ special token names, in id order from 128000 (llama_models/llama3/tokenizer.py)."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    return named + [f"<|reserved_special_token_{3 + i}|>" for i in range(count - len(named))]


# ---------------------------------------------------------------- special tokens

def _content(value: Any) -> str | None:
    """A token as tokenizer_config.json writes it: a string, an AddedToken dict, or null."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _ids(path: Path, data: Mapping[str, Any], key: str) -> list[int]:
    """`key`'s token ids in a config file (one id or a list of them; absent: none)."""
    value = data.get(key)
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise UserError(f"{path}: {key} is {json.dumps(value)}; expected a token id (a whole number) or a list of "
                        "them, as transformers writes it")
    return list(values)


def _assemble(directory: Path, source: Path, pattern: str, ranks: dict[bytes, int],
              added: Mapping[str, tuple[int, bool]], nfc: bool, defaults: Mapping[str, Any] | None = None) -> Tokenizer:
    """The Tokenizer from ranks + added tokens, with BOS / EOS / pad / stops from the checkpoint's configs
    (`defaults` fill what no config file says: Meta's tokenizer.model alone)."""
    config = optional_json(directory / "tokenizer_config.json")
    added = dict(added)
    for index, entry in (config.get("added_tokens_decoder") or {}).items():
        added.setdefault(entry["content"], (int(index), bool(entry.get("special", True))))
    taken = set(ranks.values())
    clash = [t for t, (i, _) in added.items() if i in taken]
    if clash:
        raise UserError(f"{source}: added token {clash[0]!r} reuses id {added[clash[0]][0]}, which a BPE token has")
    try:
        encoding = TiktokenEncoding(tiktoken.Encoding(name=f"{source}", pat_str=pattern, mergeable_ranks=ranks,
                                                      special_tokens={t: i for t, (i, _) in added.items()}))
    except ValueError as err:
        raise UserError(f"{source}: not a consistent vocabulary for tiktoken ({err})") from None
    table = _unicode_to_byte()

    def vocabulary_id(name: str) -> int | None:  # a vocabulary token's rank, by its byte-level text
        return ranks.get(bytes(table[c] for c in name)) if all(c in table for c in name) else None
    return _special_tokens(directory, source, encoding, added, nfc, vocabulary_id, defaults)


def _special_tokens(directory: Path, source: Path, encoding: Encoding,
                    added: Mapping[str, tuple[int, bool]], nfc: bool, vocabulary_id: Callable[[str], int | None],
                    defaults: Mapping[str, Any] | None = None) -> Tokenizer:
    """The Tokenizer of `encoding`, with BOS / EOS / pad / stops from the checkpoint's configs (`defaults` fill
    what no config file says) and `added` (content -> (id, special)) the added tokens."""
    defaults = defaults or {}
    config_file = directory / "tokenizer_config.json"
    config = optional_json(config_file)
    name = f"{source}"
    ids = {t: i for t, (i, _) in added.items()}
    special_map = optional_json(directory / "special_tokens_map.json")
    generation = optional_json(directory / "generation_config.json")
    model_config = optional_json(directory / "config.json")

    def named(key: str) -> int | None:
        token = _content(config.get(key)) if key in config else _content(special_map.get(key))
        if token is None:
            return None
        if token not in ids:
            raise UserError(f"{config_file if key in config else directory / 'special_tokens_map.json'}: {key} "
                            f"{token!r} is not a special token of {source}")
        return ids[token]

    generation_file, model_file = directory / "generation_config.json", directory / "config.json"

    def config_ids(key: str) -> list[int]:
        """From generation_config.json, else config.json (transformers' own order)."""
        return _ids(generation_file, generation, key) or _ids(model_file, model_config, key)

    gen_eos = config_ids("eos_token_id") or defaults.get("stops", [])
    eos = named("eos_token")
    if eos is None:
        eos = defaults.get("eos")
    if eos is None:
        eos = gen_eos[0] if gen_eos else None
    if eos is None:
        raise UserError(f"{directory}: no end-of-text token: set eos_token in tokenizer_config.json or eos_token_id "
                        "in generation_config.json")
    bos = named("bos_token")
    if bos is None and not config_file.is_file():
        bos = next(iter(config_ids("bos_token_id")), defaults.get("bos"))
    pad = named("pad_token")
    if pad is None:
        pad = next(iter(config_ids("pad_token_id")), eos)
    files = tuple(p for n in (*TOKENIZER_FILES, "original/tokenizer.model") if (p := directory / n).is_file())
    markup = markup_tokens(ids, (eos, pad, bos, *gen_eos))
    return Tokenizer(encoding, name, eos_id=eos, pad_id=pad, bos_id=bos, stop_ids=tuple(gen_eos),
                     special=frozenset(t for t, (_, s) in added.items() if s),
                     added=frozenset(t for t in added if t not in markup), nfc=nfc, files=files,
                     read_from=tuple(p for n in READ_FILES if (p := directory / n).is_file()),
                     additional_special_ids=additional_special_ids(config, special_map, ids, vocabulary_id),
                     # transformers 4.57 reads the key's truth, false when absent (tokenization_utils_base.py:1453)
                     clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)))


def additional_special_ids(config: Mapping[str, Any], special_map: Mapping[str, Any], ids: Mapping[str, int],
                           vocabulary_id: Callable[[str], int | None]) -> tuple[int, ...]:
    """The checkpoint's additional_special_tokens as transformers 4.57 reads them, as ids: tokenizer_config.json's
    list, and only where that file has no added_tokens_decoder (the legacy branch) special_tokens_map.json's
    tokens it lacks appended (transformers/tokenization_utils_base.py:2262-2297); each name an added token's id, or
    a vocabulary token's rank (its byte-level text, as tokenizer.json spells it: transformers gives it that id).
    A name the vocabulary lacks is left out: transformers would add it as a new id past the model's rows, which the
    model never samples. Only stage ppo reads them (Template.ppo_stop_ids: LLaMA-Factory stops its rollouts there)."""
    names = [_content(t) for t in config.get("additional_special_tokens") or []]
    if "added_tokens_decoder" not in config:
        names += [n for t in special_map.get("additional_special_tokens") or [] if (n := _content(t)) not in names]

    def token_id(name: str) -> int | None:
        return ids[name] if name in ids else vocabulary_id(name)
    return tuple(dict.fromkeys(i for n in names if n and (i := token_id(n)) is not None))


def markup_tokens(ids: Mapping[str, int], control: Sequence[int | None]) -> frozenset[str]:
    """The added tokens that stay literal in user text: EOS, pad, BOS and the stop tokens (`control` ids), and the
    markup of the templates (<|im_start|>, <|eot_id|>, ...). Every other added token, special or not, is one
    token in any text, as transformers reads tokenizer.json's added_tokens: Qwen3's <think>, and the tokens a
    run added with add_special_tokens, which its merged/ lists (a recipe on merged/ need not name them again)."""
    from pipeline.data.templates import TEMPLATE_MARKUP

    return frozenset(t for t, i in ids.items() if i in control or t in TEMPLATE_MARKUP)


# ---------------------------------------------------------------- tokens a recipe adds

def write_new_tokens(directory: Path, tokenizer: Tokenizer) -> None:
    """The tokenizer files copied into `directory` (an export) given the tokens the recipe adds, as transformers'
    save_pretrained writes tokens that add_tokens added: an entry in tokenizer.json's added_tokens and in
    tokenizer_config.json's added_tokens_decoder, each with its id; a special one (add_tokens(...,
    special_tokens=True)) not normalized, a plain one (special_tokens=False) normalized. Then AutoTokenizer on the
    export encodes them to the ids training used."""
    if not tokenizer.new_tokens:
        return
    entries = {token: {"id": tokenizer.token_id(token), "content": token, "single_word": False, "lstrip": False,
                       "rstrip": False, "normalized": token not in tokenizer.special,
                       "special": token in tokenizer.special} for token in tokenizer.new_tokens}
    path = directory / "tokenizer.json"
    listed: list[dict[str, Any]] = []
    if path.is_file():
        data = _json(path)
        known = {entry.get("content") for entry in data.get("added_tokens") or []}
        data["added_tokens"] = [*(data.get("added_tokens") or []), *(e for t, e in entries.items() if t not in known)]
        listed = data["added_tokens"]
        write_json(path, data)
    path = directory / "tokenizer_config.json"
    config = optional_json(path)
    # every added token, in id order, as save_pretrained writes them: transformers 5 numbers the decoder's tokens
    # before tokenizer.json's, so a decoder with only the new ones would move them onto the checkpoint's ids
    decoder = {str(e["id"]): {k: v for k, v in e.items() if k != "id"} for e in [*listed, *entries.values()]}
    decoder.update(config.get("added_tokens_decoder") or {})
    decoder = dict(sorted(decoder.items(), key=lambda item: int(item[0])))
    write_json(path, {**config, "added_tokens_decoder": decoder})


# ---------------------------------------------------------------- split_special_tokens

SPLIT_KEY = "split_special_tokens"  # tokenizer_config.json's key, as transformers' save_pretrained writes it


def saved_split_special_tokens(directory: Path) -> bool | None:
    """What `directory`'s tokenizer_config.json says split_special_tokens is, as transformers reads it into the
    tokenizer it loads from there: an export of a run with the key, or a tokenizer that was loaded with
    split_special_tokens=True and saved (LLaMA-Factory's exports); None where the file or the key is absent, or the
    value is no true / false."""
    value = optional_json(directory / "tokenizer_config.json").get(SPLIT_KEY)
    return value if isinstance(value, bool) else None


def write_split_special_tokens(directory: Path, tokenizer: Tokenizer) -> None:
    """The tokenizer_config.json copied into `directory` (an export) with the recipe's split_special_tokens, as
    save_pretrained writes a tokenizer loaded with that keyword: so that AutoTokenizer on the export reads typed
    special tokens as training did (without it, transformers' default false makes each one token). Written where it
    is true, or where the copied file has the key (a base whose true the recipe turned off); a file that never said
    it stays as it was."""
    path = directory / "tokenizer_config.json"
    config = optional_json(path)
    if tokenizer.split_special_tokens or SPLIT_KEY in config:
        write_json(path, {**config, SPLIT_KEY: tokenizer.split_special_tokens})


def write_recipe_settings(directory: Path, tokenizer: Tokenizer) -> None:
    """What the recipe changed in the tokenizer files copied into `directory` (an export): its new tokens
    (write_new_tokens) and split_special_tokens (write_split_special_tokens)."""
    write_new_tokens(directory, tokenizer)
    write_split_special_tokens(directory, tokenizer)
