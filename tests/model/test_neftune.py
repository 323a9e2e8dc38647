"""NEFTune (neftune_noise_alpha): noisy token embeddings in training forwards only.

Goldens: the noise replaced by a known tensor and the embeddings computed by hand; transformers' own
neftune_post_forward_hook on the same checkpoint (same noise, same logits); the uniform distribution's bound,
mean and spread against alpha / sqrt(L d); eval-mode forwards and generation equal the plain model's.
"""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.model.generate import generate
from pipeline.model.neftune import neftune_noise
from pipeline.model.weights import load_model

ALPHA = 5.0
NO_DROPOUT = {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "vocab_size": 512}


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """(directory, transformers model): a tiny GPT-2 without dropout, written by save_pretrained."""
    from tests.acceptance.harness import write_hf_checkpoint

    path = tmp_path_factory.mktemp("hf") / "gpt2"
    return path, write_hf_checkpoint(path, "gpt2", **NO_DROPOUT)


def known_uniform(self, a=0.0, b=1.0, *, generator=None):
    """uniform_ replaced by a known fill: a + (b - a) * (0, 1/(n-1), ..., 1) over the tensor."""
    ramp = torch.linspace(0.0, 1.0, self.numel(), dtype=torch.float64).view(self.shape)
    return self.copy_(float(a) + (float(b) - float(a)) * ramp)


def first_block_input(model, x):
    """What the first transformer block receives: token (+ position) embeddings, after NEFTune."""
    seen = []
    handle = model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


def test_the_noise_is_added_to_the_embeddings_as_written_by_hand(gpt2, monkeypatch):
    path, _ = gpt2
    model = load_model(path).train()
    model.set_neftune(ALPHA)
    x = torch.randint(0, 512, (2, 6))
    monkeypatch.setattr(torch.Tensor, "uniform_", known_uniform)
    got = first_block_input(model, x)
    bound = ALPHA / math.sqrt(6 * 32)  # L = 6 tokens, d = 32
    ramp = torch.linspace(0.0, 1.0, 2 * 6 * 32, dtype=torch.float64).view(2, 6, 32)
    embeds = model.embed_tokens.weight[x] + model.pos_embed.weight[:6]
    assert torch.allclose(got, (embeds + (-bound + 2 * bound * ramp)).float(), atol=1e-6)


def test_transformers_hook_gives_the_same_model_output(gpt2, monkeypatch):
    """transformers' neftune_post_forward_hook on its GPT-2, ours on the same checkpoint: the same noise (a known
    fill, then torch's generator from one seed) gives the same logits in training mode."""
    from transformers.integrations.neftune import activate_neftune

    path, hf = gpt2
    hf.train()
    handle = activate_neftune(hf, ALPHA)
    ours = load_model(path).train()
    ours.set_neftune(ALPHA)
    x = torch.randint(0, 512, (3, 9))
    try:
        with torch.no_grad():
            for fill in (known_uniform, None):
                with monkeypatch.context() as patch:
                    if fill:
                        patch.setattr(torch.Tensor, "uniform_", fill)
                    torch.manual_seed(11)
                    theirs = hf(x).logits
                    torch.manual_seed(11)
                    mine = ours(x)
                assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-5)
                assert not torch.allclose(mine, load_model(path).eval()(x), atol=1e-3)  # the noise is there
    finally:
        handle.remove()
        hf.eval()


def test_the_noise_is_uniform_within_the_bound():
    torch.manual_seed(0)
    noise = neftune_noise(torch.zeros(4, 64, 32), ALPHA)
    bound = ALPHA / math.sqrt(64 * 32)
    assert noise.abs().max() <= bound and noise.abs().max() > 0.99 * bound
    assert abs(noise.mean().item()) < 0.02 * bound  # standard error: bound / sqrt(3 * 8192) = 0.0064 bound
    assert noise.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)  # U(-a, a): a / sqrt(3)


def test_eval_and_generate_see_no_noise(gpt2):
    path, _ = gpt2
    plain, noisy = load_model(path).eval(), load_model(path).eval()
    noisy.set_neftune(ALPHA)
    x = torch.randint(0, 512, (2, 7))
    with torch.no_grad():
        assert torch.equal(noisy(x), plain(x))
        prompts = [[5, 6, 7], [8, 9]]
        assert generate(noisy, prompts, max_new_tokens=4) == generate(plain, prompts, max_new_tokens=4)
        noisy.train()
        assert not torch.equal(noisy(x), plain(x))
        noisy.set_neftune(None)
        assert torch.equal(noisy(x), plain(x))  # off again (no dropout in this model)
