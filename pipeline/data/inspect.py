"""`python -m pipeline inspect RECIPE [--num N]` (`make inspect`): see the loss mask before training.

Renders N training examples exactly as the trainer will see them, with the trained tokens marked
(green on a terminal, [[double brackets]] otherwise; NO_COLOR turns colour off), the counts the
length policy dropped or truncated, and the token-length histogram (text here, PNG in build/, see plot_path).
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from pipeline.data.args import DataArgs
from pipeline.data.origins import Origin
from pipeline.data.registry import dataset_names
from pipeline.data.tokenize import (NO_ROOM, OVER, TokenizedSplit, length_table, plot_lengths, pt_stream, pt_windows,
                                    tokenized_split)
from pipeline.data.model_tokenizer import recipe_tokenizer
from pipeline.data.tokenizer import Tokenizer

if TYPE_CHECKING:
    from pipeline.data.pairs import TokenizedPairs

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


def plot_path(data: DataArgs) -> Path:
    """Where the length histogram goes: build/token_lengths-<names>.png, named by the recipe's datasets.

    Never inside a dataset's own build folder (build/<name>/): that folder is build's output, written under build's
    lock and described by its manifest, and inspect only reads it."""
    return Path(data.dataset_dir) / "build" / f"token_lengths-{'+'.join(dataset_names(data, 'dataset'))}.png"


def _policy_line(split: str, examples: TokenizedSplit | TokenizedPairs, data: DataArgs) -> str:
    counts = {OVER: 0, NO_ROOM: 0, **examples.dropped}  # the length policy's reasons always shown, others when met
    reasons = ", ".join(f"{n:,} {reason}{f' {data.cutoff_len}' if reason == OVER else ''}"
                        for reason, n in counts.items())
    line = (f"{split}: {examples.rows:,} rows -> {len(examples):,} examples · dropped {sum(counts.values()):,} "
            f"({reasons}) · truncated {examples.truncated:,}  [overlength_policy: {data.overlength_policy}]")
    for label, rows in (("dropped", examples.dropped_rows), ("truncated", examples.truncated_rows)):
        if rows:
            more = f" and {len(rows) - 5:,} more" if len(rows) > 5 else ""
            line += f"\n  {label}: {', '.join(map(str, rows[:5]))}{more}"
    return line


def inspect(data: DataArgs, num: int = 3) -> str:
    """The report of `inspect`: `num` samples rendered as the recipe's stage trains them, and the lengths."""
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
    show = inspect_dpo if data.paired else inspect_pt if data.form == "pt" else inspect_sft
    return show(data, max(0, num), color)


def spread(origins: Sequence[Origin], num: int) -> list[int]:
    """The rows `inspect` shows: the first of each dataset in turn (dataset order), then the second of each, ...
    The first `num` rows of the split are the first dataset's alone, so a recipe mixing formats (the demo's alpaca
    JSONL, ShareGPT JSON and CSV) showed one format's conversion and never the others'. One dataset: its first rows."""
    rows: dict[str | None, list[int]] = {}
    for i, origin in enumerate(origins):
        rows.setdefault(origin.dataset, []).append(i)
    turns = (i for turn in itertools.zip_longest(*rows.values()) for i in turn if i is not None)
    return list(itertools.islice(turns, max(0, num)))


def eos_note(data: DataArgs, tokenizer: Tokenizer) -> str:
    """Which token ends each trained answer: the template's EOS (Template.ids: a replace_eos template's first stop
    word, qwen's <|im_end|> on a base whose tokenizer says <|endoftext|>, or an added one), else the tokenizer's; an
    efficient_eos template's as a label on the next prompt's first token, which inspect marks as any trained one."""
    from pipeline.data.templates import EOS

    template = data.chat_template()
    if not template.ends_answers:
        return f"no EOS ends the answers (template {template.name})"
    eos = template.ids(tokenizer)[EOS]
    if template.efficient_eos:  # the marked token is not the target there (TokenizedSplit.targets)
        return (f"template {template.name} (efficient_eos) writes no EOS after an answer: the first token of each "
                f"later prompt, marked, is trained to predict the EOS {tokenizer.decode([eos])} (id {eos}) in its "
                "place, and each row ends with a trained EOS, as LLaMA-Factory labels them")
    return f"{tokenizer.decode([eos])} is EOS (id {eos})"


def inspect_dpo(data: DataArgs, num: int, color: bool) -> str:
    """Pairs: the chosen and the rejected sequence of each sample, the scored response tokens marked. Stage kto:
    each row's example (desirable or not) and its KL sequence (the prompt with another row's response)."""
    from pipeline.data.loaders import tokenized_pair_split

    train, val = tokenized_pair_split(data, "train"), tokenized_pair_split(data, "val")
    tokenizer = recipe_tokenizer(data)
    mark = f"{GREEN}green{RESET}" if color else "[[in double brackets]]"
    kto = train.tags is not None
    scored = ("the reward model scores each sequence at its last token that is not the pad token"
              if data.stage == "rm" else "only the last response is scored")
    how = "their log-probabilities summed" + ("" if kto else "; pref_loss ipo, orpo, simpo: averaged")
    out = [f"stage {data.stage} · template {data.template} · cutoff_len {data.cutoff_len} · {scored}",
           f"response tokens ({'' if kto else 'dpo: '}{how}) are {mark}; {eos_note(data, tokenizer)}", ""]
    for n, i in enumerate(spread(train.origins, num)):
        out.append(f"── {'row' if kto else 'pair'} {n + 1}/{min(num, len(train))} · {train.origins[i]}")
        sides = ((f"example ({'desirable' if train.tags[i] else 'undesirable'})", train.chosen),
                 ("KL sequence (another row's response)", train.rejected)) if kto else \
            (("chosen", train.chosen), ("rejected", train.rejected))
        for side, examples in sides:
            ex = examples.example(i)
            scored = [False] + [label != -100 for label in ex.labels[1:]]
            out.append(f"{side}: {len(ex.input_ids)} tokens, {sum(scored)} scored{' · truncated' if ex.truncated else ''}")
            out.append(render(ex.input_ids, scored, color, tokenizer))
        out.append("")
    unit = " rows" if kto else " pairs"
    out += [_policy_line("train", train, data).replace(" examples", unit),
            _policy_line("val", val, data).replace(" examples", unit), ""]
    lengths = np.concatenate([train.lengths, val.lengths])
    out += [f"token lengths of the longer sequence of each{unit[:-1]} (train + val, before the length policy):",
            length_table(lengths, data.cutoff_len)]
    path = plot_lengths(lengths, data.cutoff_len, plot_path(data), " + ".join(dataset_names(data, "dataset")))
    out.append(f"histogram: {path}")
    return "\n".join(out)


def inspect_sft(data: DataArgs, num: int, color: bool) -> str:
    train, val = tokenized_split(data, "train"), tokenized_split(data, "val")
    tokenizer = recipe_tokenizer(data)
    mark = f"{GREEN}green{RESET}" if color else "[[in double brackets]]"
    out = [f"template {data.template} · cutoff_len {data.cutoff_len} · train_on_prompt {data.train_on_prompt} · "
           f"mask_history {data.mask_history}",
           f"trained tokens (the loss targets) are {mark}; {eos_note(data, tokenizer)}", ""]
    for n, i in enumerate(spread(train.origins, num)):
        ex = train.example(i)
        trained = [False] + [label != -100 for label in ex.labels[1:]]  # token 0 is never a target
        out.append(f"── sample {n + 1}/{min(num, len(train))} · {train.origins[i]} · {len(ex.input_ids)} tokens, "
                   f"{sum(trained)} trained{' · truncated' if ex.truncated else ''}")
        out.append(render(ex.input_ids, trained, color, tokenizer))
        out.append("")
    out += [_policy_line("train", train, data), _policy_line("val", val, data), ""]
    lengths = np.concatenate([train.lengths, val.lengths])
    out += ["token lengths (train + val, before the length policy):", length_table(lengths, data.cutoff_len)]
    path = plot_lengths(lengths, data.cutoff_len, plot_path(data), " + ".join(dataset_names(data, "dataset")))
    out.append(f"histogram: {path}")
    return "\n".join(out)


def inspect_pt(data: DataArgs, num: int, color: bool) -> str:
    from pipeline.data.load import load_split
    from pipeline.data.loaders import pt_stride

    length, stride = data.cutoff_len, pt_stride(data)
    mark = f"{GREEN}green{RESET}" if color else "[[in double brackets]]"
    out = [f"stage pt · window cutoff_len {length} · stride {stride} · every token after the first of a window "
           f"is a target ({mark})", ""]
    stream = pt_stream(data, "train")
    tokenizer = recipe_tokenizer(data)
    starts = pt_windows(len(stream), length, stride)
    for i in range(min(num, len(starts))):
        ids = stream[starts[i]:starts[i] + length].tolist()
        out.append(f"── window {i + 1} · tokens {starts[i]:,}–{starts[i] + length - 1:,} of the train stream")
        out.append(render(ids, [False] + [True] * (len(ids) - 1), color, tokenizer))
        out.append("")
    for split in ("train", "val"):
        n = len(pt_stream(data, split))
        out.append(f"{split}: {n:,} tokens -> {len(pt_windows(n, length, stride)):,} windows")
    docs = [row["text"] for s in ("train", "val") for row in load_split(data, s)]
    lengths = np.array([len(t) for t in tokenizer.encode_batch(docs)])
    out += ["", "document lengths in tokens (train + val):", length_table(lengths, None)]
    path = plot_lengths(lengths, None, plot_path(data), " + ".join(dataset_names(data, "dataset")))
    out.append(f"histogram: {path}")
    return "\n".join(out)
