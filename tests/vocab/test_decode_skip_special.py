"""skip_special_tokens (LLaMA-Factory's generation key, default true): answers are decoded without the special
tokens, as transformers' decode(skip_special_tokens=True); added tokens that are not special (Qwen3's <think>) stay.

Golden: the `tokenizers` library's decode on the same tokenizer.json."""
from __future__ import annotations

import pytest

from pipeline.data.model_tokenizer import load_tokenizer


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_decode_skips_special_tokens_as_tokenizers_does(vocab_dirs, hf_reference, family):
    ours = load_tokenizer(vocab_dirs[family])
    text = {"qwen3": "<|im_start|>assistant\n<think>\nhm\n</think>\n\nYes.<|im_end|><|endoftext|>",
            "llama3": "<|start_header_id|>assistant<|end_header_id|>\n\nYes.<|eot_id|><|end_of_text|>"}[family]
    ids = ours.encode_special(text)
    reference = hf_reference(vocab_dirs[family])
    assert ours.decode(ids, skip_special=True) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids) == text == reference.decode(ids, skip_special_tokens=False)
    if family == "qwen3":
        assert "<think>" in ours.decode(ids, skip_special=True) and "<|im_end|>" not in ours.decode(ids, True)


def test_skip_special_tokens_is_a_generation_key_on_by_default():
    from pipeline.recipe.args import GenerationArgs

    assert GenerationArgs.from_recipe({}).skip_special_tokens is True
    off = GenerationArgs.from_recipe({"skip_special_tokens": False})
    assert off.settings()["skip_special_tokens"] is False and "skip_special_tokens" not in \
        GenerationArgs.from_recipe({}).settings()
