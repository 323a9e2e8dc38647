"""Growing a model's vocabulary for added tokens, as LLaMA-Factory 0.9.5's resize_embedding_layer does.

Why its rules and not transformers' defaults: a recipe that adds `new_special_tokens` must give the model
LLaMA-Factory would train, so that losses and exports line up with a run there:

- the embedding grows only when the tokenizer has more ids than it has rows (Qwen's 151,936 rows already
  hold room for new ids: then nothing is resized and those rows keep the checkpoint's values, as there);
- the new size is padded up to a multiple of 64 (`resize_token_embeddings(len(tokenizer),
  pad_to_multiple_of=64)`: pipeline.model.config.resized_vocab_size, which plan counts with);
- every new row (the padding rows too) is the mean of the old rows plus Gaussian noise of std
  1/sqrt(emb_dim) (`_noisy_mean_initialization`, its default noise_init), in the input embedding and, when
  the head is not tied, in the output head (its own mean); a tied head stays the same matrix.

The noise is drawn from a generator seeded by the recipe's seed, so a rebuild gives the same rows (a
resumed run, the base an adapter is loaded onto).

init_special_tokens desc_init / desc_init_w_noise (`Described`: new_special_tokens_config's descriptions) then
write the described new tokens' rows as LLaMA-Factory's `_description_based_initialization` (main branch, which
places them by token id; 0.9.5 wrote them by position from the end of the grown rows and dropped description tokens
at ids >= len(tokenizer) - the padded growth): in the input embedding and then in an untied head, each row the mean
of the INPUT embedding's rows of its description's tokens (LLaMA-Factory reads model.get_input_embeddings() for the
head too), the new tokens' ids left out; a description with no other token takes the mean of that matrix's rows
other than the new ones. desc_init_w_noise adds N(0, 1) / sqrt(dim) noise to each row, drawn after the growth's
noise from the same generator, embedding rows first. The rows are written whether or not the embedding grew (main;
Qwen's spare rows). Tokens the tokenizer already had keep their rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from pipeline.model.config import resized_vocab_size
from pipeline.model.gpt import GPTModel


@torch.no_grad()
def noisy_mean_rows(weight: torch.Tensor, old_rows: int, generator: torch.Generator) -> None:
    """Rows old_rows.. of `weight` (in place): the mean of the rows before them + N(0, 1/sqrt(dim)) noise."""
    dim = weight.size(1)
    mean = weight[:old_rows].float().mean(dim=0, keepdim=True)
    noise = torch.empty(weight.size(0) - old_rows, dim, dtype=torch.float32, device=weight.device)
    noise.normal_(0.0, 1.0 / math.sqrt(dim), generator=generator)
    weight[old_rows:] = (mean + noise).to(weight.dtype)


@dataclass(frozen=True)
class Described:
    """init_special_tokens desc_init (noise False) or desc_init_w_noise (True): the described new tokens' ids,
    each with its description's token ids (the new tokens' ids left out), in the config's order."""

    rows: Mapping[int, tuple[int, ...]]
    noise: bool = False
    new: frozenset[int] = frozenset()  # every new token's id (plain ones too): left out of the fallback mean


@torch.no_grad()
def resize_vocab(model: GPTModel, n_tokens: int, seed: int, described: Described | None = None) -> int:
    """Grow `model`'s embedding (and untied LM head; a reward model has none) for a tokenizer of `n_tokens` ids,
    then write the `described` rows; returns the new row count.

    The embedding first, then the untied head, each from one generator seeded by `seed` (LLaMA-Factory
    initialises them in that order). `model.cfg.vocab_size` follows, so exports write the new size."""
    generator = torch.Generator(device=model.embed_tokens.weight.device).manual_seed(seed)
    old = model.embed_tokens.weight.size(0)
    new = _grow(model, n_tokens, generator)
    if described is not None and described.rows:
        _describe(model, described, old, generator)
    return new


def _grow(model: GPTModel, n_tokens: int, generator: torch.Generator) -> int:
    """The growth of resize_vocab: rows padded to 64, each the noisy mean of the old rows."""
    old = model.embed_tokens.weight.size(0)
    new = resized_vocab_size(old, n_tokens)
    if new == old:
        return old
    tied = model.cfg.tie_weights
    embed = _grown(model.embed_tokens.weight, new)
    noisy_mean_rows(embed, old, generator)
    model.embed_tokens.weight = nn.Parameter(embed, requires_grad=model.embed_tokens.weight.requires_grad)
    model.embed_tokens.num_embeddings = new
    if model.lm_head is not None:  # a reward model (stage rm) has none: its score head has no row per token
        if not tied:
            head = _grown(model.lm_head.weight, new)
            noisy_mean_rows(head, old, generator)
            model.lm_head.weight = nn.Parameter(head, requires_grad=model.lm_head.weight.requires_grad)
        model.lm_head.out_features = new
    model.cfg = model.cfg.replace(vocab_size=new)
    model.tie_weights()
    return new


def _describe(model: GPTModel, described: Described, old: int, generator: torch.Generator) -> None:
    """The described rows of the embedding, then of an untied head (LLaMA-Factory's _description_based_initialization
    on each): the mean of the input embedding's rows of the description's tokens, else of the matrix's rows before
    the growth other than the new tokens' (its fallback); plus noise when asked."""
    embed = model.embed_tokens.weight
    matrices = [embed]
    if model.lm_head is not None and not model.cfg.tie_weights:
        matrices.append(model.lm_head.weight)
    for weight in matrices:
        kept = torch.ones(old, dtype=torch.bool, device=weight.device)
        kept[[i for i in {*described.rows, *described.new} if i < old]] = False
        fallback = weight[:old][kept].float().mean(dim=0)
        scale = 1.0 / math.sqrt(weight.size(1))
        for token, ids in described.rows.items():
            row = embed[list(ids)].float().mean(dim=0) if ids else fallback
            if described.noise:
                row = row + torch.randn(row.shape, generator=generator, device=weight.device) * scale
            weight[token] = row.to(weight.dtype)


def _grown(weight: torch.Tensor, rows: int) -> torch.Tensor:
    """A (rows, dim) copy of `weight` with its rows first (the rest is filled by noisy_mean_rows)."""
    grown = torch.empty(rows, weight.size(1), dtype=weight.dtype, device=weight.device)
    grown[:weight.size(0)] = weight
    return grown
