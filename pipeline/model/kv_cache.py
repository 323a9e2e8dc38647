"""The decoding KV cache: every layer's keys and values in buffers allocated once, written in place.

Why not torch.cat per step (the book's and our first cache): each step then allocates a new, slightly larger
tensor per layer for keys and for values, and frees the previous one only after the step. On CPU such
allocations above glibc's mmap threshold are fresh pages from the kernel, and the page faults of touching
them cost more than the copy itself: measured on the benchmark's 2-core Zen 3 EPYC, GPT-2 small's shape at
batch 1, the concatenations took 7% of a decoding step (138 us each against 32 us for transformers' cache,
which frees each layer's old tensor at once). Here a step copies only its new tokens into the buffers;
attention reads views of the filled part. `generate` sizes the buffers for prompt + new tokens, so they are
allocated once; a cache made without a capacity (a plain forward with use_cache=True) grows by doubling.

A layer with a sliding window w (`windows`, the model's layer_windows) keeps only the last w - 1 positions, as
transformers' DynamicSlidingWindowLayer does (cache_utils.py: it stores full_key_states[:, :, -sliding_window + 1:]):
no later query can see further back (a query at position i sees the keys i - w < j <= i), so memory stays at the
window however long generation runs. Its update returns those kept keys and the new ones, min(seen, w - 1) + t of
them, which GPTModel.forward's mask for that window covers (window_keys); its buffer holds 2 w - 1 positions (or the
capacity, where that is less): a step appends in place, and once it is full the kept w - 1 move to its front (one
copy every w steps), so no step allocates.

Indexing gives what a list of (keys, values) pairs gave: cache[i] is layer i's (B, n_kv_heads, T, head_dim)
keys and values kept (every token so far, or a windowed layer's last w - 1), len(cache) the number of layers.
A layer decides what its pair holds (gpt.MultiHeadAttention.cached): DeepSeek-V3's latent attention keeps its
(B, 1, T, kv_lora_rank) kv latents and (B, 1, T, qk_rope_head_dim) rotated key parts in the two buffers instead.
"""
from __future__ import annotations

from typing import Sequence

import torch

from pipeline.model.config import kv_cache_positions


class KVCache:
    """Keys and values of `n_layers` layers, (B, n_kv_heads, capacity, head_dim) buffers holding each layer's kept
    positions at [starts, lengths); `windows` (one per layer, None: every token) bounds what a windowed layer keeps."""

    def __init__(self, n_layers: int, capacity: int = 0, windows: Sequence[int | None] = ()):
        self.capacity = capacity
        self.windows = tuple(windows) or (None,) * n_layers
        if len(self.windows) != n_layers:
            raise ValueError(f"{len(self.windows)} windows for {n_layers} layers")
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.starts = [0] * n_layers   # the first kept position in the buffer (0 but in windowed layers)
        self.lengths = [0] * n_layers  # the end of the kept positions in the buffer
        self.seen = [0] * n_layers     # tokens the layer has been given, kept or not

    @property
    def length(self) -> int:
        """Tokens cached (those of layer 0: a forward fills the layers in order), kept or past a window."""
        return self.seen[0]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, end, k, v = self.starts[layer], self.lengths[layer], self.keys[layer], self.values[layer]
        if k is None or v is None:
            raise IndexError(f"layer {layer} has nothing cached yet")
        return k[:, :, start:end], v[:, :, start:end]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, n_kv_heads, t, head_dim) to `layer`; its keys and values kept before, then the new ones."""
        self.seen[layer] += k.shape[2]
        if self.windows[layer] is not None:
            return self._update_window(layer, k, v, self.windows[layer])
        start, end = self.lengths[layer], self.lengths[layer] + k.shape[2]
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None or end > keys.shape[2]:
            size = max(end, self.capacity, 2 * (keys.shape[2] if keys is not None else 0))
            keys, values = self._grown(keys, k, start, size), self._grown(values, v, start, size)
            self.keys[layer], self.values[layer] = keys, values
        keys[:, :, start:end] = k
        values[:, :, start:end] = v
        self.lengths[layer] = end
        return keys[:, :, :end], values[:, :, :end]

    def _update_window(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                       window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A windowed layer's update: returns its kept keys (at most window - 1) and the t new ones, then keeps the
        last window - 1 of those."""
        keep, t = window - 1, k.shape[2]
        start, end = self.starts[layer], self.lengths[layer]
        old = end - start
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None:
            size = kv_cache_positions(window, self.capacity)
            keys, values = self._grown(None, k, 0, size), self._grown(None, v, 0, size)
            self.keys[layer], self.values[layer] = keys, values
        if old + t > keys.shape[2]:  # more new tokens than the buffer holds (a long prompt after a past): joined
            out_k, out_v = torch.cat([keys[:, :, start:end], k], 2), torch.cat([values[:, :, start:end], v], 2)
            kept = min(keep, out_k.shape[2])
            keys[:, :, :kept], values[:, :, :kept] = out_k[:, :, out_k.shape[2] - kept:], out_v[:, :, out_v.shape[2] - kept:]
            self.starts[layer], self.lengths[layer] = 0, kept
            return out_k, out_v
        if end + t > keys.shape[2]:  # full: the kept positions to the front (a clone: the ranges may overlap)
            keys[:, :, :old], values[:, :, :old] = keys[:, :, start:end].clone(), values[:, :, start:end].clone()
            start, end = 0, old
        keys[:, :, end:end + t], values[:, :, end:end + t] = k, v
        self.starts[layer], self.lengths[layer] = max(start, end + t - keep), end + t
        return keys[:, :, start:end + t], values[:, :, start:end + t]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes what row rows[i] held, in every layer: beam search follows the beams that survived a
        step (transformers' Cache.reorder_cache). The kept part is copied in place; the buffers stay."""
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            if keys is None or values is None:
                continue
            kept = slice(self.starts[layer], self.lengths[layer])
            keys[:, :, kept] = keys[:, :, kept].index_select(0, rows)
            values[:, :, kept] = values[:, :, kept].index_select(0, rows)

    @staticmethod
    def _grown(old: torch.Tensor | None, new: torch.Tensor, filled: int, size: int) -> torch.Tensor:
        b, h, _, d = new.shape
        buffer = new.new_empty((b, h, size, d))
        if old is not None:
            buffer[:, :, :filled] = old[:, :, :filled]
        return buffer


def window_keys(window: int | None, past: int, t: int) -> int:
    """How many keys a layer's update returns for t new tokens after `past` ones: all of them, or with a sliding window
    the at most window - 1 kept ones and the new (KVCache._update_window)."""
    return past + t if window is None else min(past, window - 1) + t
