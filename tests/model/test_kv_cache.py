"""The preallocated KV cache: what it returns equals concatenating keys and values step by step."""
from __future__ import annotations

import pytest
import torch

from pipeline.model.config import PRESETS
from pipeline.model.generate import generate
from pipeline.model.gpt import GPTModel
from pipeline.model.kv_cache import KVCache


@pytest.mark.parametrize("capacity", [0, 3, 64])
def test_updates_equal_concatenation_whatever_the_capacity(capacity):
    g = torch.Generator().manual_seed(0)
    cache = KVCache(n_layers=2, capacity=capacity)
    ref_k, ref_v = torch.empty(2, 3, 0, 4), torch.empty(2, 3, 0, 4)
    for t in (5, 1, 1, 3, 1):  # a prompt, then single tokens and a chunk: the buffers grow by doubling
        k, v = torch.randn(2, 3, t, 4, generator=g), torch.randn(2, 3, t, 4, generator=g)
        ref_k, ref_v = torch.cat([ref_k, k], 2), torch.cat([ref_v, v], 2)
        for layer in (0, 1):
            got_k, got_v = cache.update(layer, k + layer, v - layer)
            assert torch.equal(got_k, ref_k + layer) and torch.equal(got_v, ref_v - layer)
    assert cache.length == 11 and len(cache) == 2 and torch.equal(cache[1][0], ref_k + 1)


def test_reading_a_layer_before_it_is_filled_is_an_error():
    with pytest.raises(IndexError, match="layer 0 has nothing cached"):
        KVCache(1)[0]


def test_generate_allocates_the_cache_once(monkeypatch):
    """generate sizes the cache for prompt + new tokens: no buffer is ever regrown (copied)."""
    grown = []
    real = KVCache._grown

    def spy(old, new, filled, size):
        grown.append((old is not None, size))
        return real(old, new, filled, size)

    monkeypatch.setattr(KVCache, "_grown", staticmethod(spy))
    model = GPTModel(PRESETS["tiny"].replace(context_length=64), seed=0).eval()
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=9, eos_id=None)
    assert [len(o) for o in out] == [9, 9]
    assert grown and all(not regrown and size == 3 + 9 for regrown, size in grown)
