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


def caches_after_steps(ref: Any, ours: Any, x: Any, prompt: int) -> tuple[Any, Any]:
    """transformers' cache layers and our KVCache after a forward of x's first `prompt` tokens and one-token steps
    through the rest (use_cache, no generate): the golden of the cache-content tests."""
    import torch

    with torch.no_grad():
        out = ref(x[:, :prompt], use_cache=True)
        for t in range(prompt, x.shape[1]):
            out = ref(x[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        _, past = ours(x[:, :prompt], use_cache=True)
        for t in range(prompt, x.shape[1]):
            _, past = ours(x[:, t:t + 1], past_kv=past, use_cache=True)
    return out.past_key_values.layers, past


def beam_search_tokens(ref: Any, prompt: list[int], new: int, beams: int) -> list[int]:
    """ref.generate's beam search (no sampling, no EOS) of `new` tokens after one prompt."""
    import torch

    with torch.no_grad():
        return ref.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, num_beams=beams,
                            eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()


def greedy_tokens(ref: Any, prompt: list[int], new: int) -> list[int]:
    """ref.generate's `new` greedy tokens (no EOS) after one prompt."""
    import torch

    with torch.no_grad():
        return ref.generate(torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None,
                            pad_token_id=0)[0, len(prompt):].tolist()
