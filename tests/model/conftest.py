"""Fixtures for the model tests: random GPT-2s in the Hugging Face layout, written by transformers itself."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

TINY_HF = dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=50257)


def hf_gpt2(seed: int = 0, **overrides):
    """A random transformers GPT2LMHeadModel (eval mode, fp32). Every tensor gets N(0, 0.1) noise: biases and
    norms leave their init values (a loader that skipped them could not pass) and greedy decoding does not
    collapse into repeating one token (as GPT-2's tiny init does), so token-for-token parity means something."""
    config = transformers.GPT2Config(**{**TINY_HF, **overrides})
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory):
    """(directory, model): a tiny random GPT-2 saved by save_pretrained (safetensors, `transformer.` keys)."""
    model = hf_gpt2()
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="session")
def make_hf():
    """The hf_gpt2 factory, as a fixture (test modules do not import conftest)."""
    return hf_gpt2
