"""Sequence packing for sft: several examples per row of cutoff_len positions (`packing`, `neat_packing`).

An example of n tokens occupies n - 1 positions in a row (inputs tokens 0..n-2, targets 1..n-1), exactly
as in an unpacked batch, so packing changes which examples share a row and nothing about any example's
targets. A row holds at most cutoff_len positions; the over-length policy has already made every
example fit (n <= cutoff_len).

Assignment: best-fit decreasing (longest example first, into the fullest row it still fits; LLaMA-Factory's
greedy_knapsack is the same idea). It depends on the lengths only, never on the seed or the epoch, so the
packs are fixed for a run: the loader shuffles and shards packs, and its saved position is a pack-batch
index (resume, multi-rank and exact step counts all count packs). Inside a row, examples keep their
dataset order.

Two attention modes (the batch says which by carrying `segment_ids`):
- neat_packing: each example attends only to itself (block-diagonal causal) and its positions restart
  at 0, so its loss and gradient equal those of the unpacked run (tests/data/test_packing.py).
- packing alone (LLaMA-Factory's plain packing): one causal attention over the whole row with positions
  0..T-1; later examples see earlier ones. Cheaper attention kernels, but not the unpacked computation.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from pipeline.data.tokenize import IGNORE

PAD_SEGMENT = -1  # padding at the end of a row: a segment of its own that no real token attends to
EXAMPLE_KEY = "example_ids"  # a val batch of packed rows: each position's example within its row (collate_packs)


@dataclass(frozen=True)
class Packs:
    """Pack p holds examples members[offsets[p]:offsets[p+1]] (in dataset order); fill[p] positions used."""

    members: np.ndarray  # int64 example indices
    offsets: np.ndarray  # int64, n_packs + 1
    fill: np.ndarray  # int64 positions per pack

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def pack(self, p: int) -> np.ndarray:
        return self.members[self.offsets[p]:self.offsets[p + 1]]


def pack_examples(sizes: np.ndarray, capacity: int) -> Packs:
    """Best-fit decreasing of `sizes` (positions per example) into rows of `capacity` positions."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) and int(sizes.max()) > capacity:
        raise ValueError(f"an example needs {int(sizes.max())} positions, more than a row's {capacity}")
    free: list[tuple[int, int]] = []  # (free positions, pack id), sorted
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in np.argsort(-sizes, kind="stable"):
        size = int(sizes[i])
        at = bisect.bisect_left(free, (size, -1))  # the fullest row with room
        if at == len(free):
            rows.append([int(i)])
            fill.append(size)
            bisect.insort(free, (capacity - size, len(rows) - 1))
            continue
        room, p = free.pop(at)
        rows[p].append(int(i))
        fill[p] += size
        bisect.insort(free, (room - size, p))
    for row in rows:
        row.sort()
    counts = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    members = np.fromiter((i for r in rows for i in r), dtype=np.int64, count=int(counts.sum()))
    return Packs(members, np.concatenate([[0], np.cumsum(counts)]).astype(np.int64), np.asarray(fill, np.int64))


def collate_packs(packs: Packs, indices: np.ndarray, ids: np.ndarray, trainable: np.ndarray, offsets: np.ndarray,
                  pad_id: int, *, neat: bool, examples: bool = False, targets: np.ndarray | None = None) -> dict:
    """Rows for the packs `indices`: input_ids, labels, attention_mask (B, T) with T the fullest row;
    with `neat` also segment_ids and position_ids (restarting per example); with `examples` (a val split) also
    which example of its row each position holds, under EXAMPLE_KEY, neat or not: compute_accuracy scores each
    example (pipeline.train.accuracy). The model never reads that key (MODEL_KEYS). `targets`: the trained tokens'
    labels where they are not the ids (TokenizedSplit.label_ids)."""
    import torch

    width = int(packs.fill[indices].max())
    b = len(indices)
    input_ids = np.full((b, width), pad_id, dtype=np.int64)
    labels = np.full((b, width), IGNORE, dtype=np.int64)
    mask = np.zeros((b, width), dtype=np.int64)
    segments = np.full((b, width), PAD_SEGMENT, dtype=np.int64)
    positions = np.zeros((b, width), dtype=np.int64)
    for row, p in enumerate(indices):
        at = 0
        for k, example in enumerate(packs.pack(int(p))):
            a, e = int(offsets[example]), int(offsets[example + 1])
            n = e - a - 1
            input_ids[row, at:at + n] = ids[a:e - 1]
            labels[row, at:at + n] = np.where(trainable[a + 1:e], (ids if targets is None else targets)[a + 1:e], IGNORE)
            segments[row, at:at + n] = k
            positions[row, at:at + n] = np.arange(n)
            at += n
        mask[row, :at] = 1
    batch = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
             "attention_mask": torch.from_numpy(mask)}
    if neat:
        batch["segment_ids"] = torch.from_numpy(segments)
        batch["position_ids"] = torch.from_numpy(positions)
    if examples:
        batch[EXAMPLE_KEY] = torch.from_numpy(segments)
    return batch


MODEL_KEYS = ("attention_mask", "segment_ids", "position_ids")


def model_inputs(batch: Mapping[str, object]) -> dict:
    """The keyword arguments a batch passes to the model besides input_ids and labels."""
    return {k: batch[k] for k in MODEL_KEYS if k in batch}
