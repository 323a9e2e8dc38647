"""`python -m pipeline inspect RECIPE [--num N]` (`make inspect`): see the loss mask before training.

Renders N training examples exactly as the trainer will see them, with the trained tokens marked
(green on a terminal, [[double brackets]] otherwise; NO_COLOR turns colour off), the counts the
length policy dropped or truncated, and the token-length histogram (text here, PNG beside the build).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.data.build import built_dir
from pipeline.data.registry import dataset_names
from pipeline.data.tokenize import (NO_ROOM, OVER, TokenizedSplit, length_table, plot_lengths, pt_stream, pt_windows,
                                    tokenized_split)
from pipeline.data.model_tokenizer import recipe_tokenizer
from pipeline.data.tokenizer import Tokenizer

GREEN, RESET = "\x1b[1;32m", "\x1b[0m"


def render(ids: Sequence[int], trained: Sequence[bool], color: bool, tokenizer: Tokenizer) -> str:
    """Decode ids, marking each run of trained tokens."""
    out: list[str] = []
    run: list[int] = []
    state = None
    for token, flag in list(zip(ids, trained)) + [(None, None)]:
        if flag != state and run:
            text = b"".join(tokenizer.token_bytes(t) for t in run).decode("utf-8", errors="replace")
            out.append((f"{GREEN}{text}{RESET}" if color else f"[[{text}]]") if state else text)
            run = []
        state = flag
        if token is not None:
            run.append(token)
    return "".join(out)


def plot_path(r: Mapping[str, Any]) -> Path:
    names = dataset_names(r, "dataset")
    if len(names) == 1:
        return built_dir(r, names[0]) / "token_lengths.png"
    return Path(r["dataset_dir"]) / "build" / f"token_lengths-{'+'.join(names)}.png"


def _policy_line(split: str, data: TokenizedSplit, r: Mapping[str, Any]) -> str:
    dropped = data.dropped.get(OVER, 0) + data.dropped.get(NO_ROOM, 0)
    line = (f"{split}: {data.rows:,} rows -> {len(data):,} examples · dropped {dropped:,} "
            f"({data.dropped.get(OVER, 0):,} {OVER} {r['cutoff_len']}, {data.dropped.get(NO_ROOM, 0):,} {NO_ROOM})"
            f" · truncated {data.truncated:,}  [overlength_policy: {r['overlength_policy']}]")
    for label, rows in (("dropped", data.dropped_rows), ("truncated", data.truncated_rows)):
        if rows:
            more = f" and {len(rows) - 5:,} more" if len(rows) > 5 else ""
            line += f"\n  {label}: {', '.join(rows[:5])}{more}"
    return line


def run(r: Mapping[str, Any], args: Any = None) -> int:
    num = max(0, getattr(args, "num", 3) if args is not None else 3)
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    show = {"pt": inspect_pt, "dpo": inspect_dpo}.get(r["stage"], inspect_sft)
    print(show(r, num, color))
    return 0


def inspect_dpo(r: Mapping[str, Any], num: int, color: bool) -> str:
    """Pairs: the chosen and the rejected sequence of each sample, the scored response tokens marked."""
    from pipeline.data.pairs import tokenized_pairs

    train, val = tokenized_pairs(r, "train"), tokenized_pairs(r, "val")
    tokenizer = recipe_tokenizer(r)
    mark = f"{GREEN}green{RESET}" if color else "[[in double brackets]]"
    out = [f"stage dpo · template {r['template']} · cutoff_len {r['cutoff_len']} · only the last response is scored",
           f"scored tokens (the summed log-probabilities) are {mark}; {tokenizer.eos_text} is EOS "
           f"(id {tokenizer.eos_id})", ""]
    for i in range(min(num, len(train))):
        out.append(f"── pair {i + 1}/{min(num, len(train))} · {train.origins[i]}")
        for side, data in (("chosen", train.chosen), ("rejected", train.rejected)):
            ex = data.example(i)
            scored = [False] + [label != -100 for label in ex.labels[1:]]
            out.append(f"{side}: {len(ex.input_ids)} tokens, {sum(scored)} scored{' · truncated' if ex.truncated else ''}")
            out.append(render(ex.input_ids, scored, color, tokenizer))
        out.append("")
    out += [_policy_line("train", train, r).replace(" examples", " pairs"),
            _policy_line("val", val, r).replace(" examples", " pairs"), ""]
    lengths = np.concatenate([train.lengths, val.lengths])
    out += ["token lengths of the longer sequence of each pair (train + val, before the length policy):",
            length_table(lengths, r["cutoff_len"])]
    path = plot_lengths(lengths, r["cutoff_len"], plot_path(r), " + ".join(dataset_names(r, "dataset")))
    out.append(f"histogram: {path}")
    return "\n".join(out)


def inspect_sft(r: Mapping[str, Any], num: int, color: bool) -> str:
    train, val = tokenized_split(r, "train"), tokenized_split(r, "val")
    tokenizer = recipe_tokenizer(r)
    mark = f"{GREEN}green{RESET}" if color else "[[in double brackets]]"
    out = [f"template {r['template']} · cutoff_len {r['cutoff_len']} · train_on_prompt {r['train_on_prompt']} · "
           f"mask_history {r['mask_history']}",
           f"trained tokens (the loss targets) are {mark}; {tokenizer.eos_text} is EOS (id {tokenizer.eos_id})", ""]
    for i in range(min(num, len(train))):
        ex = train.example(i)
        trained = [False] + [label != -100 for label in ex.labels[1:]]  # token 0 is never a target
        out.append(f"── sample {i + 1}/{min(num, len(train))} · {train.origins[i]} · {len(ex.input_ids)} tokens, "
                   f"{sum(trained)} trained{' · truncated' if ex.truncated else ''}")
        out.append(render(ex.input_ids, trained, color, tokenizer))
        out.append("")
    out += [_policy_line("train", train, r), _policy_line("val", val, r), ""]
    lengths = np.concatenate([train.lengths, val.lengths])
    out += ["token lengths (train + val, before the length policy):", length_table(lengths, r["cutoff_len"])]
    path = plot_lengths(lengths, r["cutoff_len"], plot_path(r), " + ".join(dataset_names(r, "dataset")))
    out.append(f"histogram: {path}")
    return "\n".join(out)


def inspect_pt(r: Mapping[str, Any], num: int, color: bool) -> str:
    from pipeline.data.load import load_split
    from pipeline.data.loaders import pt_stride

    length, stride = r["cutoff_len"], pt_stride(r)
    mark = f"{GREEN}green{RESET}" if color else "[[in double brackets]]"
    out = [f"stage pt · window cutoff_len {length} · stride {stride} · every token after the first of a window "
           f"is a target ({mark})", ""]
    stream = pt_stream(r, "train")
    tokenizer = recipe_tokenizer(r)
    starts = pt_windows(len(stream), length, stride)
    for i in range(min(num, len(starts))):
        ids = stream[starts[i]:starts[i] + length].tolist()
        out.append(f"── window {i + 1} · tokens {starts[i]:,}–{starts[i] + length - 1:,} of the train stream")
        out.append(render(ids, [False] + [True] * (len(ids) - 1), color, tokenizer))
        out.append("")
    for split in ("train", "val"):
        n = len(pt_stream(r, split))
        out.append(f"{split}: {n:,} tokens -> {len(pt_windows(n, length, stride)):,} windows")
    docs = [row["text"] for s in ("train", "val") for row in load_split(r, s)]
    lengths = np.array([len(t) for t in tokenizer.encode_batch(docs)])
    out += ["", "document lengths in tokens (train + val):", length_table(lengths, None)]
    path = plot_lengths(lengths, None, plot_path(r), " + ".join(dataset_names(r, "dataset")))
    out.append(f"histogram: {path}")
    return "\n".join(out)
