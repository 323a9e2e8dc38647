"""Decoding: greedy, sampled (temperature, top-k, top-p, repetition penalty) or beam search (beam_search.py),
batched with left padding, with a KV cache.

The book's generate loop, grown up: the prompt is run once and then one token per step against
cached keys/values; prompts of different lengths are left-padded so that every row's next token
sits in the last column, with position ids counted over real tokens only.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Sequence

import torch

from pipeline.model.beam_search import beam_search
from pipeline.model.config import decode_steps, prompt_room
from pipeline.model.gpt import GPTModel
from pipeline.model.penalties import penalize_repeats
from pipeline.model.rope import longrope_restart
from pipeline.model.weights import note


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) restricted to the top-k tokens, then to the smallest set whose mass reaches top_p.

    T = 1 leaves the distribution unchanged, T < 1 sharpens it, T > 1 flattens it (the book's notes).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the most likely token always stays
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def next_token(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) last-position logits -> (B,) token ids."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Decode in eval mode (no dropout), then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


class _StopCheck:
    """Ends a row at a stop string, checked on the decoded tail (a stop string spans at most 4 bytes per char,
    and every token is at least one byte, so the last 4 * len + 4 tokens always contain it)."""

    def __init__(self, stop_strings: Iterable[str] | None, decode: Callable[[list[int]], str] | None):
        self.strings = [s for s in (stop_strings or ()) if s]
        if self.strings and decode is None:
            raise ValueError("stop_strings need a tokenizer (or decode function) to read the text")
        self.decode = decode
        self.window = 4 * max((len(s) for s in self.strings), default=0) + 4

    def __call__(self, tokens: list[int]) -> bool:
        if not self.strings:
            return False
        tail = self.decode(tokens[-self.window:])  # type: ignore[misc]
        return any(s in tail for s in self.strings)


@torch.inference_mode()
def generate(
    model: GPTModel,
    prompts: Sequence[int] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_id: int | None = None,
    stop_ids: Iterable[int] = (),
    stop_strings: Iterable[str] | None = None,
    tokenizer=None,
    seed: int | None = None,
    use_cache: bool = True,
    pad_id: int = 0,
    repetition_penalty: float = 1.0,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    keep_stop: bool = False,
) -> list[list[int]]:
    """New token ids per prompt (EOS / stop ids left out, or kept as the last token with keep_stop: stage ppo scores
    and trains on the EOS a response ends with, as LLaMA-Factory's PPO keeps it; a stop string's tokens kept, see
    generate_text).

    One prompt (a list of ints) or a batch (a list of lists). Sampling is a pure function of `seed`
    (a private torch.Generator). repetition_penalty (1: off) applies to the row's own tokens, never its left
    padding (transformers also counts the pads of a batched prompt). Prompts longer than the context allows are
    cut from the left, keeping room for max_new_tokens (at least half the context stays prompt); generation ends
    at the context. Neither under dynamic NTK (rope_scaling dynamic): its frequencies follow the length past the
    context, and transformers' generate sets no limit there. num_beams > 1 runs beam search (beam_search.py:
    length_penalty and early_stopping as transformers'); sampling with beams is refused.
    """
    if num_beams > 1 and do_sample:
        raise ValueError("beam search with sampling (do_sample with num_beams > 1) is not implemented: "
                         "sample with num_beams 1, or search beams with do_sample false")
    single = len(prompts) > 0 and isinstance(prompts[0], int)
    batch = [list(prompts)] if single else [list(p) for p in prompts]  # type: ignore[arg-type]
    if not batch or any(len(p) == 0 for p in batch):
        raise ValueError("every prompt needs at least one token")
    keep = prompt_room(model.cfg, max_new_tokens)
    if keep is not None and any(len(p) > keep for p in batch):
        note(f"generate: prompt longer than {keep} tokens cut from the left (context_length {model.cfg.context_length})")
        batch = [p[-keep:] for p in batch]
    device = next(model.parameters()).device
    pad_id = pad_id if pad_id < model.cfg.vocab_size else 0  # pads are masked out: any valid id will do
    ids, mask = _left_pad(batch, pad_id, device)
    padded = bool((mask == 0).any())
    steps = decode_steps(model.cfg, ids.shape[1], max_new_tokens)
    stoppers = {int(t) for t in stop_ids} | ({eos_id} if eos_id is not None else set())
    stop_check = _StopCheck(stop_strings, tokenizer.decode if tokenizer is not None else None)
    positions = (mask.cumsum(1) - 1).clamp(min=0) if padded else None  # counted over real tokens only
    if num_beams > 1:
        with _eval_mode(model):
            out = beam_search(model, ids, mask, positions,
                              num_beams=num_beams, steps=steps, stoppers=stoppers,
                              ended_by_text=stop_check if stop_check.strings else None,
                              length_penalty=length_penalty, early_stopping=early_stopping, pad_id=pad_id,
                              repetition_penalty=repetition_penalty, use_cache=use_cache)
        return out[0] if single else out
    generator = None
    if do_sample and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    with _eval_mode(model):
        out: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        past = model.new_cache(ids.shape[1] + steps) if use_cache else None  # allocated once
        step_ids, step_pos = ids, positions
        seen = None
        if repetition_penalty != 1.0:
            seen = torch.zeros(len(batch), model.cfg.vocab_size, device=device).scatter_add_(1, ids, mask.float()) > 0
        for _ in range(steps):
            attn = mask if padded else None
            if past is not None and past.length and longrope_restart(model.cfg, ids.shape[1], past.length):
                # Phi3ForCausalLM.prepare_inputs_for_generation: the first step past original_max_position_embeddings
                # drops the cache and runs the whole sequence again (every key on the long factors)
                past = model.new_cache(past.capacity)
                step_ids, step_pos = ids, positions
            if use_cache:
                logits, past = model(step_ids, attention_mask=attn, position_ids=step_pos, past_kv=past, use_cache=True,
                                     last_only=True)
            else:
                logits = model(ids, attention_mask=attn, position_ids=positions, last_only=True)
            last = logits[:, -1] if seen is None else penalize_repeats(logits[:, -1].float(), seen, repetition_penalty)
            token = next_token(last, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator)
            for row, t in enumerate(token.tolist()):
                if done[row]:
                    continue
                if t in stoppers:
                    done[row] = True
                    if keep_stop:
                        out[row].append(t)
                    continue
                out[row].append(t)
                done[row] = stop_check(out[row])
            if all(done):
                break
            token = torch.where(torch.tensor(done, device=device), torch.full_like(token, pad_id), token)
            if seen is not None:
                seen[torch.arange(len(batch), device=device), token] = True  # a finished row's pad is never read
            ids = torch.cat([ids, token[:, None]], 1)
            mask = torch.cat([mask, torch.ones_like(token)[:, None]], 1)
            step_ids = token[:, None]
            if padded:
                positions = torch.cat([positions, positions[:, -1:] + 1], 1)  # type: ignore[index]
                step_pos = positions[:, -1:]
        return out[0] if single else out


def cut_at_stop(text: str, stop_strings: Iterable[str] | None) -> str:
    """The text before the first stop string (the stop string itself is not part of the answer)."""
    cut = len(text)
    for s in stop_strings or ():
        at = text.find(s)
        if s and at != -1:
            cut = min(cut, at)
    return text[:cut]


def generate_text(model: GPTModel, tokenizer, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                  **kwargs) -> str | list[str]:
    """Prompts in (text, or token ids as training encoded them), completions out (stop strings cut off).

    Text is encoded as plain text: a user typing "<|endoftext|>" does not produce the EOS token.
    kwargs as for generate(), and skip_special_tokens (Tokenizer.decode's skip_special); by default generation
    stops at the tokenizer's stop ids and pads with its pad id.
    """
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    items = [prompts] if single else list(prompts)
    skip_special = kwargs.pop("skip_special_tokens", False)
    kwargs = {"stop_ids": tokenizer.stop_ids, "pad_id": tokenizer.pad_id, **kwargs}
    encoded = [tokenizer.encode(p) if isinstance(p, str) else list(p) for p in items]
    new = generate(model, encoded, tokenizer=tokenizer, **kwargs)
    completions = [cut_at_stop(tokenizer.decode(ids, skip_special), kwargs.get("stop_strings")) for ids in new]
    return completions[0] if single else completions
