"""transformers' greedy generate of a batch of prompts, left-padded as our generate pads them: the golden tokens of
the batched-generation tests."""
from __future__ import annotations

from typing import Any


def left_padded_greedy(ref: Any, prompts: list[list[int]], new: int) -> list[list[int]]:
    """ref.generate's `new` greedy tokens (no EOS) per prompt, the batch left-padded with id 0 and masked."""
    import torch

    width = max(map(len, prompts))
    batch = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        return ref.generate(batch, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[:, width:].tolist()
