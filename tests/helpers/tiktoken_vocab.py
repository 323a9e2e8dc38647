"""Tiny tiktoken tokenizer.model files (Meta's Llama 3 format: `base64 rank` lines), for tests of a tokenizer read
from one. Usable by any test: `from tests.helpers.tiktoken_vocab import tiktoken_model`."""
from __future__ import annotations

import base64


def tiktoken_model(merged: bytes) -> str:
    """The 256 bytes as ranks 0-255, then `merged` as rank 256: two such files are vocabularies of the same size
    (the same special ids after them) that encode text containing `merged` differently."""
    return "".join(f"{base64.b64encode(bytes([b]) if b < 256 else merged).decode()} {b}\n" for b in range(257))
