"""Tokens and loss masks for sft, the over-length policy, and token streams for pt.

An example is its template segments tokenized one by one (prompt, response, prompt, response, ...;
each piece on its own, as the prompt is tokenized at inference); the template places its markup tokens
and EOS by id (templates.py), the model's tokenizer encodes the text (tokenizer.py). `trainable[i]` says whether token i is a training target; the loaders shift it so that
position t predicts token t+1. Over-length examples (more than cutoff_len tokens) follow
`overlength_policy`: drop (counted), truncate (the response side is cut; counted; an example with no
trainable token left is dropped instead, counted apart) or error (every one named).

Whole splits are encoded in one batch (tiktoken, threads) into flat numpy arrays and cached per
process, so train, eval and inspect tokenize a split once. pt documents are joined by pt_separator (the
checkpoint's EOS, as LLaMA-Factory picks it).
"""
from __future__ import annotations

import os
import sys
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import numpy as np

from pipeline.data.args import DataArgs
from pipeline.data.origins import Origin, as_origin
from pipeline.data.problems import Problems, alike, line_order
from pipeline.data.templates import EOS, Piece, Template, get_template
from pipeline.data.model_tokenizer import recipe_tokenizer
from pipeline.launched import first_rank
from pipeline.data.encoding import MAX_RUN
from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import UserError
from pipeline.rerun import run_this

IGNORE = -100
POLICIES = ("drop", "truncate", "error")
OVER = "over cutoff_len"
NO_ROOM = "prompt fills cutoff_len"
_CACHE_SIZE = 6
_cache: OrderedDict[tuple, Any] = OrderedDict()


PROGRESS_MIN_ROWS = 50_000
PROGRESS_MIN_CHARS = 10_000_000  # pt text: about a second of tokenizing on one core (50 MB took 5 s on two)
ROW_CHUNK = 16384  # rows tokenized at a time: bounds the memory of Python int lists


def _progress(total: int, desc: str, unit: str = "row", minimum: int = PROGRESS_MIN_ROWS) -> Any:
    """A tqdm bar (with its ETA) for long tokenizations, of `total` rows or characters (`unit`): rank 0 only, stderr,
    only on a terminal (tqdm's disable=None), and only from `minimum` on."""
    from tqdm import tqdm

    show = total >= minimum and first_rank()
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=unit != "row", file=sys.stderr,
                disable=None if show else True)


class Encoded(NamedTuple):
    """One kept example. labels[i] = input_ids[i] where token i is trained, else -100 (not yet shifted)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class Dropped(NamedTuple):
    """An example the length policy removed."""

    reason: str
    length: int


@dataclass
class TokenizedSplit:
    """Kept examples back to back: example i is ids[offsets[i]:offsets[i+1]]."""

    ids: np.ndarray  # int32
    trainable: np.ndarray  # bool, aligned with ids
    offsets: np.ndarray  # int64, n + 1
    origins: list[Origin]  # of each kept example: the raw file and line (or row) it was built from
    lengths: np.ndarray  # tokens of every row before the policy (for the histogram)
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    truncated_rows: list[Origin] = field(default_factory=list)  # origins, for reports
    dropped_rows: list[Origin] = field(default_factory=list)
    is_truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # per kept example
    # each token's label where it is trained, aligned with ids, where some label is not its token (efficient_eos
    # templates: the EOS on a prompt's first token); None: every label is its token
    targets: np.ndarray | None = None

    @property
    def label_ids(self) -> np.ndarray:
        """What a trained token's label is: targets, else the ids."""
        return self.ids if self.targets is None else self.targets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def example_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> Encoded:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b]
        labels = np.where(self.trainable[a:b], self.label_ids[a:b], IGNORE)
        return Encoded(ids.tolist(), labels.tolist(), bool(self.is_truncated[i]))


def _as_template(template: Template | str, tokenizer: Tokenizer) -> Template:
    """The template as this vocabulary writes it (Template.for_vocabulary: its optional markup by id or as text)."""
    return (get_template(template) if isinstance(template, str) else template).for_vocabulary(tokenizer)


def _plan(pieces: Sequence[Piece], ids: Mapping[str, int | None], texts: list[str]) -> list[int]:
    """A segment as a list of ints: i >= 0 is texts[i] (appended here), -1 - t is the fixed token t."""
    plan = []
    for piece in pieces:
        if isinstance(piece, str):
            plan.append(len(texts))
            texts.append(piece)
        elif (token := ids[piece.token]) is not None:  # a template's BOS is left out when the model has none
            plan.append(-1 - token)
    return plan


def _assemble(plan: list[int], tokens: list[list[int]]) -> list[int]:
    if len(plan) == 1 and plan[0] >= 0:
        return tokens[plan[0]]
    out: list[int] = []
    for step in plan:
        if step >= 0:
            out.extend(tokens[step])
        else:
            out.append(-1 - step)
    return out


# by the encoding object, held weakly: keyed by id(), a freed encoding's number could be a new one's, which then
# inherited the old one's longest token
_MAX_TOKEN_BYTES: weakref.WeakKeyDictionary[Any, int] = weakref.WeakKeyDictionary()


def encode_cap(tokenizer: Tokenizer, cutoff_len: int) -> int:
    """Characters of one text beyond which only a prefix needs encoding.

    Every token is at most B bytes and every character at least one byte, so the first (cutoff_len + 1) * B
    characters hold more than cutoff_len tokens: a longer text is over-length for sure. Encoding only its
    first (cutoff_len + 1) * B + MAX_RUN characters decides the length policy (drop, error, or the tokens kept by
    truncate) without encoding, say, a 50 MB row; the kept tokens are exact, because encoding.bounded cuts
    runs at the same places in a prefix as in the whole text, and the one piece the prefix cuts short lies a
    whole MAX_RUN beyond them.
    """
    key = tokenizer.encoding
    if key not in _MAX_TOKEN_BYTES:
        _MAX_TOKEN_BYTES[key] = max(map(len, tokenizer.encoding.token_byte_values()))
    return (cutoff_len + 1) * _MAX_TOKEN_BYTES[key] + MAX_RUN


def encode_rows(rows: Sequence[Mapping[str, Any]], template: Template | str, tokenizer: Tokenizer, *,
                cutoff_len: int, policy: str = "drop", train_on_prompt: bool = False, mask_history: bool = False,
                enable_thinking: bool = True, origins: Sequence[Origin | str] | None = None,
                rebuilt_by: str | None = None) -> TokenizedSplit:
    """Tokenize, mask and apply the length policy to many Alpaca rows at once; a problem names the row by its
    origin (`origins[i]`, the raw file and line it was built from; by default `row i`) and, for a row to fix in the
    raw file, the command that rebuilds the data (`rebuilt_by`: pipeline.data.load.rebuild of the recipe; None: the
    rows come from no recipe, and the message says the bare command)."""
    if policy not in POLICIES:
        raise UserError(f"overlength_policy is {policy!r}; expected one of {', '.join(POLICIES)}")
    template = _as_template(template, tokenizer)
    markup = template.ids(tokenizer)  # exit 2 here when the vocabulary lacks the template's markup
    origins = row_origins(origins, len(rows))
    cap = encode_cap(tokenizer, cutoff_len)
    capped: set[int] = set()  # rows whose length below is a lower bound (a text cut at `cap` characters)
    seg_count = np.empty(len(rows), dtype=np.int64)
    seg_response: list[bool] = []
    lens, id_parts, train_parts, relabel_parts = [], [], [], []
    refused: dict[str, list[Origin]] = {}  # message -> the rows: said once, at the first, with the count
    bar = _progress(len(rows), "tokenize")
    for start in range(0, len(rows), ROW_CHUNK):
        texts: list[str] = []
        plans: list[list[int]] = []
        flags: list[bool] = []
        relabel: list[bool] = []
        chunk = rows[start:start + ROW_CHUNK]
        for i, row in enumerate(chunk, start=start):
            try:
                segments = template.segments(row, train_on_prompt=train_on_prompt, mask_history=mask_history,
                                             enable_thinking=enable_thinking)
            except UserError as err:  # a row this template cannot render (tool turns, a template without tools)
                refused.setdefault(err.messages[0], []).append(origins[i])
                seg_count[i] = 0
                continue
            seg_count[i] = len(segments)
            for segment in segments:
                pieces = segment.pieces
                if any(isinstance(p, str) and len(p) > cap for p in pieces):
                    pieces = tuple(type(p)(p[:cap]) if isinstance(p, str) else p for p in pieces)  # Continued kept
                    capped.add(i)
                plans.append(_plan(pieces, markup, texts))
                flags.append(segment.trainable)
                relabel.append(segment.eos_label)
                seg_response.append(segment.response)
        encoded = tokenizer.encode_batch(texts)
        tokens = [_assemble(plan, encoded) for plan in plans]
        chunk_len = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        lens.append(chunk_len)
        id_parts.append(np.fromiter(chain.from_iterable(tokens), dtype=np.int32, count=int(chunk_len.sum())))
        train_parts.append(np.repeat(np.array(flags, dtype=bool), chunk_len))
        relabel_parts.append(np.array(relabel, dtype=bool) & (chunk_len > 0))
        bar.update(len(chunk))
    bar.close()
    if refused:
        problems = Problems()
        for message, where in refused.items():
            first = min(where, key=lambda o: (o.file, line_order(o.where)))
            problems.add(first.file, first.place, message + alike(len(where)))
        problems.raise_if_any()
    seg_len = np.concatenate(lens) if lens else np.zeros(0, np.int64)
    ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int32)
    trainable = np.concatenate(train_parts) if train_parts else np.zeros(0, bool)
    targets = _eos_targets(ids, trainable, seg_len, relabel_parts, markup[EOS])
    total = len(ids)
    seg_start = np.concatenate([[0], np.cumsum(seg_count)])
    row_len = np.add.reduceat(seg_len, seg_start[:-1]) if len(rows) else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(row_len)]).astype(np.int64)
    # Targets are tokens 1..n-1 (token 0 is never predicted): count the trainable ones per row.
    n_trained = (np.add.reduceat(trainable, offsets[:-1], dtype=np.int64) - trainable[offsets[:-1]]
                 if len(rows) else np.zeros(0, np.int64))

    new_len = row_len.copy()
    dropped: dict[str, int] = {OVER: 0, NO_ROOM: 0} if policy != "error" else {}
    dropped_rows: list[str] = []
    truncated_rows: list[str] = []
    over = np.flatnonzero(row_len > cutoff_len)
    if len(over) and policy == "error":
        problems = Problems()
        for i in over:
            count = f"more than {int(row_len[i])}" if i in capped else f"{int(row_len[i])}"
            problems.add(origins[i].file, origins[i].place, f"{count} tokens, over cutoff_len {cutoff_len}")
        messages = problems.messages()
        many = "example is" if len(over) == 1 else "examples are"
        messages.append(f"{len(over):,} {many} longer than cutoff_len {cutoff_len} (overlength_policy: error); "
                        "raise cutoff_len, or set overlength_policy: drop or truncate")
        raise UserError(messages)
    is_response = np.array(seg_response, dtype=bool)
    # efficient_eos: a truncated row still ends with its trained EOS (its last token), as LLaMA-Factory 0.9.5 reserves
    # one token for it and appends it after the cut (processor/supervised.py:68-104)
    tail = 1 if template.efficient_eos else 0
    for i in over:
        start = int(offsets[i])
        if policy == "drop":
            new_len[i] = 0
            dropped[OVER] += 1
            dropped_rows.append(origins[i])
            continue
        cut = _truncation_point(seg_len[seg_start[i]:seg_start[i + 1]], is_response[seg_start[i]:seg_start[i + 1]],
                                cutoff_len - tail)
        left = int(trainable[start + 1:start + cut].sum()) if cut > 1 else 0
        if left == 0:
            new_len[i] = 0
            dropped[NO_ROOM] += 1
            dropped_rows.append(origins[i])
        else:
            new_len[i] = cut + tail
            n_trained[i] = left + tail
            truncated_rows.append(origins[i])
    kept = new_len > 0
    was_truncated = (new_len < row_len) & kept
    empty = np.flatnonzero(kept & (n_trained == 0))
    if len(empty):
        problems = Problems()
        for i in empty:
            problems.add(origins[i].file, origins[i].place, "no trainable token: the example would teach nothing "
                         f"(is the output empty?); fix the row and run {rebuilt_by or run_this('data', None)}")
        problems.raise_if_any()
    if len(over):
        keep = np.ones(total, dtype=bool)
        for i in over:
            end = tail if new_len[i] else 0  # a truncated efficient_eos row keeps its last token, the EOS
            keep[offsets[i] + new_len[i] - end:offsets[i + 1] - end] = False
        ids, trainable = ids[keep], trainable[keep]
        targets = None if targets is None else targets[keep]
    return TokenizedSplit(
        ids=ids, trainable=trainable, offsets=np.concatenate([[0], np.cumsum(new_len[kept])]).astype(np.int64),
        origins=[o for o, k in zip(origins, kept) if k], lengths=row_len, dropped=dropped,
        truncated=len(truncated_rows), truncated_rows=truncated_rows, dropped_rows=dropped_rows,
        is_truncated=was_truncated[kept], targets=targets)


def _eos_targets(ids: np.ndarray, trainable: np.ndarray, seg_len: np.ndarray, relabel_parts: list[np.ndarray],
                 eos: int | None) -> np.ndarray | None:
    """The labels of an efficient_eos template (Segment.eos_label): the ids, with each relabelled segment's first token
    labelled EOS and trained (in place on `trainable`); None where no segment is relabelled."""
    relabel = np.concatenate(relabel_parts) if relabel_parts else np.zeros(0, bool)
    if not relabel.any():
        return None
    first = (np.cumsum(seg_len) - seg_len)[relabel]
    targets = ids.copy()
    targets[first] = eos
    trainable[first] = True
    return targets


def dropped_words(dropped: Mapping[str, int], rows: int, cutoff_len: int) -> str:
    """One note line per length-policy reason (OVER, NO_ROOM) that left rows of the `rows` training rows out: the
    words validate prints and train prints once (the one source of them). LLaMA-Factory truncates long rows, so its
    recipes run here on fewer rows under overlength_policy: drop (a quarter of alpaca_en_demo's at cutoff_len 256);
    "" when none."""
    head = "note: {n:,} of the {rows:,} training rows"
    words = {OVER: f" are longer than cutoff_len {cutoff_len} and are left out (overlength_policy: drop, the default "
                   "here; LLaMA-Factory cuts them instead): set overlength_policy: truncate to keep them with their "
                   "responses cut, or raise cutoff_len",
             NO_ROOM: f" are left out: their prompt fills cutoff_len {cutoff_len}, so cutting leaves no response "
                      "token to train (overlength_policy: truncate cuts responses, not prompts): raise cutoff_len"}
    return "\n".join(head.format(n=dropped[reason], rows=rows) + text for reason, text in words.items()
                     if dropped.get(reason))


def row_origins(origins: Sequence[Origin | str] | None, n: int) -> list[Origin]:
    """The given origins as Origins, or `row i` for each of n rows when none are given."""
    if origins is None:
        return [Origin(f"row {i}", None) for i in range(1, n + 1)]
    return list(map(as_origin, origins))


def _truncation_point(seg_len: np.ndarray, is_response: np.ndarray, cutoff_len: int) -> int:
    """Keep cutoff_len tokens; if that ends inside a prompt, end at the previous response instead."""
    ends = np.cumsum(seg_len)
    j = int(np.searchsorted(ends, cutoff_len - 1, side="right"))  # segment holding the last kept token
    if is_response[j]:
        return cutoff_len
    return int(ends[j - 1]) if j > 0 else 0


def encode_example(row: Mapping[str, Any], template: Template | str, tokenizer: Tokenizer, *, cutoff_len: int,
                   policy: str = "drop", train_on_prompt: bool = False, mask_history: bool = False,
                   enable_thinking: bool = True) -> Encoded | Dropped:
    """One row: Encoded(input_ids, labels) or Dropped(reason, length)."""
    split = encode_rows([row], template, tokenizer, cutoff_len=cutoff_len, policy=policy,
                        train_on_prompt=train_on_prompt, mask_history=mask_history, enable_thinking=enable_thinking)
    if len(split) == 0:
        reason = next(k for k, v in split.dropped.items() if v)
        return Dropped(reason, int(split.lengths[0]))
    return split.example(0)


def encode_prompt(template: Template | str, instruction: str, input: str = "", system: str | None = None,
                  history: Iterable[Sequence[str]] = (), *, tokenizer: Tokenizer,
                  enable_thinking: bool = True, tools: str = "", roles: Sequence[str] = ()) -> list[int]:
    """The prompt ids as training encodes them (segment by segment, markup and EOS by id), with a reasoning
    template's history as inference writes it: earlier answers without their thoughts and without an empty one
    (LLaMA-Factory's encode_oneturn, used by its chat and predict; Qwen3's own chat template drops them too).
    That is mask_history's rule for thoughts (as dpo prompts are encoded); it sets no labels here."""
    template = _as_template(template, tokenizer)
    ids = template.ids(tokenizer)
    turns = template.turns(instruction, input, "", system, history, mask_history=True,
                           enable_thinking=enable_thinking, tools=tools, roles=roles)
    segments = [s for p, a in turns[:-1] for s in (p, a)] + [turns[-1][0]]
    texts: list[str] = []
    plans = [_plan(pieces, ids, texts) for pieces in segments]
    encoded = tokenizer.encode_batch(texts)
    return [t for plan in plans for t in _assemble(plan, encoded)]


# ---------------------------------------------------------------- whole splits, cached per process

def _file_key(paths: Iterable[Path]) -> tuple:
    return tuple((str(Path(p).resolve()), os.stat(p).st_mtime_ns, os.stat(p).st_size) for p in paths)


def _cached(key: tuple, make: Any) -> Any:
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key]
    value = make()
    _cache[key] = value
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return value


def tokenized_split(data: DataArgs, split: str) -> TokenizedSplit:
    """The recipe's sft `split` tokenized with its template, masks and length policy (once per process)."""
    from pipeline.data.args import rebuild
    from pipeline.data.load import mix_key, read_split_rows, split_files

    paths = split_files(data, split)
    tokenizer = recipe_tokenizer(data)
    settings = (data.template, data.default_system, data.cutoff_len, data.overlength_policy, data.train_on_prompt,
                data.mask_history, data.enable_thinking)
    key = ("sft", tokenizer.cache_key, _file_key(paths), mix_key(data, split), settings)

    def make() -> TokenizedSplit:
        rows, origins = read_split_rows(data, split, paths)
        try:
            return encode_rows(rows, data.chat_template(), tokenizer, cutoff_len=data.cutoff_len,
                               policy=data.overlength_policy, train_on_prompt=data.train_on_prompt,
                               mask_history=data.mask_history, enable_thinking=data.enable_thinking, origins=origins,
                               rebuilt_by=rebuild(data))
        except UserError as err:
            if data.packing or data.neat_packing:
                err.messages[-1] += ("; packing never splits an example: with packing too, cutoff_len is the "
                                     "row length and every example must fit in one row")
            raise

    return _cached(key, make)


def pt_separator(template_name: str | None, tokenizer: Tokenizer) -> int:
    """The id that joins pt documents, as LLaMA-Factory's pretrain processor picks it: `<|end_of_text|>` with the
    llama3 template (what Meta pretrained with, also on an Instruct checkpoint whose eos_token is <|eot_id|>),
    else tokenizer.eos_token after the template's replace_eos (qwen / qwen3 / chatml: <|im_end|>). The
    default template (alpaca) replaces nothing: the checkpoint's eos_token."""
    if template_name == "llama3" and tokenizer.has_token("<|end_of_text|>"):
        return tokenizer.token_id("<|end_of_text|>")
    if not template_name:
        return tokenizer.eos_id
    return get_template(template_name).ids(tokenizer)[EOS]


def pt_stream(data: DataArgs, split: str) -> np.ndarray:
    """The pt `split` as one token stream: documents joined by pt_separator (int32)."""
    from pipeline.data.load import combine, mix_key, read_rows, split_files

    paths = split_files(data, split)
    tokenizer = recipe_tokenizer(data)
    separator = pt_separator(data.template, tokenizer)

    def make() -> np.ndarray:
        docs = [row["text"] for row in combine(data, split, paths, [read_rows(path, data) for path in paths])]
        return join_documents(encode_documents(docs, tokenizer), separator)

    return _cached(("pt", tokenizer.cache_key, separator, _file_key(paths), mix_key(data, split)), make)


def encode_documents(docs: Sequence[str], tokenizer: Tokenizer) -> list[list[int]]:
    """tokenizer.encode_batch of pt documents under a progress bar in characters (a pt corpus can be a few long
    documents: plan and validate tokenize it whole, and were silent for its minutes)."""
    with _progress(sum(map(len, docs)), "tokenize", unit="char", minimum=PROGRESS_MIN_CHARS) as bar:
        return tokenizer.encode_batch(docs, done=bar.update)


def join_documents(tokens: Sequence[list[int]], eos_id: int) -> np.ndarray:
    """Documents back to back with one EOS between each two (int32)."""
    total = sum(map(len, tokens)) + max(len(tokens) - 1, 0)
    joined = chain.from_iterable(chain(t, (eos_id,)) if i < len(tokens) - 1 else t for i, t in enumerate(tokens))
    return np.fromiter(joined, dtype=np.int32, count=total)


def pt_windows(n_tokens: int, max_length: int, stride: int) -> np.ndarray:
    """Window starts as in the book's GPTDatasetV1: range(0, len(ids) - max_length, stride)."""
    return np.arange(0, max(n_tokens - max_length, 0), stride, dtype=np.int64)


# ---------------------------------------------------------------- length histogram

def length_table(lengths: np.ndarray, cutoff_len: int | None, bins: int = 10) -> str:
    """A text histogram of example lengths; cutoff_len (None: no limit) is a bin edge, the bins above it marked."""
    lengths = np.asarray(lengths)
    if len(lengths) == 0:
        return "no examples"
    lo, hi = int(lengths.min()) - 1, int(lengths.max())
    if cutoff_len is None:
        return _table(lengths, np.linspace(lo, hi, bins + 1), None)
    if hi <= cutoff_len:
        edges = np.linspace(lo, hi, bins + 1)
    elif lo >= cutoff_len:
        edges = np.linspace(cutoff_len, hi, bins + 1)
    else:
        above = max(2, round(bins * (hi - cutoff_len) / (hi - lo)))
        edges = np.concatenate([np.linspace(lo, cutoff_len, bins - above + 1), np.linspace(cutoff_len, hi, above + 1)[1:]])
    return _table(lengths, edges, cutoff_len)


def _table(lengths: np.ndarray, edges: np.ndarray, cutoff_len: int | None) -> str:
    edges = np.unique(np.ceil(edges).astype(np.int64))
    counts = [int(((lengths > a) & (lengths <= b)).sum()) for a, b in zip(edges[:-1], edges[1:])]
    width = max(max(counts), 1)
    lines = [f"{'tokens':>15}  {'rows':>9}"]
    for (a, b), count in zip(zip(edges[:-1], edges[1:]), counts):
        note = "  over cutoff_len" if cutoff_len is not None and a >= cutoff_len else ""
        lines.append(f"{a + 1:>6,} – {b:<6,}  {count:>9,}  {'#' * round(40 * count / width):<40}{note}".rstrip())
    p = np.percentile(lengths, [50, 90, 99])
    summary = (f"min {int(lengths.min()):,} · median {p[0]:,.0f} · p90 {p[1]:,.0f} · p99 {p[2]:,.0f} · "
               f"max {int(lengths.max()):,}")
    if cutoff_len is not None:
        summary += f" · over cutoff_len {cutoff_len:,}: {int((lengths > cutoff_len).sum()):,}"
    lines.append(summary)
    return "\n".join(lines)


def plot_lengths(lengths: np.ndarray, cutoff_len: int | None, path: Path, title: str) -> Path:
    """Histogram PNG with the cutoff marked (matplotlib, Agg); written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.io import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.hist(np.asarray(lengths), bins=min(50, max(len(np.unique(lengths)), 1)), color="#4c72b0")
    if cutoff_len is None:  # pt documents: no per-example limit
        ax.set_title(f"{title}: {len(lengths):,} documents")
        ax.set_xlabel("tokens per document")
        ax.set_ylabel("documents")
    else:
        ax.axvline(cutoff_len, color="#c44e52", linestyle="--", label=f"cutoff_len {cutoff_len}")
        over = int((np.asarray(lengths) > cutoff_len).sum())
        ax.set_title(f"{title}: {len(lengths):,} examples, {over:,} over cutoff_len")
        ax.set_xlabel("tokens per example (prompt + response + EOS)")
        ax.set_ylabel("examples")
        ax.legend()
    fig.tight_layout()
    with atomic_write(path, "wb") as handle:
        fig.savefig(handle, format="png")
    plt.close(fig)
    return path
