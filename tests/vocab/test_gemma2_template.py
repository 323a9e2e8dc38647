"""Template gemma2 as LLaMA-Factory 0.9.5 registers it gives its ids and labels on Gemma's tokenizer form
(tests/helpers/gemma_vocab.py), and the exported chat template, rendered by transformers, gives them back.

Golden: LLaMA-Factory's gemma2 (src/llamafactory/data/template.py:981-994, "copied from gemma template"): gemma's
formatters (test_gemma_templates.lf_texts: BOS, the system prompt and a blank line opening the first user turn,
"<start_of_turn>user\\n...<end_of_turn>\\n<start_of_turn>model\\n", the answer then "<end_of_turn>\\n") under
Llama2Template, stop_words ["<eos>", "<end_of_turn>"], efficient_eos=True and no replace_eos, so the EOS is the
tokenizer's (<eos>, id 1): the supervised processor labels each later prompt's first token with it and appends a trained
one (processor/supervised.py:68-104, re-typed in test_glm4_template.lf_efficient_example); train_on_prompt is refused
with efficient_eos (template.py:643-644). Generation stops at both stop words (<eos> 1, <end_of_turn> 106).
"""
from __future__ import annotations

import pytest

from pipeline.data.templates import TEMPLATES
from pipeline.data.tokenize import encode_example, encode_prompt
from tests.vocab.test_gemma_templates import gemma, lf_texts  # noqa: F401 (gemma: the module's tokenizer fixture)
from tests.vocab.test_glm4_template import lf_efficient_example
from tests.vocab.test_phi_templates import assert_export_renders_the_training_ids
from tests.vocab.test_sentencepiece_templates import ANSWER, HISTORY, QUERY, SYSTEM, lf_ids

transformers = pytest.importorskip("transformers")


def test_gemma2_is_gemma_with_efficient_eos():
    """LLaMA-Factory's strings and flags, field by field against gemma's. Failed before: template 'gemma2' was not
    known."""
    gemma2, gemma_ = TEMPLATES["gemma2"], TEMPLATES["gemma"]
    assert (gemma2.prefix, gemma2.system, gemma2.user, gemma2.assistant, gemma2.observation) == \
        (gemma_.prefix, gemma_.system, gemma_.user, gemma_.assistant, gemma_.observation)
    assert (gemma2.stop_words, gemma2.replace_eos, gemma2.efficient_eos, gemma2.system_in_content) == \
        (("<eos>", "<end_of_turn>"), False, True, True)


def test_conversations_are_llamafactorys(gemma):  # noqa: F811
    """System prompt or none, three turns, mask_history or not: LLaMA-Factory's ids, the EOS (1) as the label of each
    later prompt's first token (<start_of_turn>) and a trained EOS at the end; the prompt eval and chat generate from
    is the training prompt; generation stops at <eos> and <end_of_turn>."""
    _, golden, ours = gemma
    row = {"instruction": QUERY, "input": "", "output": ANSWER, "history": [list(h) for h in HISTORY]}
    for system in (SYSTEM, None):
        pairs = lf_ids(golden, lf_texts([*HISTORY, (QUERY, ANSWER)], system))
        for flags in ({}, {"mask_history": True}):
            got = encode_example({**row, "system": system}, "gemma2", ours, cutoff_len=4096, **flags)
            assert (got.input_ids, got.labels) == lf_efficient_example(pairs, 1, **flags), (system, flags)
        prompt = [t for p, a in pairs[:-1] for t in p + a] + pairs[-1][0]
        assert encode_prompt("gemma2", QUERY, system=system, history=HISTORY, tokenizer=ours) == prompt
    got = encode_example({**row, "system": None}, "gemma2", ours, cutoff_len=4096)
    relabelled = [i for i, (t, y) in enumerate(zip(got.input_ids, got.labels)) if y == 1 and t != 1]
    assert [got.input_ids[i] for i in relabelled] == [105, 105] and got.input_ids[-3:] == [106, 107, 1]
    assert set(TEMPLATES["gemma2"].stop_ids(ours)) == {1, 106}


def test_exported_chat_template_gives_the_training_ids(gemma):  # noqa: F811
    """apply_chat_template with the chat template merge / export write: the generation prompt is encode_prompt's, a
    whole conversation the training row's ids (its final EOS too)."""
    assert_export_renders_the_training_ids(gemma[0], "gemma2")
