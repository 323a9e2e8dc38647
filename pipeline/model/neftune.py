"""NEFTune (Jain et al. 2023, https://arxiv.org/abs/2310.05914): noisy token embeddings while fine-tuning.

In a training forward the token embeddings (B, L, d) get uniform noise in [-a, a], a = alpha / sqrt(L * d), the
formula of transformers' `neftune_post_forward_hook` (integrations/neftune.py), which LLaMA-Factory's
`neftune_noise_alpha` switches on. Written out here rather than hooked in, so that GPTModel.forward shows it.

L is the length of the tensor the embedding layer sees, as in transformers: the micro-batch's padded length
(here the longest example of the micro-batch; LLaMA-Factory's collator rounds up to a multiple of 8, so its bound
can be smaller by up to sqrt(L / (L + 7))), and with packing the packed row's length, not each example's. Why not
the real lengths: the noise would then no longer be the same recipe's noise as in LLaMA-Factory, and the pad
positions the noise also touches are masked out of attention and loss either way.

The noise is drawn from torch's default generator of the embeddings' device, like dropout's masks: a checkpoint
saves that generator's state (pipeline.train.checkpoint), so a resumed run draws the same noise as an
uninterrupted one.
"""
from __future__ import annotations

import torch


def neftune_noise(embeds: torch.Tensor, alpha: float) -> torch.Tensor:
    """embeds (B, L, d) plus U(-a, a) noise, a = alpha / sqrt(L * d), computed as transformers computes it."""
    bound = alpha / torch.sqrt(torch.tensor(embeds.size(1) * embeds.size(2)))
    return embeds + torch.zeros_like(embeds).uniform_(-bound, bound)
