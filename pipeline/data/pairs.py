"""Preference pairs (stage dpo): tokens, score masks and the over-length policy for chosen/rejected pairs.

A pair is two examples that share the prompt: prompt + chosen + EOS and prompt + rejected + EOS, each
tokenized exactly as sft tokenizes a row (tokenize.encode_rows), with only the last response scored: the
prompt, the system block and every history turn are context (mask_history on, train_on_prompt off, as in
LLaMA-Factory's pairwise data). The over-length policy applies to the pair as a whole: a pair is over
cutoff_len when either of its sequences is; drop removes the pair, error names it, truncate cuts both
responses at cutoff_len (the prompt is never cut) and drops the pair, counted as "prompt fills cutoff_len",
when either sequence would keep no response token.

A pair whose two sequences are the same tokens after the template is left out (counted as SAME): it states no
preference, and its loss is a constant with no gradient. The build already removes pairs with equal text; the
template can still make them equal, e.g. qwen3 with enable_thinking: false removes the thoughts of a pair that
differs only in its reasoning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.data.args import DataArgs
from pipeline.data.problems import Problems
from pipeline.data.templates import Template
from pipeline.data.origins import Origin
from pipeline.data.tokenize import NO_ROOM, OVER, POLICIES, TokenizedSplit, _cached, _file_key, encode_rows, \
    row_origins
from pipeline.data.model_tokenizer import recipe_tokenizer
from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import UserError

SIDES = ("chosen", "rejected")
SAME = "chosen = rejected after the template"


@dataclass
class TokenizedPairs:
    """Kept pairs: pair i is chosen.example(i) and rejected.example(i)."""

    chosen: TokenizedSplit
    rejected: TokenizedSplit
    origins: list[Origin]  # the raw file and line (or row) each kept pair was built from
    lengths: np.ndarray  # per row before the policy: the longer of its two sequences
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    truncated_rows: list[Origin] = field(default_factory=list)
    dropped_rows: list[Origin] = field(default_factory=list)
    tags: np.ndarray | None = None  # stage kto (pipeline.data.feedback): per kept pair, its example is desirable

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def example_lengths(self) -> np.ndarray:
        return np.maximum(self.chosen.example_lengths(), self.rejected.example_lengths())


def side_rows(rows: Sequence[Mapping[str, Any]], side: str) -> list[dict]:
    """The pairs' rows with `side` ("chosen" or "rejected") as the Alpaca output."""
    return [{**{k: v for k, v in row.items() if k not in SIDES}, "output": row[side]} for row in rows]


def encode_pairs(rows: Sequence[Mapping[str, Any]], template: Template | str, tokenizer: Tokenizer, *,
                 cutoff_len: int, policy: str = "drop", enable_thinking: bool = True,
                 origins: Sequence[Origin | str] | None = None, drop_same: bool = True,
                 tags: Sequence[bool] | None = None) -> TokenizedPairs:
    """Tokenize both sides of every pair, score masks on the last response, the length policy per pair.
    drop_same=False keeps pairs whose sides are the same tokens; `tags` (per row) are kept with their pairs (stage
    kto, pipeline.data.feedback: an example and its KL sequence, and whether the example is desirable)."""
    if policy not in POLICIES:
        raise UserError(f"overlength_policy is {policy!r}; expected one of {', '.join(POLICIES)}")
    origins = row_origins(origins, len(rows))
    full = {side: encode_rows(side_rows(rows, side), template, tokenizer, cutoff_len=2**62, policy="drop",
                              mask_history=True, enable_thinking=enable_thinking, origins=origins)
            for side in SIDES}
    lens = {side: full[side].example_lengths() for side in SIDES}
    pair_len = np.maximum(lens["chosen"], lens["rejected"])
    over = np.flatnonzero(pair_len > cutoff_len)
    if len(over) and policy == "error":
        problems = Problems()
        for i in over:
            problems.add(origins[i].file, origins[i].place, f"chosen {int(lens['chosen'][i])} / rejected "
                         f"{int(lens['rejected'][i])} tokens, over cutoff_len {cutoff_len}")
        many = "pair is" if len(over) == 1 else "pairs are"
        raise UserError(problems.messages() + [
            f"{len(over):,} {many} longer than cutoff_len {cutoff_len} (overlength_policy: error); raise "
            "cutoff_len, or set overlength_policy: drop or truncate"])
    keep = {side: lens[side].copy() for side in SIDES}  # tokens kept per example; 0 = pair dropped
    dropped: dict[str, int] = {OVER: 0, NO_ROOM: 0} if policy != "error" else {}
    dropped_rows, truncated_rows = [], []
    same = [i for i in range(len(rows)) if drop_same and _same_tokens(full["chosen"], full["rejected"], i)]
    for i in same:
        for side in SIDES:
            keep[side][i] = 0
        dropped_rows.append(origins[i])
    if same:
        dropped[SAME] = len(same)
    for i in np.setdiff1d(over, same):
        if policy == "drop":
            reason = OVER
        else:
            for side in SIDES:
                keep[side][i] = min(int(lens[side][i]), cutoff_len)
            reason = None if all(_scored(full[side], i, keep[side][i]) for side in SIDES) else NO_ROOM
        if reason is None:
            truncated_rows.append(origins[i])
            continue
        for side in SIDES:
            keep[side][i] = 0
        dropped[reason] += 1
        dropped_rows.append(origins[i])
    kept = keep["chosen"] > 0
    return TokenizedPairs(
        chosen=_cut(full["chosen"], keep["chosen"]), rejected=_cut(full["rejected"], keep["rejected"]),
        origins=[o for o, k in zip(origins, kept) if k], lengths=pair_len, dropped=dropped,
        truncated=len(truncated_rows), truncated_rows=truncated_rows, dropped_rows=dropped_rows,
        tags=None if tags is None else np.asarray(tags, dtype=bool)[kept])


def _same_tokens(chosen: TokenizedSplit, rejected: TokenizedSplit, i: int) -> bool:
    """Whether pair i's two sequences are the same token ids."""
    a, b = (slice(int(split.offsets[i]), int(split.offsets[i + 1])) for split in (chosen, rejected))
    return a.stop - a.start == b.stop - b.start and bool(np.array_equal(chosen.ids[a], rejected.ids[b]))


def _scored(split: TokenizedSplit, i: int, length: int) -> bool:
    """Whether example i keeps a scored target among its first `length` tokens (targets are tokens 1..)."""
    start = int(split.offsets[i])
    return bool(split.trainable[start + 1:start + length].any())


def _cut(split: TokenizedSplit, keep: np.ndarray) -> TokenizedSplit:
    """Example i shortened to its first keep[i] tokens; examples with keep 0 removed."""
    lengths = split.example_lengths()
    mask = np.repeat(np.arange(len(lengths)), lengths)  # example of every token
    position = np.arange(len(split.ids)) - np.repeat(split.offsets[:-1], lengths)
    tokens = position < keep[mask] if len(mask) else np.zeros(0, bool)
    kept = keep > 0
    return TokenizedSplit(ids=split.ids[tokens], trainable=split.trainable[tokens],
                          targets=None if split.targets is None else split.targets[tokens],
                          offsets=np.concatenate([[0], np.cumsum(keep[kept])]).astype(np.int64),
                          origins=[o for o, k in zip(split.origins, kept) if k], lengths=lengths,
                          is_truncated=(keep < lengths)[kept])


def tokenized_pairs(data: DataArgs, split: str) -> TokenizedPairs:
    """The recipe's dpo `split` as pairs, with its template and length policy (once per process)."""
    return tokenized_rows(data, split, set(SIDES), "not a preference pair (no chosen/rejected)", encode_pairs)


def tokenized_rows(data: DataArgs, split: str, fields: set[str], what: str, encode: Any) -> TokenizedPairs:
    """The recipe's `split` through `encode` (encode_pairs, or stage kto's encode_feedback) with its template and
    length policy, once per process and stage; rows without `fields` are named as `what` (a build of another stage)."""
    from pipeline.data.load import make_data, mix_key, read_split_rows, split_files

    paths = split_files(data, split)
    tokenizer = recipe_tokenizer(data)
    key = (data.stage, tokenizer.cache_key, _file_key(paths), mix_key(data, split),
           (data.template, data.default_system, data.cutoff_len, data.overlength_policy, data.enable_thinking))

    def make() -> TokenizedPairs:
        rows, origins = read_split_rows(data, split, paths)
        missing = [o for row, o in zip(rows, origins) if not isinstance(row, dict) or not fields <= row.keys()]
        if missing:
            raise UserError([f"{o}: {what}; the build is from another stage: {make_data(data)}" for o in missing[:5]])
        return encode(rows, data.chat_template(), tokenizer, cutoff_len=data.cutoff_len,
                      policy=data.overlength_policy, enable_thinking=data.enable_thinking, origins=origins)

    return _cached(key, make)
