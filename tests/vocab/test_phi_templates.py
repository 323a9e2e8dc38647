"""Templates phi, phi4 and phi4_mini give LLaMA-Factory 0.9.5's ids and labels on a Phi-4-like byte-level vocabulary,
and the exported chat template, rendered by transformers, gives them back.

The vocabulary: Phi-4's is cl100k-like byte-level BPE, not on PyPI; tests/helpers/hf_vocab.py's small byte-level BPE
with Phi's special tokens (<|endoftext|>, <|im_start|>, <|im_sep|>, <|im_end|>, <|system|>, <|user|>, <|assistant|>,
<|end|>, Phi-4's pad <|dummy_85|>), checked here against transformers' AutoTokenizer of the same folder.

Golden: LLaMA-Factory's Template._encode (src/llamafactory/data/template.py:132-170: turn 0 is format_prefix +
format_system (when there is a system prompt) + format_user, every other turn its own formatter) with the phi, phi4
and phi4_mini formatters (:1886-1927), re-typed in LF_FORMATS, each turn's elements turned into ids by
Template._convert_elements_to_ids (:113-130: a string element encoded whole with add_special_tokens=False, which
splits it at the added tokens) on AutoTokenizer; labels as processor/supervised.py:79-96 (lf_example).
"""
from __future__ import annotations

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import TEMPLATES
from pipeline.data.tokenize import encode_example, encode_prompt
from tests.helpers.hf_vocab import SMALL_ADDED
from tests.vocab.chat_render import render
from tests.vocab.test_chat_template import messages
from tests.vocab.test_sentencepiece_templates import ANSWER, HISTORY, QUERY, SYSTEM, lf_example, lf_ids, row

transformers = pytest.importorskip("transformers")

# (format_system, format_user, format_assistant) of LLaMA-Factory 0.9.5's template.py, slot {{content}} as {}
LF_FORMATS = {
    "phi": ("<|system|>\n{}<|end|>\n", "<|user|>\n{}<|end|>\n<|assistant|>\n", "{}<|end|>\n"),
    "phi4": ("<|im_start|>system<|im_sep|>{}<|im_end|>",
             "<|im_start|>user<|im_sep|>{}<|im_end|><|im_start|>assistant<|im_sep|>", "{}<|im_end|>"),
    "phi4_mini": ("<|system|>{}<|end|>", "<|user|>{}<|end|><|assistant|>", "{}<|end|>"),
}


@pytest.fixture(scope="module")
def golden(phi_dir):  # phi_dir: tests/vocab/conftest.py
    return transformers.AutoTokenizer.from_pretrained(phi_dir)


def lf_pairs(golden, name: str, pairs: list[tuple[str, str]], system: str | None):
    """Template._encode's (prompt, answer) ids per turn: each formatter's string one element (no prefix: these
    templates have none)."""
    fmt_system, fmt_user, fmt_assistant = LF_FORMATS[name]
    out = []
    for k, (query, answer) in enumerate(pairs):
        prompt = [fmt_system.format(system)] if k == 0 and system else []
        prompt.append(fmt_user.format(query))
        out.append(([t for element in prompt for t in lf_ids(golden, [(element, "")])[0][0]],
                    lf_ids(golden, [(fmt_assistant.format(answer), "")])[0][0]))
    return out


def test_the_fixture_tokenizes_as_transformers(phi_dir, golden):
    """Our tokenizer of the folder: the special tokens' ids, BOS / EOS / pad as the configs name them, and plain text's
    ids equal AutoTokenizer's."""
    ours = load_tokenizer(phi_dir)
    for token, _ in SMALL_ADDED["phi4"]:
        assert ours.token_id(token) == golden.convert_tokens_to_ids(token) is not None
    assert (ours.bos_id, ours.eos_id) == (golden.bos_token_id, golden.eos_token_id)
    assert golden.convert_ids_to_tokens(golden.pad_token_id) == "<|dummy_85|>"
    for text in (QUERY, ANSWER, "  two  spaces\n\nand tabs\t!", "The model's 12 answers."):
        assert ours.encode(text) == golden.encode(text, add_special_tokens=False), text


@pytest.mark.parametrize("name", list(LF_FORMATS))
def test_conversations_are_llamafactorys(phi_dir, golden, name):
    """System prompt or none, three turns; the labels with mask_history and train_on_prompt too; the prompt that
    eval and chat generate from is the training prompt."""
    ours = load_tokenizer(phi_dir)
    for system in (SYSTEM, None):
        pairs = lf_pairs(golden, name, [*HISTORY, (QUERY, ANSWER)], system)
        for flags in ({}, {"mask_history": True}, {"train_on_prompt": True}):
            got = encode_example(row(system), name, ours, cutoff_len=4096, **flags)
            assert (got.input_ids, got.labels) == lf_example(pairs, **flags), (system, flags)
        prompt = [t for p, a in pairs[:-1] for t in p + a] + pairs[-1][0]
        assert encode_prompt(name, QUERY, system=system, history=HISTORY, tokenizer=ours) == prompt
    # each answer ends at the template's end token (replace_eos: its stop word), one id
    end = golden.convert_tokens_to_ids(TEMPLATES[name].stop_words[0])
    assert end in pairs[0][1] and pairs[0][1].count(end) == 1


@pytest.mark.parametrize("name", list(LF_FORMATS))
def test_the_exported_chat_template_gives_the_training_ids(phi_dir, name):
    """transformers' apply_chat_template with the chat template merge / export write: the generation prompt is
    encode_prompt's, a whole conversation the training row's ids (mask_history's rendering)."""
    assert_export_gives_training_ids(phi_dir, name)


def assert_export_gives_training_ids(directory, name: str) -> None:
    """With and without a system prompt, template `name`'s chat template rendered by transformers on the vocabulary
    in `directory` gives encode_prompt's ids (generation prompt) and the whole mask_history training row."""
    ours = load_tokenizer(directory)
    template = TEMPLATES[name]
    assert template.vocabulary_problem(ours) is None
    for system in (SYSTEM, None):
        want = encode_prompt(template, QUERY, system=system, history=HISTORY, tokenizer=ours)
        assert render(directory, template, messages(system, HISTORY, QUERY)) == want
        whole = encode_example(row(system), template, ours, cutoff_len=4096, mask_history=True).input_ids
        assert render(directory, template, messages(system, HISTORY, QUERY, ANSWER), add_generation_prompt=False) == \
            whole


def test_a_vocabulary_without_the_markup_is_refused_with_the_fix(vocab_dirs):
    """Qwen's vocabulary has <|im_start|> / <|im_end|> but no <|im_sep|>: phi4 is refused, naming the token."""
    problem = TEMPLATES["phi4"].vocabulary_problem(load_tokenizer(vocab_dirs["qwen3"]))
    assert problem is not None and "<|im_sep|>" in problem and "<|im_start|>" not in problem
