"""Templates qwen2_vl, qwen3_vl and qwen3_vl_nothink (LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:2072-2121)
on the real Qwen vocabularies: ids and labels written out by hand from LLaMA-Factory's formatters, the markup tokens'
published ids and the `tokenizers` library for the text between them (as tests/vocab/test_template_masks_real.py).

Re-typed from template.py:
- qwen2_vl (:2072-2087): format_user "<|im_start|>user\\n{{content}}<|im_end|>\\n<|im_start|>assistant\\n",
  format_assistant "{{content}}<|im_end|>\\n", format_system "<|im_start|>system\\n{{content}}<|im_end|>\\n",
  default_system "You are a helpful assistant.", stop_words ["<|im_end|>"], replace_eos: qwen's strings (:1945-1958)
  with another default system prompt;
- qwen3_vl (:2090-2104): qwen3's (:1962-1976) strings and ReasoningTemplate; qwen3_vl_nothink (:2107-2121):
  qwen3_nothink's (:1979-1992). Each element encoded alone (Template._convert_elements_to_ids, :113-130); labels
  the answers (processor/supervised.py:79-96).
The exported chat templates of all three are checked by tests/vocab/test_chat_template.py's every-template tests on
the same vocabularies.
"""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import TEMPLATES
from pipeline.data.tokenize import encode_example
from tests.vocab import test_template_masks_real as real
from tests.vocab.test_template_masks_real import IE, IS, M, ROW

enc = real.enc  # the fixture: a family's text -> ids by the `tokenizers` library


@pytest.fixture(scope="module")
def example(vocab_dirs):
    """(family, template, row, **flags) -> encode_example on the family's real vocabulary, loaded once: Qwen3's, the
    Qwen2 / Qwen2.5 BPE with <think> / </think> (tests/vocab/test_template_masks_real.py runs qwen2_vl on Qwen2's)."""
    loaded = {family: load_tokenizer(vocab_dirs[family]) for family in ("qwen3",)}
    return lambda family, template, row, **kw: encode_example(row, template, loaded[family], cutoff_len=4096, **kw)


def test_qwen2_vl_is_qwen_with_its_own_default_system_prompt(example, enc):
    """Its ids and labels: tests/vocab/test_template_masks_real.py's qwen case; here: mask_history, a row's own system
    prompt, and nothing but the default system prompt differs from qwen."""
    e = lambda text: enc("qwen3", text)  # noqa: E731
    p2_a2 = [IS] + e("user\nHi") + [IE] + e("\n") + [IS] + e("assistant\n") + e("Yo") + [IE] + e("\n")
    masked = example("qwen3", "qwen2_vl", ROW, mask_history=True)
    assert masked.input_ids[-len(p2_a2):] == p2_a2 and masked.labels[-3:] == e("Yo") + [IE] + e("\n")
    assert set(masked.labels[:-3]) == {M}
    given = example("qwen3", "qwen2_vl", {**ROW, "system": "S"})
    assert given.input_ids[:len(e("system\nS")) + 2] == [IS] + e("system\nS") + [IE]
    assert dataclasses.replace(TEMPLATES["qwen2_vl"], name="qwen", default_system=TEMPLATES["qwen"].default_system,
                               description=TEMPLATES["qwen"].description) == TEMPLATES["qwen"]


def test_qwen3_vl_templates_are_qwen3s(example, enc):
    """qwen3_vl: qwen3's empty thought in front of an answer without one (trained); qwen3_vl_nothink: plain ChatML."""
    e = lambda text: enc("qwen3", text)  # noqa: E731
    p1 = [IS] + e("user\nQ") + [IE] + e("\n") + [IS] + e("assistant\n")
    p2 = [IS] + e("user\nHi") + [IE] + e("\n") + [IS] + e("assistant\n")
    a1 = e("A") + [IE] + e("\n")
    a2 = e("Yo") + [IE] + e("\n")
    empty = e("<think>\n\n</think>\n\n")
    thinking = example("qwen3", "qwen3_vl", ROW, mask_history=True)
    assert thinking.input_ids == p1 + a1 + p2 + empty + a2
    assert thinking.labels == [M] * len(p1 + a1 + p2) + empty + a2
    plain = example("qwen3", "qwen3_vl_nothink", ROW)
    assert plain.input_ids == p1 + a1 + p2 + a2 and plain.labels == [M] * len(p1) + a1 + [M] * len(p2) + a2
    for vl, text in (("qwen3_vl", "qwen3"), ("qwen3_vl_nothink", "qwen3_nothink")):
        assert dataclasses.replace(TEMPLATES[vl], name=text, description=TEMPLATES[text].description) \
            == TEMPLATES[text]
