"""The KV cache of a layer with a sliding window keeps only the positions its window can still reach.

transformers 5.24's DynamicSlidingWindowLayer (cache_utils.py) keeps the last sliding_window - 1 keys and values of
a "sliding_attention" layer after each update and attends over those and the new ones; its full-attention layers keep
everything. Golden values: transformers' generate (greedy, and beam search) on tiny Mistral (a window in every layer)
and Gemma 3 (a window in 1 of 2 layers) checkpoints whose prompt + new tokens outrun the window, and the keys its
cache holds after a forward. Before the change our cache kept every position in every layer (masked: correct
outputs, memory growing with the length): the cache-size tests failed, the greedy / beam ones passed either way.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.model.config import kv_cache_bytes
from pipeline.model.generate import generate
from pipeline.model.gpt import GPTModel
from pipeline.model.kv_cache import KVCache
from pipeline.model.weights import load_model
from tests.helpers.hf_generate import (beam_search_tokens, caches_after_steps, greedy_tokens,
                                        left_padded_greedy)
from tests.model.test_families import hf_model, ids
from tests.model.test_gemma import gemma3

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["mistral-window", "gemma3-window"])
def checkpoint(request, tmp_path_factory):
    """(transformers model, ours): Mistral with a 6-position window in both layers, Gemma 3 with a 5-position window
    in layers 0 and 2 of 4."""
    ref = hf_model("mistral-window") if request.param == "mistral-window" else gemma3()
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, load_model(path).eval()


@pytest.fixture
def caches(monkeypatch):
    """Every KV cache generate makes, kept for a look afterwards."""
    made: list[KVCache] = []
    real = GPTModel.new_cache

    def spy(self, capacity=0):
        made.append(real(self, capacity))
        return made[-1]

    monkeypatch.setattr(GPTModel, "new_cache", spy)
    return made


def test_generation_keeps_the_window_and_equals_transformers(checkpoint, caches):
    """Greedy, 20 new tokens after a 9-token prompt (windows 5 / 6): transformers' tokens; each windowed layer's
    buffer holds at most 2 x window - 1 positions and keeps window - 1, a full layer every position but the last
    token's (never run through the model); plan's estimate of the cache counts those buffers (it counted every layer's
    prompt + new tokens before)."""
    ref, ours = checkpoint
    prompt, new = ids(1, (1, 9))[0].tolist(), 20
    assert generate(ours, prompt, max_new_tokens=new, eos_id=None) == greedy_tokens(ref, prompt, new)
    (cache,) = caches
    windows = [blk.window for blk in ours.layers]
    assert cache.windows == tuple(windows) and any(windows)
    for layer, window in enumerate(windows):
        keys, values = cache[layer]
        if window is None:
            assert keys.shape[2] == len(prompt) + new - 1
        else:
            assert keys.shape[2] == values.shape[2] == window - 1 and cache.keys[layer].shape[2] <= 2 * window - 1
    # plan's estimate (config.kv_cache_bytes) is what this cache allocated: the windowed layers' buffers count their
    # 2 x window - 1 positions, not prompt + new tokens
    allocated = sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values])
    assert kv_cache_bytes(ours.cfg, 1, len(prompt), new, 4) == allocated


def test_left_padded_batch_equals_transformers_past_the_window(checkpoint):
    """A left-padded batch (greedy; the padding mask's columns cut to the kept keys) past the window: transformers'
    tokens. On Gemma 3, whose full and windowed layers take differently cut masks."""
    ref, ours = checkpoint
    if ref.config.model_type == "mistral":
        pytest.skip("Gemma 3's mixed layers cover it")
    prompts = [ids(2, (1, 4))[0].tolist(), ids(3, (1, 10))[0].tolist()]
    assert generate(ours, prompts, max_new_tokens=10, eos_id=None) == left_padded_greedy(ref, prompts, 10)


def test_beam_search_reorders_the_kept_keys_as_transformers(checkpoint):
    """Beam search (2 beams: the cache reordered each step) past the window: transformers' tokens."""
    ref, ours = checkpoint
    if ref.config.model_type != "mistral":
        pytest.skip("reordering is family-independent: Mistral's windowed layers cover it")
    prompt = ids(3, (1, 10))[0].tolist()
    assert generate(ours, prompt, max_new_tokens=8, eos_id=None, num_beams=2) == beam_search_tokens(ref, prompt, 8, 2)


def test_kept_keys_are_transformers_sliding_window_layer_keys(checkpoint):
    """After a 12-token forward and 3 one-token steps, each layer's kept keys and values are those transformers'
    cache layers hold (DynamicSlidingWindowLayer: the last window - 1; DynamicLayer: all)."""
    ref, ours = checkpoint
    layers, past = caches_after_steps(ref, ours, ids(4, (1, 15)), 12)
    for layer, theirs in enumerate(layers):
        keys, values = past[layer]
        assert keys.shape == theirs.keys.shape, (layer, keys.shape, theirs.keys.shape)
        assert torch.allclose(keys, theirs.keys, atol=1e-5) and torch.allclose(values, theirs.values, atol=1e-5)


@pytest.mark.parametrize("capacity", [0, 7, 64])
def test_window_updates_return_the_kept_keys_then_the_new(capacity):
    """KVCache alone, window 4 in layer 0, none in layer 1: a prompt longer than the window, single tokens and chunks
    (one longer than the buffer): each update returns the last min(seen, 3) earlier keys and the new ones, as a
    concatenation of every step would hold them; the full layer returns everything."""
    g = torch.Generator().manual_seed(0)
    cache = KVCache(n_layers=2, capacity=capacity, windows=(4, None))
    ref_k = torch.empty(1, 2, 0, 3)
    for t in (6, 1, 1, 2, 1, 1, 9, 1, 1, 1):
        k = torch.randn(1, 2, t, 3, generator=g)
        seen = ref_k.shape[2]
        ref_k = torch.cat([ref_k, k], 2)
        got, _ = cache.update(0, k, -k)
        assert torch.equal(got, ref_k[:, :, seen - min(seen, 3):])
        assert torch.equal(cache.update(1, k, -k)[0], ref_k)
        assert torch.equal(cache[0][0], ref_k[:, :, -3:]) and torch.equal(cache[0][1], -ref_k[:, :, -3:])
        assert cache.keys[0].shape[2] <= 7
    assert cache.length == ref_k.shape[2]
