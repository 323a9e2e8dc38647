"""Learning-rate schedules as pure functions of the optimizer step, so they can be checked by hand.

`lr_factor(step, ...)` is the multiplier of the peak learning rate used by optimizer step `step`
(0-based, the LambdaLR convention: step 0 is the first update). Warmup rises linearly from 0
(step 0 of a warmup therefore does not move the weights, as in Hugging Face's schedulers); after it
the factor decays from 1 to `min_lr_ratio` (linear or half-cosine) over the remaining steps, or stays
at 1 (constant). The floor rescales the decay: factor = min_lr_ratio + (1 - min_lr_ratio) * decay.
"""
from __future__ import annotations

import functools
import math
from typing import Any

from pipeline.recipe.args import TrainArgs

SCHEDULES = ("constant", "linear", "cosine", "cosine_with_min_lr")  # the last: cosine, its floor min_lr_ratio


def lr_factor(step: int, *, kind: str, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """The learning-rate multiplier at optimizer step `step` (0-based)."""
    if kind not in SCHEDULES:
        raise ValueError(f"unknown lr_scheduler_type {kind!r}; expected one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return step / warmup_steps
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def make_scheduler(optimizer: Any, train: TrainArgs) -> Any:
    """A torch LambdaLR following the recipe's schedule; DeepSpeed steps it once per optimizer step."""
    from torch.optim.lr_scheduler import LambdaLR

    factor = functools.partial(lr_factor, kind=train.lr_scheduler_type, total_steps=train.total_steps,
                               warmup_steps=train.num_warmup_steps or 0, min_lr_ratio=train.min_lr_ratio)
    return LambdaLR(optimizer, factor)
