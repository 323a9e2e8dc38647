"""transformers' lr_scheduler_kwargs for its cosine_with_min_lr schedule, read into our min_lr_ratio.

LLaMA-Factory users write `lr_scheduler_type: cosine_with_min_lr` with `lr_scheduler_kwargs: {min_lr_rate: R}` (or
`{min_lr: LR}`, an absolute floor): transformers' get_cosine_with_min_lr_schedule_with_warmup, which is our cosine
with the floor min_lr_ratio (pipeline.train.schedule). The floor has one home, min_lr_ratio: resolve derives it from
these arguments, and the recipe rule refuses the arguments no schedule here reads (instead of ignoring them).
"""
from __future__ import annotations

import json
from typing import Any

from pipeline.recipe.check import show

SCHEDULE = "cosine_with_min_lr"
EXAMPLE = "{min_lr_rate: 0.1}"


def parse(kwargs: Any) -> dict[str, Any]:
    """The arguments as a mapping (transformers also takes their JSON text); ValueError or TypeError with the
    reason."""
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs)
        except json.JSONDecodeError:
            raise ValueError(f"expected a mapping such as {EXAMPLE} (or its JSON text)") from None
    if not isinstance(kwargs, dict):
        raise TypeError(f"expected a mapping such as {EXAMPLE} (or its JSON text)")
    return kwargs


def floor_ratio(schedule: str, kwargs: Any, learning_rate: float) -> float | None:
    """min_lr_ratio from the arguments of `schedule` (None: they set none); ValueError with the reason for arguments
    no schedule here reads, as transformers refuses a min_lr together with a min_lr_rate (TypeError: not a
    mapping)."""
    args = parse(kwargs) if kwargs is not None else {}
    if not args:
        return None
    if schedule != SCHEDULE:
        raise ValueError(f"only lr_scheduler_type: {SCHEDULE} reads scheduler arguments here (min_lr_rate or "
                         f"min_lr), but lr_scheduler_type is {schedule}; remove them, or use min_lr_ratio for a floor")
    unknown = sorted(set(args) - {"min_lr_rate", "min_lr", "num_cycles"})
    if unknown:
        raise ValueError(f"unknown argument {unknown[0]!r} of {SCHEDULE}; expected min_lr_rate or min_lr")
    if args.get("num_cycles", 0.5) != 0.5:
        raise ValueError(f"num_cycles {args['num_cycles']!r} is not implemented (the cosine is one half-wave, "
                         "transformers' default 0.5); remove it")
    rate, floor = args.get("min_lr_rate"), args.get("min_lr")
    if (rate is None) == (floor is None):
        raise ValueError("set exactly one of min_lr_rate (a fraction of learning_rate) and min_lr (a learning rate)"
                         f", as transformers requires: {EXAMPLE}")
    key, value, top = ("min_lr_rate", rate, 1.0) if floor is None else ("min_lr", floor, learning_rate)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= top:
        what, bound = (("a fraction of learning_rate", "1") if floor is None
                       else ("a learning rate", f"learning_rate ({learning_rate:g})"))
        raise ValueError(f"{key} is the floor as {what}, expected a number from 0 to {bound} (given {show(value)}); "
                         f"for example {EXAMPLE}")
    return float(value / top)
