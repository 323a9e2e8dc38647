"""Decoding: probabilities by hand, greedy parity with transformers, cache, batching, stopping, seeding."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.data.tokenizer import gpt2
from pipeline.model.config import PRESETS
from pipeline.model.generate import cut_at_stop, generate, generate_text, logits_to_probs
from pipeline.model.gpt import GPTModel
from pipeline.model.weights import load_model


@pytest.fixture(scope="module")
def model():
    # untied: a tied random model greedily repeats its last token, which would make the tests below weak
    # a 1000-token vocabulary keeps the output head cheap (ids < 1000 still decode with GPT-2's tokenizer)
    return GPTModel(PRESETS["tiny"].replace(context_length=64, tie_weights=False, vocab_size=1000), seed=11).eval()


def prompt(seed, n, high=1000):
    return torch.randint(0, high, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_temperature_by_hand():
    logits = torch.tensor([1.0, 2.0, 3.0])
    e = [math.exp(2), math.exp(4), math.exp(6)]  # T = 0.5 doubles the logits
    assert torch.allclose(logits_to_probs(logits, 0.5), torch.tensor([x / sum(e) for x in e]), atol=1e-7)
    e1 = [math.exp(1), math.exp(2), math.exp(3)]
    assert torch.allclose(logits_to_probs(logits, 1.0), torch.tensor([x / sum(e1) for x in e1]), atol=1e-7)
    e2 = [math.exp(0.5), math.exp(1), math.exp(1.5)]  # T = 2 halves them
    assert torch.allclose(logits_to_probs(logits, 2.0), torch.tensor([x / sum(e2) for x in e2]), atol=1e-7)
    assert logits_to_probs(logits, 0.5)[2] > logits_to_probs(logits, 1.0)[2] > logits_to_probs(logits, 2.0)[2]
    with pytest.raises(ValueError):
        logits_to_probs(logits, 0.0)


def test_top_k_and_top_p_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    e = [math.exp(2), math.exp(3)]
    assert torch.allclose(logits_to_probs(logits, 1.0, top_k=2), torch.tensor([[0, e[0] / sum(e), e[1] / sum(e), 0]]),
                          atol=1e-7)
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    log = probs.log()
    # mass before each token: 0, .5, .75, .875 -> top_p .7 keeps {.5, .25}; .75 keeps the same; .76 adds one
    assert torch.allclose(logits_to_probs(log, top_p=0.7), torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=1e-6)
    assert torch.allclose(logits_to_probs(log, top_p=0.75), torch.tensor([2 / 3, 1 / 3, 0, 0]), atol=1e-6)
    assert torch.allclose(logits_to_probs(log, top_p=0.76), torch.tensor([4 / 7, 2 / 7, 1 / 7, 0]), atol=1e-6)
    assert torch.allclose(logits_to_probs(log, top_p=0.1), torch.tensor([1.0, 0, 0, 0]))


def test_greedy_matches_transformers_token_for_token(hf_dir):
    path, ref = hf_dir
    ours = load_model(path).eval()
    p = prompt(0, 7, high=50000)
    expected = ref.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, pad_token_id=50256)[0, 7:].tolist()
    assert 50256 not in expected and len(set(expected)) > 5  # a varied continuation, not one token repeated
    assert generate(ours, p, max_new_tokens=20) == expected


def test_last_only_is_the_last_column_of_the_full_logits(model):
    ids = torch.tensor([prompt(5, 12), prompt(6, 12)])
    with torch.no_grad():
        full, _ = model(ids, use_cache=True)
        last, _ = model(ids, use_cache=True, last_only=True)
    assert last.shape == (2, 1, 1000)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_kv_cache_equals_no_cache_and_top_k_1_equals_greedy(model):
    p = prompt(1, 9)
    cached = generate(model, p, max_new_tokens=24)
    assert len(cached) == 24
    assert generate(model, p, max_new_tokens=24, use_cache=False) == cached
    assert generate(model, p, max_new_tokens=24, do_sample=True, top_k=1, seed=3, temperature=5.0) == cached


def test_batched_left_padded_equals_unbatched(model):
    prompts = [prompt(2, 3), prompt(3, 11), prompt(4, 6)]
    single = [generate(model, p, max_new_tokens=12) for p in prompts]
    assert generate(model, prompts, max_new_tokens=12) == single
    assert generate(model, prompts, max_new_tokens=12, use_cache=False) == single
    sampled = generate(model, prompts, max_new_tokens=8, do_sample=True, top_k=1, seed=0)
    assert sampled == [s[:8] for s in single]


def test_seeded_sampling_is_reproducible(model):
    p = prompt(5, 5)
    a = generate(model, p, max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    torch.manual_seed(123)  # the global RNG does not matter
    b = generate(model, p, max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    c = generate(model, p, max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, seed=8)
    assert a == b and a != c


def test_stops_at_eos_and_stop_ids(model):
    p = prompt(6, 4)
    free = generate(model, p, max_new_tokens=10)
    # declare one of the model's own later greedy tokens the EOS: generation must stop right before it
    later = next(t for t in free if t != free[0])
    expected = free[:free.index(later)]
    assert expected and generate(model, p, max_new_tokens=10, eos_id=later) == expected
    assert generate(model, p, max_new_tokens=10, eos_id=None, stop_ids=[later]) == expected
    assert model.training is False


def test_stop_strings_and_generate_text():
    model = GPTModel(PRESETS["tiny"].replace(context_length=64, tie_weights=False), seed=11).eval()  # full vocab
    tok = gpt2()
    p = tok.encode("Once upon a time")
    free = generate(model, p, max_new_tokens=12)
    text = tok.decode(free)
    stop = tok.decode(free[6:8])
    assert stop and stop in text
    got = generate(model, p, max_new_tokens=12, stop_strings=[stop], tokenizer=tok)
    assert got == free[:len(got)] and stop in tok.decode(got) and len(got) <= 8
    completion = generate_text(model, tok, tok.decode(p), max_new_tokens=12, stop_strings=[stop])
    assert completion == text[:text.index(stop)]
    assert cut_at_stop("a###b###", ["###", "b"]) == "a"


def test_long_prompt_is_cut_and_context_respected(model, capsys):
    p = prompt(8, 100)  # context 64
    out = generate(model, p, max_new_tokens=10)
    assert len(out) == 10
    assert out == generate(model, p[-54:], max_new_tokens=10)
    assert "cut from the left" in capsys.readouterr().err
    assert len(generate(model, p[:60], max_new_tokens=50)) == 32  # context//2 of prompt kept, 32 new tokens fit


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers_token_for_token(hf_dir, model, penalty):
    """LLaMA-Factory's repetition_penalty (transformers' RepetitionPenaltyLogitsProcessor: a seen token's logit is
    divided by the penalty when positive, multiplied when negative) was an unknown key; greedy must give the tokens
    transformers gives, and a penalty other than 1 must change the output."""
    path, ref = hf_dir
    ours = load_model(path).eval()
    p = prompt(0, 7, high=50000)
    expected = ref.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False, pad_token_id=50256,
                            repetition_penalty=penalty)[0, 7:].tolist()
    assert generate(ours, p, max_new_tokens=20, repetition_penalty=penalty) == expected
    assert expected != generate(ours, p, max_new_tokens=20)
    batch = [prompt(1, 5), prompt(2, 9)]  # left padding: the pads are not tokens the penalty has seen
    assert generate(model, batch, max_new_tokens=8, repetition_penalty=penalty) == [
        generate(model, b, max_new_tokens=8, repetition_penalty=penalty) for b in batch]
