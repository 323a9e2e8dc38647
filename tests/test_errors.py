"""pipeline.errors' message helpers. Golden: the article an English speaker says before each word, by hand."""
from __future__ import annotations

import pytest

from pipeline.errors import article

SAID = {  # the values messages put after the article: sharegpt roles, architectures, model types, sizes, encodings
    "gpt": "a", "assistant": "an", "model": "a", "function_call": "a", "observation": "an", "user": "a",
    "Olmo2ForCausalLM": "an", "LlamaForCausalLM": "a", "olmo2": "an", "gpt2": "a", "HF": "an", "GPU": "a",
    "UTF-16": "a", "8": "an", "11": "an", "18": "an", "80": "an", "1024": "a", "180": "a", "int": "an",
    "pipeline-checkpoint": "a", "one": "a",
}


@pytest.mark.parametrize("word", SAID)
def test_the_article_goes_by_the_sound_of_the_word(word):
    assert article(word) == SAID[word]
