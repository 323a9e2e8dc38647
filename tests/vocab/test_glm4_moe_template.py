"""Template glm4_moe (GLM-4.5 / GLM-4.6) gives LLaMA-Factory 0.9.5's ids and labels on the GLM-4-like byte-level
vocabulary of test_glm4_template, and the exported chat template, rendered by transformers, gives them back.

LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:1095-1108 registers glm4_moe with glm4's strings (:1081-1092:
prefix "[gMASK]<sop>", system "<|system|>\\n{{content}}", user "<|user|>\\n{{content}}<|assistant|>", assistant
"\\n{{content}}", observation, stop words <|user|> / <|observation|>, efficient_eos) as a ReasoningTemplate (:439-475:
the empty thought's ids in front of each answer without one; the last one only under mask_history): glmz1's
(:1178-1191) strings and class, with tool_format glm4_moe (GLM4MOEToolUtils) where glmz1 has glm4. So glm4_moe is
glmz1's template with another tool format (its function calling: tests/data/test_templates_deepseek_glm_tools.py).
extras/constants.py:943-963 registers GLM-4.5-Air / GLM-4.5 (-Base) with template glm4_moe. Golden: the ids of
test_glm4_template's lf_pairs / lf_efficient_example (Template._encode and _encode_data_example re-typed there).
"""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import TEMPLATES
from pipeline.data.tokenize import encode_example, encode_prompt
from tests.vocab.test_glm4_template import assert_export_renders_prompt_and_text, lf_efficient_example, lf_pairs
from tests.vocab.test_sentencepiece_templates import ANSWER, HISTORY, QUERY, SYSTEM, row

transformers = pytest.importorskip("transformers")
THOUGHT = "<think>\n\n</think>\n\n"  # ReasoningTemplate's empty thought (template.py:439-475, the default words)


@pytest.fixture(scope="module")
def golden(glm_dir):  # glm_dir: tests/vocab/conftest.py
    return transformers.AutoTokenizer.from_pretrained(glm_dir)


def test_glm4_moe_is_glmz1_but_for_the_tool_format():
    """The strings LLaMA-Factory's glm4_moe and glmz1 share (template.py:1095-1108 against :1178-1191)."""
    ours, z1 = TEMPLATES["glm4_moe"], TEMPLATES["glmz1"]
    assert dataclasses.replace(ours, name="glmz1", description=z1.description, tool_format="glm4") == z1
    assert ours.tool_format == "glm4_moe" and ours.efficient_eos and ours.thought_words == z1.thought_words


def test_conversations_are_llamafactorys(glm_dir, golden):
    """System prompt or none, three turns, mask_history or not: LLaMA-Factory's ids and efficient_eos labels with the
    empty thoughts; the prompt eval and chat generate from is the training prompt (no thoughts in the history)."""
    ours = load_tokenizer(glm_dir)
    for system in (SYSTEM, None):
        for flags in ({}, {"mask_history": True}):
            pairs = lf_pairs(golden, [*HISTORY, (QUERY, ANSWER)], system, THOUGHT, last_only=bool(flags))
            got = encode_example(row(system), "glm4_moe", ours, cutoff_len=4096, **flags)
            assert (got.input_ids, got.labels) == lf_efficient_example(pairs, golden.eos_token_id, **flags)
        pairs = lf_pairs(golden, [*HISTORY, (QUERY, ANSWER)], system)
        assert encode_prompt("glm4_moe", QUERY, system=system, history=HISTORY, tokenizer=ours) == \
            [t for p, a in pairs[:-1] for t in p + a] + pairs[-1][0]


def test_the_exported_chat_template_gives_the_training_prompt_and_text(glm_dir):
    """transformers' apply_chat_template with the exported chat template: the generation prompt is encode_prompt's
    ids, a whole conversation the training row's text (as glmz1's: test_glm4_template says why text, not ids)."""
    assert_export_renders_prompt_and_text(glm_dir, "glm4_moe")



def test_an_empty_tools_column_renders_as_training_renders_it(glm_dir):
    """A row whose tools column is "[]" (a non-empty string): LLaMA-Factory's ReasoningTemplate._encode
    (template.py:348-358, `if system or tools`) opens the system block with the empty tool text (ToolFormatter.apply
    gives "" for an empty list, formatter.py:149-153): "[gMASK]<sop><|system|>\\n" before the user's turn. The export's
    chat template, rendered by transformers with `tools=[]`, must give the same ids, a system message beside it too."""
    template, tokenizer = TEMPLATES["glm4_moe"], load_tokenizer(glm_dir)
    from tests.vocab.chat_render import render

    for system in (None, SYSTEM):
        built = {"instruction": QUERY, "input": "", "output": ANSWER, "system": system, "tools": "[]", "history": []}
        want = encode_example(built, "glm4_moe", tokenizer, cutoff_len=4096, mask_history=True)
        head = [{"role": "system", "content": system}] if system else []
        msgs = [*head, {"role": "user", "content": QUERY}, {"role": "assistant", "content": ANSWER}]
        text = render(glm_dir, template, msgs, tools=[], add_generation_prompt=False, tokenize=False)
        assert text.startswith(f"[gMASK]<sop><|system|>\n{system or ''}<|user|>\n{QUERY}<|assistant|>"), text
        assert render(glm_dir, template, msgs, tools=[], add_generation_prompt=False) == want.input_ids, text
