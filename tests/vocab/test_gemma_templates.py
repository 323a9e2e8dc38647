"""Gemma's tokenizer form (tests/helpers/gemma_vocab.py) reads as transformers' AutoTokenizer (GemmaTokenizer) reads it,
and the templates gemma / gemma3 give LLaMA-Factory 0.9.5's ids and labels; the exported chat template, rendered by
transformers, gives them back.

Golden: LLaMA-Factory's Llama2Template._encode (src/llamafactory/data/template.py:341-373) with the gemma formatters
(:966-978; gemma3's, :997-1011, are the same strings): format_prefix [{"bos_token"}], format_user
["<start_of_turn>user\\n{{content}}<end_of_turn>\\n<start_of_turn>model\\n"], format_assistant
["{{content}}<end_of_turn>\\n"], format_system ["{{content}}\\n\\n"] opening the first user content; each element
encoded whole by AutoTokenizer with add_special_tokens=False (Template._convert_elements_to_ids, :113-130), re-typed in
tests/vocab/test_sentencepiece_templates.py's lf_ids / lf_example (labels: processor/supervised.py:79-96).
"""
from __future__ import annotations

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import TEMPLATES
from pipeline.data.tokenize import encode_example, encode_prompt
from tests.helpers.gemma_vocab import write_gemma_tokenizer_dir
from tests.vocab.chat_render import render
from tests.vocab.test_chat_template import messages
from tests.vocab.test_sentencepiece_templates import ANSWER, HISTORY, QUERY, SYSTEM, lf_example, lf_ids

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    """(folder, AutoTokenizer of it, our tokenizer)."""
    folder = write_gemma_tokenizer_dir(tmp_path_factory.mktemp("gemma_tok"))
    return folder, transformers.AutoTokenizer.from_pretrained(folder), load_tokenizer(folder)


def lf_texts(pairs: list[tuple[str, str]], system: str | None) -> list[tuple[str, str]]:
    """Llama2Template._encode's elements per turn with the gemma formatters ("{bos}" marks the set element)."""
    out = []
    for k, (query, answer) in enumerate(pairs):
        system_text = f"{system}\n\n" if k == 0 and system else ""
        out.append((("{bos}" if k == 0 else "") + "<start_of_turn>user\n" + system_text + query
                    + "<end_of_turn>\n<start_of_turn>model\n", answer + "<end_of_turn>\n"))
    return out


def test_the_tokenizer_reads_as_gemma_tokenizer(gemma):
    """GemmaTokenizer's rebuild (no prefix "▁", spaces as "▁", byte fallback) and Gemma's ids."""
    _, golden, ours = gemma
    assert type(golden).__name__ == "GemmaTokenizer"
    for text in ("Hello world!", "  two  spaces\n\nnew", "émoji 🦙 zq", " lead", "tail "):
        assert ours.encode_special(text) == golden.encode(text, add_special_tokens=False), text
    assert (ours.bos_id, ours.eos_id, ours.token_id("<pad>")) == (2, 1, 0)
    assert (ours.token_id("<start_of_turn>"), ours.token_id("<end_of_turn>")) == (105, 106)


@pytest.mark.parametrize("name", ["gemma", "gemma3"])
def test_conversations_are_llamafactorys(gemma, name):
    """System prompt or none, three turns; labels with mask_history and train_on_prompt too; the prompt eval and chat
    generate from is the training prompt. Failed before: template 'gemma' was not known."""
    _, golden, ours = gemma
    row = {"instruction": QUERY, "input": "", "output": ANSWER, "history": [list(h) for h in HISTORY]}
    for system in (SYSTEM, None):
        pairs = lf_ids(golden, lf_texts([*HISTORY, (QUERY, ANSWER)], system))
        for flags in ({}, {"mask_history": True}, {"train_on_prompt": True}):
            got = encode_example({**row, "system": system}, name, ours, cutoff_len=4096, **flags)
            assert (got.input_ids, got.labels) == lf_example(pairs, **flags), (system, flags)
        prompt = [t for p, a in pairs[:-1] for t in p + a] + pairs[-1][0]
        assert encode_prompt(name, QUERY, system=system, history=HISTORY, tokenizer=ours) == prompt
        assert pairs[0][0][:3] == [2, 105, ours.encode_special("user")[0]] and pairs[0][1][-2:] == [106, 107]


@pytest.mark.parametrize("name", ["gemma", "gemma3"])
def test_exported_chat_template_gives_the_training_ids(gemma, name):
    """apply_chat_template with the chat template merge / export write: the prompt (add_generation_prompt) and the
    whole conversation are training's ids, with a system prompt or none."""
    folder, _, ours = gemma
    template = TEMPLATES[name]
    row = {"instruction": QUERY, "input": "", "output": ANSWER, "history": [list(h) for h in HISTORY]}
    for system in (SYSTEM, None):
        prompt = encode_prompt(name, QUERY, system=system, history=HISTORY, tokenizer=ours)
        whole = encode_example({**row, "system": system}, name, ours, cutoff_len=4096).input_ids
        assert render(folder, template, messages(system, HISTORY, QUERY)) == prompt, system
        assert render(folder, template, messages(system, HISTORY, QUERY, ANSWER), add_generation_prompt=False) \
            == whole, system


def test_other_vocabularies_cannot_express_gemma(gemma, sp_folders):
    problem = TEMPLATES["gemma3"].vocabulary_problem(load_tokenizer(sp_folders["mistral_v3"]))
    assert problem and "<start_of_turn>, <end_of_turn>" in problem
    assert TEMPLATES["gemma3"].vocabulary_problem(gemma[2]) is None
