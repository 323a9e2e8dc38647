"""Templates granite3 and olmo give LLaMA-Factory 0.9.5's ids and labels on small byte-level vocabularies with Granite
3.x's and OLMo 2's special tokens, and the exported chat template, rendered by transformers, gives them back.

The vocabularies: Granite's (49,155 rows) and OLMo 2's (cl100k-based, 100,352 rows) are not on PyPI;
tests/helpers/hf_vocab.py's small byte-level BPE with their special tokens (Granite: <|end_of_text|> as BOS / EOS / pad,
<|start_of_role|>, <|end_of_role|>, <|tool_call|>; OLMo 2: <|endoftext|> as BOS / EOS, pad <|pad|>, <|user|> /
<|assistant|> left as text as in OLMo 2's tokenizer.json), checked here against AutoTokenizer of the same folder.

OLMo 2: LLaMA-Factory 0.9.5 registers no OLMo 2 model group and no olmo2 template; its one OLMo template, olmo
(template.py:1820-1824), is what a LLaMA-Factory user names, so that is the one written and tested here.

Golden: LLaMA-Factory's Template._encode (src/llamafactory/data/template.py:132-170: turn 0 is format_prefix +
format_system (when there is a system prompt) + format_user, every other turn its own formatter) with the granite3
(:1206-1215) and olmo (:1820-1824; format_prefix [{"eos_token"}], the default format_system ["{{content}}"] and
format_assistant ["{{content}}", {"eos_token"}] of register_template, :534-547) formatters, re-typed in LF_FORMATS,
each turn's elements turned into ids by Template._convert_elements_to_ids (:113-130) on AutoTokenizer; labels as
processor/supervised.py:79-96 (lf_example).
"""
from __future__ import annotations

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import TEMPLATES
from pipeline.data.tokenize import encode_example, encode_prompt
from tests.helpers.hf_vocab import SMALL_ADDED
from tests.vocab.test_phi_templates import assert_export_renders_the_training_ids
from tests.vocab.test_sentencepiece_templates import ANSWER, HISTORY, QUERY, SYSTEM, lf_example, lf_ids, row

transformers = pytest.importorskip("transformers")

# (format_prefix, format_system, format_user, format_assistant) of LLaMA-Factory 0.9.5's template.py, slot
# {{content}} as {}, the eos_token element as {eos}
LF_FORMATS = {
    "granite3": ("", "<|start_of_role|>system<|end_of_role|>{}<|end_of_text|>\n",
                 "<|start_of_role|>user<|end_of_role|>{}<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>",
                 "{}<|end_of_text|>\n"),
    "olmo": ("{eos}", "{}", "<|user|>\n{}<|assistant|>\n", "{}{eos}"),
}
VOCAB = {"granite3": "granite3", "olmo": "olmo2"}


@pytest.fixture(scope="module")
def golden(granite_olmo_dirs):  # granite_olmo_dirs: tests/vocab/conftest.py
    return {name: transformers.AutoTokenizer.from_pretrained(d) for name, d in granite_olmo_dirs.items()}


def lf_pairs(golden, name: str, pairs: list[tuple[str, str]], system: str | None):
    """Template._encode's (prompt, answer) ids per turn, each formatter's output one element."""
    prefix, fmt_system, fmt_user, fmt_assistant = LF_FORMATS[name]
    out = []
    for k, (query, answer) in enumerate(pairs):
        elements = ([prefix] if k == 0 and prefix else []) + ([fmt_system.format(system)] if k == 0 and system else [])
        elements.append(fmt_user.format(query))
        out.append(([t for element in elements for t in lf_ids(golden, [(element, "")])[0][0]],
                    lf_ids(golden, [(fmt_assistant.replace("{}", answer, 1), "")])[0][0]))
    return out


@pytest.mark.parametrize("name", list(LF_FORMATS))
def test_the_fixture_tokenizes_as_transformers(granite_olmo_dirs, golden, name):
    """Our tokenizer of the folder: the special tokens' ids, BOS / EOS as the configs name them, plain text's ids
    equal AutoTokenizer's; OLMo's <|user|> is text."""
    ours, hf = load_tokenizer(granite_olmo_dirs[name]), golden[name]
    for token, _ in SMALL_ADDED[VOCAB[name]]:
        assert ours.token_id(token) == hf.convert_tokens_to_ids(token) is not None
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    for text in (QUERY, ANSWER, "  two  spaces\n\nand tabs\t!", "The model's 12 answers."):
        assert ours.encode(text) == hf.encode(text, add_special_tokens=False), text
    if name == "olmo":
        assert len(hf.encode("<|user|>", add_special_tokens=False)) > 1


@pytest.mark.parametrize("name", list(LF_FORMATS))
def test_conversations_are_llamafactorys(granite_olmo_dirs, golden, name):
    """System prompt or none, three turns; the labels with mask_history and train_on_prompt too; the prompt that
    eval and chat generate from is the training prompt."""
    ours = load_tokenizer(granite_olmo_dirs[name])
    for system in (SYSTEM, None):
        pairs = lf_pairs(golden[name], name, [*HISTORY, (QUERY, ANSWER)], system)
        for flags in ({}, {"mask_history": True}, {"train_on_prompt": True}):
            got = encode_example(row(system), name, ours, cutoff_len=4096, **flags)
            assert (got.input_ids, got.labels) == lf_example(pairs, **flags), (name, system, flags)
        prompt = [t for p, a in pairs[:-1] for t in p + a] + pairs[-1][0]
        assert encode_prompt(name, QUERY, system=system, history=HISTORY, tokenizer=ours) == prompt
    # each answer ends at the tokenizer's EOS, one id (Granite's <|end_of_text|>, then its newline)
    eos = golden[name].eos_token_id
    assert pairs[0][1].count(eos) == 1 and pairs[0][1][-1 if name == "olmo" else -2] == eos


@pytest.mark.parametrize("name", list(LF_FORMATS))
def test_the_exported_chat_template_gives_the_training_ids(granite_olmo_dirs, name):
    """transformers' apply_chat_template with the chat template merge / export write: the generation prompt is
    encode_prompt's, a whole conversation the training row's ids (mask_history's rendering)."""
    assert_export_renders_the_training_ids(granite_olmo_dirs[name], name)


def test_granite3_on_a_vocabulary_without_its_markup_is_refused_naming_it(granite_olmo_dirs):
    """OLMo's vocabulary has none of Granite's role markers: granite3 is refused, naming them; olmo needs none of its
    markup as tokens (text in OLMo 2's vocabulary), so it runs on Granite's too."""
    problem = TEMPLATES["granite3"].vocabulary_problem(load_tokenizer(granite_olmo_dirs["olmo"]))
    assert problem is not None and "<|start_of_role|>" in problem
    assert TEMPLATES["olmo"].vocabulary_problem(load_tokenizer(granite_olmo_dirs["granite3"])) is None
