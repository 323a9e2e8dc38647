"""Dynamic NTK rotary scaling (rope_scaling dynamic) against transformers.

Golden values: transformers' ROPE_INIT_FUNCTIONS["dynamic"] for the frequencies, and Llama / Qwen2
ForCausalLM (written by save_pretrained with rope_scaling dynamic) for logits of a sequence of calls on one model
(transformers' dynamic_rope_update keeps a length per model, so the order of calls is part of the input) and for
greedy generation past max_position_embeddings with and without the KV cache.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.config import read_config
from pipeline.model.generate import generate
from pipeline.model.rope import rope_inv_freq
from pipeline.model.weights import load_model
from tests.acceptance.harness import assert_close, hf_model

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

VOCAB, WINDOW = 256, 16
SHAPE = dict(vocab_size=VOCAB, max_position_embeddings=WINDOW, rope_theta=10000.0)  # over tests.acceptance's tiny


def _checkpoint(tmp_path, family: str, factor: float = 2.0):
    """A random transformers model with rope_scaling dynamic, saved as a user has it; the model is the reference
    (noise 0.3: at 0.1 this tiny model's greedy output repeats one or two tokens)."""
    ref = hf_model(family, noise=0.3, **SHAPE, rope_scaling={"rope_type": "dynamic", "factor": factor})
    ref.save_pretrained(tmp_path / "base")
    assert ref.model.rotary_emb.rope_type == "dynamic"
    return tmp_path / "base", ref


@pytest.mark.parametrize("factor", [2.0, 3.5])
def test_frequencies_equal_transformers_at_and_past_the_context(tmp_path, factor):
    _, ref = _checkpoint(tmp_path, "llama", factor)
    config = ref.config
    cfg = read_config(tmp_path / "base")
    assert cfg.rope_scaling == {"type": "dynamic", "factor": factor} and cfg.dynamic_rope
    for length in (1, WINDOW, WINDOW + 1, 40, 1000):
        want, scale = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=torch.tensor(length))
        assert scale == 1.0 and torch.equal(rope_inv_freq(cfg, None, length), want), length


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_logits_of_a_sequence_of_calls_equal_transformers(tmp_path, family):
    """Short (plain frequencies), past the window (rescaled for 40), 24 positions (still 40's frequencies: the
    length only grows), then short again (back to the plain ones), each against the same call in transformers."""
    path, ref = _checkpoint(tmp_path, family)
    ours = load_model(path).eval()
    gen = torch.Generator().manual_seed(1)
    calls = [torch.randint(0, VOCAB, (2, n), generator=gen) for n in (8, 40, 24, 8)]
    with torch.no_grad():
        wants = [ref(x).logits for x in calls]
        for x, want in zip(calls, wants):
            assert_close(want, ours(x), rel=1e-5)
        fresh = load_model(path).eval()(calls[2])  # the same 24 tokens on a model that never saw 40
        assert (fresh - wants[2]).abs().max() > 1e-2


def test_greedy_generation_past_the_window_equals_transformers_with_and_without_cache(tmp_path):
    """With the cache each step past the window recomputes the frequencies for its position while the cached keys
    keep the rotation they were made with; without it every step re-rotates the whole sequence. The two differ,
    in transformers as here, and each equals transformers' own."""
    path, ref = _checkpoint(tmp_path, "qwen2")
    ours = load_model(path).eval()
    prompt = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))[0].tolist()
    with torch.no_grad():
        expected = {cache: ref.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None,
                                        pad_token_id=0, use_cache=cache)[0, 10:].tolist() for cache in (True, False)}
    assert len(expected[True]) == 24 and len(set(expected[True])) > 3  # 34 positions: past the window of 16
    assert expected[True] != expected[False]
    for cache in (True, False):
        assert generate(ours, prompt, max_new_tokens=24, eos_id=None, use_cache=cache) == expected[cache], cache


def test_a_dynamic_dict_without_its_factor_names_file_and_key(tmp_path):
    config = hf_model("qwen2", **SHAPE).config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "dynamic"}}))
    with pytest.raises(UserError) as err:
        read_config(tmp_path)
    assert any("rope_scaling.factor is missing or not a number (rope_type dynamic needs it)" in m
               for m in err.value.messages), err.value.messages


def test_a_left_padded_batch_past_the_window_equals_transformers(tmp_path):
    """Two prompts of 10 and 5 tokens, left-padded into one batch, 16 new tokens each (26 positions: past the
    window of 16). transformers' dynamic_rope_update takes max(position_ids) + 1 over the whole batch, so the short
    row runs with the frequencies of the long one's length (it answers otherwise alone); generate counts positions
    over real tokens and does the same, with and without the cache."""
    path, ref = _checkpoint(tmp_path, "llama")
    ours = load_model(path).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, VOCAB, (n,), generator=gen).tolist() for n in (10, 5)]
    ids = torch.tensor([prompts[0], [0] * 5 + prompts[1]])
    mask = (torch.arange(10) >= torch.tensor([[0], [5]])).long()  # transformers' left padding: the same batch
    with torch.no_grad():
        expected = {cache: ref.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                        eos_token_id=None, pad_token_id=0, use_cache=cache)[:, 10:].tolist()
                    for cache in (True, False)}
        alone = ref.generate(torch.tensor([prompts[1]]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, 5:].tolist()
    assert alone != expected[True][1]  # the batch's length rescales the short row: what is checked here
    for cache in (True, False):
        assert generate(ours, prompts, max_new_tokens=16, eos_id=None, use_cache=cache) == expected[cache], cache
