"""Beam search, as transformers' generate(num_beams=k, do_sample=False) runs it for a decoder-only model.

Why beside greedy: LLaMA-Factory passes num_beams and length_penalty to transformers' generate, so a recipe with
num_beams: 3 must give the answers transformers gives. Greedy keeps the one most likely next token; beam search
keeps the k most likely *sequences* (the sum of their tokens' log-probabilities), so a token that looks worse
now can win through what follows it.

transformers' rules, kept exactly (generation/utils.py `_beam_search` and its helpers):
- each step every beam proposes every token; the 2k best (k times one more than the number of stop ids) of the
  k x V continuations are kept, so that k of them are still running even when the best ones end;
- a continuation ending in a stop id (or reaching max_new_tokens, or a stop string) becomes a finished hypothesis
  only if it is among the k best; its score is sum of log-probs / (new tokens, the stop id included) **
  length_penalty: above 0 favours longer answers, below 0 shorter ones; the k best hypotheses are kept;
- early_stopping: True ends a prompt's search once k hypotheses are finished; False (transformers' default) ends
  it when the best running beam, scored at its present length, cannot beat the worst finished one; "never" the
  same, but scored at max_new_tokens when length_penalty > 0 (the canonical beam search's bound);
- the answer is the best finished hypothesis (num_return_sequences 1).

Prompts are expanded to k rows each, sharing the KV cache's layout; after a step the cache rows are reordered
to follow the beams that survived (KVCache.reorder).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

from pipeline.model.gpt import GPTModel
from pipeline.model.kv_cache import KVCache
from pipeline.model.rope import longrope_restart
from pipeline.model.penalties import penalize_repeats

EarlyStopping = bool | Literal["never"]
NEG = -1.0e9  # transformers' "impossible" running score: added, not -inf, so that sums and ranks stay finite


def _forward(model: GPTModel, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
             past: KVCache | None) -> tuple[torch.Tensor, KVCache | None]:
    """Last-position logits (rows, V) in float32, and the cache (None without one)."""
    if past is None:
        return model(ids, attention_mask=mask, position_ids=positions, last_only=True)[:, -1].float(), None
    logits, past = model(ids, attention_mask=mask, position_ids=positions, past_kv=past, use_cache=True,
                         last_only=True)
    return logits[:, -1].float(), past


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tensor (B, n, ...) picked along dim 1 by index (B, m) -> (B, m, ...)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


class _Finished:
    """A prompt's k best finished hypotheses: their new tokens, lengths, scores and whether a slot holds one."""

    def __init__(self, batch: int, beams: int, steps: int, pad_id: int, device: torch.device):
        self.tokens = torch.full((batch, beams, steps), pad_id, dtype=torch.long, device=device)
        self.lengths = torch.zeros((batch, beams), dtype=torch.long, device=device)
        self.scores = torch.full((batch, beams), NEG, device=device)
        self.filled = torch.zeros((batch, beams), dtype=torch.bool, device=device)

    def offer(self, tokens: torch.Tensor, scores: torch.Tensor, ended: torch.Tensor, length: int) -> None:
        """Merge candidates (B, c, steps) that `ended` (B, c) with their length-penalised scores; keep the best k."""
        beams = self.scores.shape[1]
        scores = torch.where(ended, scores, torch.full_like(scores, float("-inf")))
        merged = torch.cat([self.scores, scores], 1)
        best = torch.topk(merged, beams).indices
        self.scores = _gather(merged, best)
        self.tokens = _gather(torch.cat([self.tokens, tokens], 1), best)
        self.lengths = _gather(torch.cat([self.lengths, torch.full_like(ended, length, dtype=torch.long)], 1), best)
        self.filled = _gather(torch.cat([self.filled, ended], 1), best)


def _can_improve(improvable: torch.Tensor, running_best: torch.Tensor, finished: _Finished, length: int,
                 max_length: int, length_penalty: float, early_stopping: EarlyStopping) -> torch.Tensor:
    """transformers' early-stop heuristic, per prompt: can the best running beam still beat the worst finished
    hypothesis? Once a prompt's answer is no, no hypothesis is added to it any more."""
    bound = max_length if early_stopping == "never" and length_penalty > 0.0 else length
    best_possible = running_best / (bound ** length_penalty)
    empty = torch.full_like(finished.scores, NEG)  # a free slot: anything still running beats it
    worst = torch.where(finished.filled, finished.scores.min(1, keepdim=True).values, empty)
    return improvable & (best_possible[:, None] > worst).any(1)


def beam_search(model: GPTModel, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None, *,
                num_beams: int, steps: int, stoppers: set[int],
                ended_by_text: Callable[[list[int]], bool] | None = None,
                length_penalty: float = 1.0, early_stopping: EarlyStopping = False, pad_id: int = 0,
                repetition_penalty: float = 1.0, use_cache: bool = True) -> list[list[int]]:
    """The new tokens of each left-padded prompt (ids, mask: (B, T); positions: None when unpadded), stop id
    left out; `ended_by_text(tokens)` says a stop string ended a hypothesis (its tokens are kept, as greedy's)."""
    batch, width = ids.shape
    k, vocab, device = num_beams, model.cfg.vocab_size, ids.device
    keep = min(max(2, 1 + len(stoppers)) * k, k * vocab)  # enough that k still run when the best ones end
    rows = torch.arange(batch * k, device=device)
    ids, mask = ids.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    padded = positions is not None
    positions = positions.repeat_interleave(k, 0) if positions is not None else None
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(batch * k, vocab, device=device).scatter_add_(1, ids, mask.float()) > 0

    running = torch.full((batch, k, steps), pad_id, dtype=torch.long, device=device)
    running_scores = torch.full((batch, k), NEG, device=device)
    running_scores[:, 0] = 0.0  # only the first copy of the prompt proposes: k copies would propose the same
    finished = _Finished(batch, k, steps, pad_id, device)
    improvable = torch.ones(batch, dtype=torch.bool, device=device)
    past = model.new_cache(width + steps) if use_cache else None
    step_ids, step_pos = ids, positions
    for t in range(steps):
        if past is not None and past.length and longrope_restart(model.cfg, width + t, past.length):
            # as generate (Phi3ForCausalLM.prepare_inputs_for_generation): past LongRoPE's window, start again
            past = model.new_cache(past.capacity)
            step_ids, step_pos = torch.cat([ids, running[:, :, :t].reshape(batch * k, -1)], 1), positions
        logits, past = _forward(model, step_ids, mask if padded else None, step_pos, past)
        log_probs = torch.log_softmax(logits, dim=-1)
        if seen is not None:  # transformers applies its processors to the log-probs in beam search
            log_probs = penalize_repeats(log_probs, seen, repetition_penalty)
        total = (log_probs.view(batch, k, vocab) + running_scores[:, :, None]).view(batch, k * vocab)
        cand_scores, cand = torch.topk(total, keep)
        cand_beam, cand_token = cand // vocab, cand % vocab
        cand_tokens = _gather(running, cand_beam)
        cand_tokens[:, :, t] = cand_token
        ended = _ended(cand_tokens, t, steps, stoppers, ended_by_text)

        full = finished.filled.all(1, keepdim=True) & (early_stopping is True)
        may_finish = ended & (torch.arange(keep, device=device) < k) & improvable[:, None] & ~full
        finished.offer(cand_tokens, cand_scores / ((t + 1) ** length_penalty), may_finish, t + 1)

        best = torch.topk(cand_scores + ended.float() * NEG, k)  # the k best that go on
        running_scores, running = best.values, _gather(cand_tokens, best.indices)
        source = (_gather(cand_beam, best.indices) + torch.arange(batch, device=device)[:, None] * k).view(-1)
        improvable = _can_improve(improvable, running_scores[:, 0], finished, t + 1, steps, length_penalty,
                                  early_stopping)
        if not improvable.any() or bool(ended.all()) or (early_stopping is True and bool(finished.filled.all())):
            break
        step_ids = running[:, :, t].reshape(-1, 1)
        if seen is not None:
            seen = seen[source]
            seen[rows, step_ids[:, 0]] = True
        mask = torch.cat([mask, torch.ones_like(step_ids)], 1)
        if past is not None:
            past.reorder(source)
        else:
            step_ids = torch.cat([ids, running[:, :, :t + 1].reshape(batch * k, -1)], 1)
        if positions is not None:
            positions = torch.cat([positions, positions[:, -1:] + 1], 1)
            step_pos = positions[:, -1:] if past is not None else positions
    return [_answer(finished.tokens[b, 0, :finished.lengths[b, 0]].tolist(), stoppers) for b in range(batch)]


def _ended(cand_tokens: torch.Tensor, t: int, steps: int, stoppers: set[int],
           ended_by_text: Callable[[list[int]], bool] | None) -> torch.Tensor:
    """(B, c) bool: the candidate's new token is a stop id, it reached max_new_tokens, or a stop string ended it."""
    new = cand_tokens[:, :, t]
    ended = torch.zeros_like(new, dtype=torch.bool) | (t + 1 == steps)
    for stop in stoppers:
        ended |= new == stop
    if ended_by_text is None:
        return ended
    tokens, stopped = cand_tokens[:, :, :t + 1].tolist(), ended.tolist()  # one copy from the GPU a step, not one each
    for b, row in enumerate(tokens):
        for c, candidate in enumerate(row):
            if not stopped[b][c] and ended_by_text(candidate):
                ended[b, c] = True
    return ended


def _answer(tokens: list[int], stoppers: set[int]) -> list[int]:
    """A hypothesis's new tokens without the stop id that ended it (greedy leaves it out too)."""
    return tokens[:-1] if tokens and tokens[-1] in stoppers else tokens
