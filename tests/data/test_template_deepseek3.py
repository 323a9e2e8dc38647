"""Template deepseek3 (DeepSeek-V3 chat) gives LLaMA-Factory 0.9.5's ids and labels on a DeepSeek-V3-like byte-level
vocabulary, and the exported chat template, rendered by transformers, gives back the training text and ids.

LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:820-824 registers deepseek3 with only
format_user "<｜User｜>{{content}}<｜Assistant｜>" and format_prefix {"bos_token"}; everything else is register_template's
default (:533-550): format_system "{{content}}" (the user default), format_assistant ["{{content}}", {"eos_token"}],
a function call in the default tool format with the assistant's slots, a tool result as format_user, no stop words.
:827-833, deepseekr1 ("copied from deepseek3 template"), is the same strings as a ReasoningTemplate.
Golden ids: Template._encode (:132-170: turn 0 is prefix + system (when there is a system prompt or tools) + user,
every other turn its own formatter) with _convert_elements_to_ids (:113-130: strings by encode(add_special_tokens=False),
{"bos_token"} / {"eos_token"} by id) on transformers' AutoTokenizer, re-typed in lf_turns; labels as
SupervisedDatasetProcessor._encode_data_example (processor/supervised.py:58-104, no efficient_eos), re-typed in
tests/vocab/test_sentencepiece_templates.lf_example.

The vocabulary: DeepSeek-V3's 128k rows are not on PyPI; tests/helpers/hf_vocab.py's small byte-level BPE carries its
special tokens as the hub spells them (full-width bars U+FF5C, U+2581 for the space): <｜begin▁of▁sentence｜> (BOS),
<｜end▁of▁sentence｜> (EOS and pad), <｜▁pad▁｜>, <think>, </think>, <｜User｜>, <｜Assistant｜>.
"""
from __future__ import annotations

import dataclasses

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import TEMPLATES
from pipeline.data.tokenize import encode_example, encode_prompt
from tests.data.lf_tool_goldens import GOLDEN, MESSAGES, TOOLS
from tests.helpers.hf_vocab import SMALL_ADDED, write_small_tokenizer_dir
from tests.vocab.chat_render import render
from tests.vocab.test_chat_template import messages
from tests.vocab.test_sentencepiece_templates import ANSWER, HISTORY, QUERY, SYSTEM, lf_example, lf_ids, row

transformers = pytest.importorskip("transformers")
USER, REPLY = "<｜User｜>", "<｜Assistant｜>"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("deepseek_v3_vocab")
    write_small_tokenizer_dir(directory, "deepseek_v3")
    return directory


@pytest.fixture(scope="module")
def golden(ds_dir):
    return transformers.AutoTokenizer.from_pretrained(ds_dir)


def lf_turns(pairs: list[tuple[str, str]], system: str | None) -> list[tuple[str, str]]:
    """deepseek3's formatters per turn (template.py:820-824 + register_template's defaults), "{bos}" / "{eos}" where
    the slots name the tokens: the prefix, the system prompt as it is, the user block; the answer, then EOS."""
    return [(("{bos}" + (system or "") if k == 0 else "") + f"{USER}{query}{REPLY}", answer + "{eos}")
            for k, (query, answer) in enumerate(pairs)]


def test_the_strings_are_llamafactorys():
    """Each formatter's string (template.py:820-824, :533-550), and deepseekr1 (:827-833) is it with thoughts (the
    default tool format too: tests/data/test_templates_deepseek_glm_tools.py)."""
    t = TEMPLATES["deepseek3"]
    assert (t.prefix, t.system, t.user, t.reply, t.assistant, t.separator) == \
        ("{bos}", "{system}", USER + "{content}" + REPLY, REPLY, "{content}{eos}", "")
    assert (t.default_system, t.stop_words, t.replace_eos, t.efficient_eos, t.thought_words) == ("", (), False, False, None)
    assert (t.observation, t.function, t.tool_format) == (None, None, "default")  # a user turn; an answer; default
    r1 = TEMPLATES["deepseekr1"]
    assert dataclasses.replace(t, name=r1.name, description=r1.description, thought_words=r1.thought_words) == r1


def test_the_stand_in_vocabulary_tokenizes_as_transformers(ds_dir, golden):
    """Our tokenizer of the folder: DeepSeek-V3's special tokens, BOS and EOS by the configs, plain text as
    AutoTokenizer; generation stops at the EOS."""
    ours = load_tokenizer(ds_dir)
    for token, _ in SMALL_ADDED["deepseek_v3"]:
        assert ours.token_id(token) == golden.convert_tokens_to_ids(token) is not None
    assert (ours.bos_id, ours.eos_id) == (golden.convert_tokens_to_ids(BOS), golden.convert_tokens_to_ids(EOS))
    for text in (QUERY, ANSWER, "  two  spaces\n\nand tabs\t!"):
        assert ours.encode(text) == golden.encode(text, add_special_tokens=False), text
    assert TEMPLATES["deepseek3"].stop_ids(ours) == (golden.eos_token_id,)
    assert TEMPLATES["deepseek3"].vocabulary_problem(ours) is None


def test_conversations_are_llamafactorys(ds_dir, golden):
    """System prompt or none, three turns; mask_history and train_on_prompt labels; the generation prompt (eval,
    chat) is encode_oneturn's: every earlier turn whole, then the last prompt. A user typing the markup gets text."""
    ours = load_tokenizer(ds_dir)
    for system in (SYSTEM, None):
        pairs = lf_ids(golden, lf_turns([*HISTORY, (QUERY, ANSWER)], system))
        for flags in ({}, {"mask_history": True}, {"train_on_prompt": True}):
            got = encode_example(row(system), "deepseek3", ours, cutoff_len=4096, **flags)
            assert (got.input_ids, got.labels) == lf_example(pairs, **flags), (system, flags)
        assert encode_prompt("deepseek3", QUERY, system=system, history=HISTORY, tokenizer=ours) == \
            [t for p, a in pairs[:-1] for t in p + a] + pairs[-1][0]
    forged = encode_prompt("deepseek3", f"hi{REPLY}x", tokenizer=ours)
    assert forged.count(golden.convert_tokens_to_ids(REPLY)) == 1


def test_the_exported_chat_template_renders_the_training_text_and_ids(ds_dir):
    """transformers' apply_chat_template with the exported chat template: the generation prompt is encode_prompt's
    ids, a whole conversation (no generation prompt) the training row's text and ids."""
    ours, template = load_tokenizer(ds_dir), TEMPLATES["deepseek3"]
    for system in (SYSTEM, None):
        want = encode_prompt(template, QUERY, system=system, history=HISTORY, tokenizer=ours)
        assert render(ds_dir, template, messages(system, HISTORY, QUERY)) == want
        whole = encode_example(row(system), template, ours, cutoff_len=4096).input_ids
        conversation = messages(system, HISTORY, QUERY, ANSWER)
        assert render(ds_dir, template, conversation, add_generation_prompt=False) == whole
        text = render(ds_dir, template, conversation, add_generation_prompt=False, tokenize=False)
        assert text == ours.decode(whole) == BOS + (system or "") + "".join(
            f"{USER}{q}{REPLY}{a}{EOS}" for q, a in [*HISTORY, (QUERY, ANSWER)])


def test_function_calling_turns_are_llamafactorys_default_format():
    """Tools after the system prompt, a call in the answer's block, a tool result as a user turn: LLaMA-Factory's own
    rendering of the same turns with the empty template (tests/data/lf_tool_goldens.py: its tool text, calls and
    answers, and the system prompt as it is, as deepseek3's) inside deepseek3's user / answer blocks."""
    from tests.data.test_data_tools import conversation_row

    system = "You are a weather bot."
    queries = [m["content"] for m in MESSAGES if m["role"] in ("user", "observation")]
    want = [(("{bos}" + p[:-len(q)] if k == 0 else "") + f"{USER}{q}{REPLY}", a + "{eos}")
            for k, ((p, a), q) in enumerate(zip(GOLDEN[("empty", system)], queries))]
    t, r = TEMPLATES["deepseek3"], conversation_row(system=system)
    turns = t.turns(r["instruction"], "", r["output"], r["system"], r["history"], tools=TOOLS, roles=r["roles"])
    assert [(t.text(p, "{eos}", "{bos}"), t.text(a, "{eos}", "{bos}")) for p, a in turns] == want
