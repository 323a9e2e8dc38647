"""The decoding KV cache: every layer's keys and values in buffers allocated once, written in place.

Why not torch.cat per step (the book's and our first cache): each step then allocates a new, slightly larger
tensor per layer for keys and for values, and frees the previous one only after the step. On CPU such
allocations above glibc's mmap threshold are fresh pages from the kernel, and the page faults of touching
them cost more than the copy itself: measured on the benchmark's 2-core Zen 3 EPYC, GPT-2 small's shape at
batch 1, the concatenations took 7% of a decoding step (138 us each against 32 us for transformers' cache,
which frees each layer's old tensor at once). Here a step copies only its new tokens into the buffers;
attention reads views of the filled part. `generate` sizes the buffers for prompt + new tokens, so they are
allocated once; a cache made without a capacity (a plain forward with use_cache=True) grows by doubling.

Indexing gives what a list of (keys, values) pairs gave: cache[i] is layer i's (B, n_kv_heads, T, head_dim)
keys and values so far, len(cache) the number of layers.
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of `n_layers` layers, (B, n_kv_heads, capacity, head_dim) buffers filled to `length`."""

    def __init__(self, n_layers: int, capacity: int = 0):
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lengths = [0] * n_layers

    @property
    def length(self) -> int:
        """Tokens cached (those of layer 0: a forward fills the layers in order)."""
        return self.lengths[0]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, k, v = self.lengths[layer], self.keys[layer], self.values[layer]
        if k is None or v is None:
            raise IndexError(f"layer {layer} has nothing cached yet")
        return k[:, :, :n], v[:, :, :n]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, n_kv_heads, t, head_dim) to `layer`; its keys and values so far, new ones included."""
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

    def reorder(self, rows: torch.Tensor) -> None:
        """Row i becomes what row rows[i] held, in every layer: beam search follows the beams that survived a
        step (transformers' Cache.reorder_cache). The filled part is copied in place; the buffers stay."""
        for layer, (keys, values) in enumerate(zip(self.keys, self.values)):
            if keys is None or values is None:
                continue
            n = self.lengths[layer]
            keys[:, :, :n] = keys[:, :, :n].index_select(0, rows)
            values[:, :, :n] = values[:, :, :n].index_select(0, rows)

    @staticmethod
    def _grown(old: torch.Tensor | None, new: torch.Tensor, filled: int, size: int) -> torch.Tensor:
        b, h, _, d = new.shape
        buffer = new.new_empty((b, h, size, d))
        if old is not None:
            buffer[:, :, :filled] = old[:, :, :filled]
        return buffer
