"""mix_strategy interleave_under / interleave_over / interleave_once: the training rows of several datasets
interleaved as LLaMA-Factory mixes them (HF datasets' `interleave_datasets(datasets, probabilities=interleave_probs,
seed=seed, stopping_strategy=...)`, whose index sequence this reproduces without depending on `datasets`).

The order depends only on the datasets' lengths, the probabilities and the seed, so `plan` counts a mix from the
built manifests without reading a row, and the loaders apply the same order to rows and to their origins.
Without probabilities the datasets take turns (round robin); with them, each next row comes from a dataset drawn
by numpy's `default_rng(seed).choice` in blocks of 1,000 draws, as HF draws them. A dataset that runs out starts
again from its first row (under, over) or is skipped from then on (once).
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Sequence, TypeVar

T = TypeVar("T")

# mix_strategy -> HF's stopping_strategy (LLaMA-Factory's data_utils.merge_dataset). The last needs datasets after
# 4.0.0: LLaMA-Factory pins datasets<=4.0.0, which refuses it; here it is the newer datasets' order
STOPPING = {"interleave_under": "first_exhausted", "interleave_over": "all_exhausted",
            "interleave_once": "all_exhausted_without_replacement"}
DRAW_BLOCK = 1000  # HF draws the sources this many at a time: the random stream depends on it
# numpy's Generator.choice refuses probabilities whose sum is further than this from 1
SUM_TOLERANCE = math.sqrt(2.0 ** -52)


def parse_probs(value: str | Sequence[Any] | None) -> list[float] | None:
    """interleave_probs as LLaMA-Factory reads it: a comma-separated string (or a list) of floats. ValueError names
    the first item that is not a number."""
    if value is None:
        return None
    items = [item.strip() for item in value.split(",")] if isinstance(value, str) else list(value)
    probs = []
    for item in items:
        try:
            probs.append(float(item))
        except (TypeError, ValueError):
            raise ValueError(f"{item!r} is not a number") from None
    return probs


def probs_problem(probs: Sequence[float], n_datasets: int, strategy: str, key: str = "dataset") -> str | None:
    """Why interleave_probs cannot mix `n_datasets` datasets (those of recipe key `key`: dataset, or eval_dataset,
    which is mixed with the same probabilities) with `strategy` (None: it can). The checks are the ones
    LLaMA-Factory (the count, for both keys) and numpy's choice (finite, non-negative, summing to 1) make, plus the
    ones HF's interleave_datasets makes or should: under interleave_over a dataset of probability 0 is never
    exhausted (HF raises), and under interleave_once the draws never end (HF loops forever)."""
    if len(probs) != n_datasets:
        return f"{len(probs)} probabilities for {n_datasets} datasets in `{key}`: give one per dataset, in order"
    if not all(math.isfinite(p) and p >= 0 for p in probs):
        return "every probability must be a finite number of 0 or more"
    if abs(math.fsum(probs) - 1) > SUM_TOLERANCE:
        return f"the probabilities sum to {math.fsum(probs):g}; they must sum to 1"
    if strategy != "interleave_under" and 0 in probs and n_datasets > 1:
        return (f"a dataset of probability 0 is never drawn, so with mix_strategy {strategy} the mix never ends; "
                f"give it a probability above 0, use interleave_under, or drop it from `{key}`")
    return None


def interleave_order(lengths: Sequence[int], probs: Sequence[float] | None, seed: int | None, strategy: str
                     ) -> list[tuple[int, int]]:
    """(dataset, row) of each mixed row, in order: HF's interleave_datasets index sequence over datasets of these
    lengths (each at least 1). One dataset is returned whole, as LLaMA-Factory does."""
    if len(lengths) == 1:
        return [(0, row) for row in range(lengths[0])]
    stopping = STOPPING[strategy]
    if probs is None:
        return _round_robin(lengths, stopping)
    return _drawn(lengths, _draws(len(lengths), probs, seed), stopping)


def _round_robin(lengths: Sequence[int], stopping: str) -> list[tuple[int, int]]:
    """One row of each dataset in turn: until the shortest runs out (first_exhausted), the longest runs out with the
    others starting over (all_exhausted), or each dropped once it runs out (without replacement)."""
    if stopping == "first_exhausted":
        return [(d, k) for k in range(min(lengths)) for d in range(len(lengths))]
    if stopping == "all_exhausted":
        return [(d, k % n) for k in range(max(lengths)) for d, n in enumerate(lengths)]
    return [(d, k) for k in range(max(lengths)) for d, n in enumerate(lengths) if k < n]


def _draws(n_datasets: int, probs: Sequence[float], seed: int | None) -> Iterator[int]:
    """The endless sequence of drawn datasets, in HF's blocks (the same numpy calls give the same stream)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    while True:
        yield from rng.choice(n_datasets, size=DRAW_BLOCK, p=probs).tolist()


def _drawn(lengths: Sequence[int], draws: Iterator[int], stopping: str) -> list[tuple[int, int]]:
    """HF's per-draw loop: before each draw is used, stop when any (first_exhausted) or every dataset has run out;
    a run-out dataset starts over at row 0, or without replacement is passed over when drawn."""
    replace = stopping != "all_exhausted_without_replacement"
    stop = any if stopping == "first_exhausted" else all
    exhausted = [False] * len(lengths)
    current = [0] * len(lengths)
    order: list[tuple[int, int]] = []
    for d in draws:
        if stop(exhausted):
            break
        if replace or not exhausted[d]:
            order.append((d, current[d]))
            current[d] += 1
        if current[d] >= lengths[d]:
            exhausted[d] = True
            if replace:
                current[d] = 0
    return order


def mixed(parts: Sequence[Sequence[T]], probs: Sequence[float] | None, seed: int | None, strategy: str) -> list[T]:
    """The items of several datasets (rows, or their origins) in interleave_order."""
    return [parts[d][k] for d, k in interleave_order([len(p) for p in parts], probs, seed, strategy)]
