"""Templates mistral and llama2 on the real sentencepiece vocabularies (tests/helpers/sp_vocab.py: Mistral v0.1,
Llama 2's layout, Mistral v0.3) give LLaMA-Factory 0.9.5's ids and labels, and the exported chat template, rendered
by transformers, gives them back where the text allows.

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


@pytest.mark.parametrize("family,name", PAIRS)
def test_exported_chat_template_gives_the_training_ids(sp_folders, sp_golden, family, name):
    """apply_chat_template with the chat template merge/export write: mistral's gives training's ids on v0.1 and
    v0.3, the prompt and the whole conversation. llama2's string cannot (nor can LLaMA-Factory's own template, the
    same text): training encodes "[INST] ..." after BOS and each answer after "[/INST]" as texts of their own, each
    with its prefix "▁", which the rendered string, encoded whole, gives neither after <s> on a prepend_scheme
    "first" layout (Llama 2's; v0.1's legacy "always" gives it) nor after "[/INST]" on any: exactly those
    "▁" tokens differ (docs/tokenizers-templates.md)."""
    template, ours = TEMPLATES[name], load_tokenizer(sp_folders[family])
    for system in (SYSTEM, None):
        prompt = encode_prompt(name, QUERY, system=system, history=HISTORY, tokenizer=ours)
        whole = encode_example(row(system), name, ours, cutoff_len=4096).input_ids
        got_prompt = render(sp_folders[family], template, messages(system, HISTORY, QUERY))
        got_whole = render(sp_folders[family], template, messages(system, HISTORY, QUERY, ANSWER),
                           add_generation_prompt=False)
        if name == "mistral":
            assert (got_prompt, got_whole) == (prompt, whole)
            continue
        # the text is LLaMA-Factory's; only its encoding whole differs from training's pieces
        texts = lf_texts(name, [*HISTORY, (QUERY, ANSWER)], system)
        text = "".join(p + a for p, a in texts).replace("{bos}", "<s>").replace("{eos}", "</s>")
        assert render(sp_folders[family], template, messages(system, HISTORY, QUERY, ANSWER), tokenize=False,
                      add_generation_prompt=False) == text
        assert got_whole == sp_golden[family].encode(text, add_special_tokens=False) != whole
