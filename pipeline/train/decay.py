"""Which parameters weight decay applies to: transformers' Trainer rule (get_decay_parameter_names), by name, so that
the optimizer groups here decay what LLaMA-Factory's (a transformers Trainer) decay. Its own module because every
optimizer builder reads it (pipeline.train.optim's AdamW groups, BAdam's blocks in pipeline.train.badam) and optim
also builds those optimizers.
"""
from __future__ import annotations

import re

# transformers' Trainer.get_decay_parameter_names: a (lower-cased) parameter name matching this is not decayed
NO_DECAY = re.compile(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)")


def decays(name: str) -> bool:
    """Whether weight decay applies to the parameter `name` (transformers' rule)."""
    return NO_DECAY.search(name.lower()) is None
