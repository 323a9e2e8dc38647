"""Repetition penalty, shared by greedy / sampled decoding (generate.py) and beam search (beam_search.py): one
module both import, so that neither imports the other."""
from __future__ import annotations

import torch


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor (CTRL, Keskar et al. 2019): the logit of every token in
    `seen` ((B, V) bool: the prompt's and generated tokens) is divided by `penalty` when positive and multiplied
    by it when negative, so penalty > 1 makes a seen token less likely whatever its sign."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)
