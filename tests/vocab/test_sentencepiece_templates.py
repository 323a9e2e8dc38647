"""Templates mistral and llama2 on the real sentencepiece vocabularies (tests/helpers/sp_vocab.py: Mistral v0.1,
Llama 2's layout, Mistral v0.3) give LLaMA-Factory 0.9.5's ids and labels, and the exported chat template, rendered
by transformers, gives them back.

Golden: LLaMA-Factory's Llama2Template._encode (src/llamafactory/data/template.py:341-373) with the llama2 and mistral
formatters (:1393-1398, :1780-1791), re-typed below, each turn's elements turned into ids by
Template._convert_elements_to_ids (:113-130) on transformers' AutoTokenizer of the same folder: a string element
encoded whole with add_special_tokens=False (transformers splits it at the added tokens it holds: v0.3's [INST],
[/AVAILABLE_TOOLS], ... are one id each there, text in v0.1 / Llama 2), {"bos_token"} / {"eos_token"} as the
tokenizer's ids. The function-calling conversations are LLaMA-Factory's own renderings (tests/data/lf_tool_goldens.py),
whose "{bos}" / "{eos}" mark those set elements. Labels: processor/supervised.py:79-96 (the prompt IGNORE_INDEX
unless train_on_prompt; with mask_history only the last answer).
"""
from __future__ import annotations

import re

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import TEMPLATES
from pipeline.data.tokenize import encode_example, encode_prompt
from tests.data.lf_tool_goldens import GOLDEN, MESSAGES
from tests.vocab.chat_render import render
from tests.vocab.test_chat_template import messages
from tests.vocab.test_chat_template_tools import assert_conversation
from tests.vocab.test_chat_template_tools import row as tool_row

M = -100
SYSTEM = "You are terse."
HISTORY = [("What is 2+2?", "4"), ("And  3+3?\n", "It's 6.")]
QUERY = "Which word is a color?\nred\nhill"
ANSWER = "red 🦙"
# (vocabulary, template): Mistral's template on both Mistral vocabularies, Llama 2's on its own and on v0.3's
PAIRS = [("mistral_v1", "mistral"), ("mistral_v3", "mistral"), ("llama2", "llama2"), ("mistral_v3", "llama2")]


def lf_texts(template: str, pairs: list[tuple[str, str]], system: str | None) -> list[tuple[str, str]]:
    """Llama2Template._encode's elements per turn, as text with "{bos}" / "{eos}" for the set elements: the system
    block (format_system) opens the first user content; llama2: format_user [{"bos_token"}, "[INST] {{content}}
    [/INST]"], the default format_assistant ["{{content}}", {"eos_token"}]; mistral: format_prefix [{"bos_token"}],
    format_user ["[INST] {{content}}[/INST]"], format_assistant [" {{content}}", {"eos_token"}]."""
    out = []
    for k, (query, answer) in enumerate(pairs):
        if template == "llama2":
            system_text = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if k == 0 and system else ""
            out.append(("{bos}[INST] " + system_text + query + " [/INST]", answer + "{eos}"))
        else:
            system_text = f"{system}\n\n" if k == 0 and system else ""
            out.append((("{bos}" if k == 0 else "") + "[INST] " + system_text + query + "[/INST]", " " + answer + "{eos}"))
    return out


def lf_ids(tokenizer, turns: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Template._convert_elements_to_ids per turn: strings by tokenizer.encode(elem, add_special_tokens=False)."""
    def ids(text: str) -> list[int]:
        out: list[int] = []
        for j, element in enumerate(re.split(r"(\{bos\}|\{eos\})", text)):
            if j % 2:
                out.append(tokenizer.bos_token_id if element == "{bos}" else tokenizer.eos_token_id)
            elif element:
                out += tokenizer.encode(element, add_special_tokens=False)
        return out
    return [(ids(p), ids(a)) for p, a in turns]


def lf_example(pairs: list[tuple[list[int], list[int]]], *, mask_history: bool = False,
               train_on_prompt: bool = False) -> tuple[list[int], list[int]]:
    """SupervisedDatasetProcessor._encode_data_example's input_ids and labels (no truncation)."""
    input_ids, labels = [], []
    last = len(pairs) - 1
    for k, (source, target) in enumerate(pairs):
        input_ids += source + target
        labels += (source if train_on_prompt else [M] * len(source)) + \
            ([M] * len(target) if mask_history and k != last else target)
    return input_ids, labels


def row(system: str | None) -> dict:
    return {"instruction": QUERY, "input": "", "output": ANSWER, "system": system,
            "history": [list(h) for h in HISTORY]}


@pytest.mark.parametrize("family,name", PAIRS)
def test_conversations_are_llamafactorys(sp_folders, sp_golden, family, name):
    """System prompt or none, three turns; the labels with mask_history and train_on_prompt too; the prompt that
    eval and chat generate from is the training prompt."""
    ours = load_tokenizer(sp_folders[family])
    for system in (SYSTEM, None):
        pairs = lf_ids(sp_golden[family], lf_texts(name, [*HISTORY, (QUERY, ANSWER)], system))
        for flags in ({}, {"mask_history": True}, {"train_on_prompt": True}):
            got = encode_example(row(system), name, ours, cutoff_len=4096, **flags)
            assert (got.input_ids, got.labels) == lf_example(pairs, **flags), (system, flags)
        prompt = [t for p, a in pairs[:-1] for t in p + a] + pairs[-1][0]
        assert encode_prompt(name, QUERY, system=system, history=HISTORY, tokenizer=ours) == prompt
    # v0.3's [INST] / [/INST] are its control tokens (3, 4) in both templates, text ("▁[", "INST", "]") elsewhere
    first = pairs[0][0]
    assert (3 in first) == (family == "mistral_v3") and first[0] == 1 and pairs[0][1][-1] == 2


@pytest.mark.parametrize("family", ["mistral_v1", "mistral_v3"])
@pytest.mark.parametrize("system", ["You are a weather bot.", ""])
def test_mistral_function_calls_are_llamafactorys(sp_folders, sp_golden, family, system):
    """LLaMA-Factory's own mistral rendering of a conversation with tools, function calls and a tool result: on v0.3
    the text after [/AVAILABLE_TOOLS] ("\\n\\nWhat ...") continues that string, without the prefix "▁" a text of its
    own gets (failed before: one "▁" too many)."""
    pairs = lf_ids(sp_golden[family], GOLDEN[("mistral", system)])
    got = encode_example(tool_row(MESSAGES, system or None), "mistral", load_tokenizer(sp_folders[family]),
                         cutoff_len=4096)
    assert (got.input_ids, got.labels) == lf_example(pairs)
    if family == "mistral_v3":  # [AVAILABLE_TOOLS] [/AVAILABLE_TOOLS] [TOOL_CALLS] [TOOL_RESULTS] [/TOOL_RESULTS]
        assert {6, 7, 5, 8, 9} <= set(got.input_ids)


def test_llama2_function_calls_are_llamafactorys(sp_folders, sp_golden):
    pairs = lf_ids(sp_golden["llama2"], GOLDEN[("llama2", "You are a weather bot.")])
    got = encode_example(tool_row(MESSAGES, "You are a weather bot."), "llama2", load_tokenizer(sp_folders["llama2"]),
                         cutoff_len=4096)
    assert (got.input_ids, got.labels) == lf_example(pairs)


# answers that start with a space or are empty: training encodes " 4" as "▁4" (no second prefix) and "" as nothing
EDGE_HISTORY = [("What is 2+2?", " 4"), ("And  3+3?\n", ""), ("And 4+4?", "It's 8.")]


@pytest.mark.parametrize("family", ["llama2", "mistral_v1", "mistral_v3"])
def test_exported_chat_template_gives_the_training_ids(sp_folders, sp_golden, family):
    """apply_chat_template with the chat template merge/export write gives training's ids for every template the
    vocabulary expresses (alpaca, llama2, mistral, default, empty, olmo), the prompt (add_generation_prompt) and the whole
    conversation, with a system prompt or none, answers that start with a space or are empty; for llama2 and mistral
    they are LLaMA-Factory's ids too (lf_ids). Training encodes every template string on its own, each with the
    prefix "▁" of its Metaspace; the rendered string, encoded whole, gets that "▁" only at a split's start (prepend
    scheme "first": the string's start alone), so the template writes a space where a piece starts after text or,
    with "first", after <s>, </s> or v0.3's [/INST] token (chat_template_blocks). Failed before for llama2 on every
    vocabulary and default / empty / alpaca: no space, one "▁" fewer at each such place."""
    ours = load_tokenizer(sp_folders[family])
    names = [n for n, t in TEMPLATES.items() if t.vocabulary_problem(ours) is None]
    assert names == ["alpaca", "llama2", "mistral", "default", "empty", "olmo"]
    for name in names:
        template = TEMPLATES[name]
        for system in (SYSTEM, None):
            edge_row = {**row(system), "history": [list(h) for h in EDGE_HISTORY]}
            prompt = encode_prompt(name, QUERY, system=system, history=EDGE_HISTORY, tokenizer=ours)
            whole = encode_example(edge_row, name, ours, cutoff_len=4096).input_ids
            got_prompt = render(sp_folders[family], template, messages(system, EDGE_HISTORY, QUERY))
            got_whole = render(sp_folders[family], template, messages(system, EDGE_HISTORY, QUERY, ANSWER),
                               add_generation_prompt=False)
            assert (got_prompt, got_whole) == (prompt, whole), (name, system)
            if name in ("llama2", "mistral"):
                pairs = lf_ids(sp_golden[family], lf_texts(name, [*EDGE_HISTORY, (QUERY, ANSWER)], system))
                assert whole == lf_example(pairs)[0], (name, system)


def test_llama2_text_by_hand(sp_folders):
    """What the spaces are: on Llama 2's layout (prepend scheme "first") one after each <s> and before each answer
    that starts with none; on Mistral v0.3's, where [INST] / [/INST] are tokens, only before the answers; mistral's
    text stays LLaMA-Factory's on v0.1 ("always": a split after <s> gets its "▁" by itself) and v0.3."""
    chat = messages("Be brief.", [("Hi", "Hello"), ("Again", " Hey")], "Bye")
    assert render(sp_folders["llama2"], TEMPLATES["llama2"], chat, tokenize=False) == (
        "<s> [INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello</s><s> [INST] Again [/INST] Hey</s>"
        "<s> [INST] Bye [/INST]")
    assert render(sp_folders["mistral_v3"], TEMPLATES["llama2"], chat, tokenize=False) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello</s><s>[INST] Again [/INST] Hey</s>"
        "<s>[INST] Bye [/INST]")
    for family in ("mistral_v1", "mistral_v3"):
        assert render(sp_folders[family], TEMPLATES["mistral"], chat, tokenize=False) == (
            "<s>[INST] Be brief.\n\nHi[/INST] Hello</s>[INST] Again[/INST]  Hey</s>[INST] Bye[/INST]")


@pytest.mark.parametrize("family,name", [*PAIRS, ("llama2", "default"), ("mistral_v1", "empty")])
def test_exported_chat_template_gives_the_tool_conversations_ids(sp_folders, family, name):
    """The function-calling conversation (tests/data/lf_tool_goldens.py: tools, calls, a tool result, parallel calls)
    rendered with tools= / tool_calls / tool messages gives training's ids, prompt by prompt and whole. Failed before
    for llama2, default and empty, and for mistral on v0.1: "[TOOL_CALLS]" after the text "[/INST]" without its
    "▁"."""
    assert_conversation(sp_folders[family], name, set())
