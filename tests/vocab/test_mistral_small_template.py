"""Template mistral_small (Mistral Small 3 / 3.1 / 3.2) gives LLaMA-Factory 0.9.5's ids and labels on a Tekken-like
byte-level vocabulary, and the exported chat template, rendered by transformers, gives them back.

The vocabulary: Tekken (131,072 rows) is not on PyPI; tests/helpers/hf_vocab.py's small byte-level BPE with its
control tokens (<unk>, <s>, </s>, [INST], [/INST], the tool markup, [IMG]..., [SYSTEM_PROMPT], [/SYSTEM_PROMPT]).

Golden: LLaMA-Factory's Template._encode (src/llamafactory/data/template.py:132-170: turn 0 is format_prefix +
format_system (when there is a system prompt) + format_user, every other turn its own formatter) with the
mistral_small formatters (:1794-1804), re-typed in lf_texts: format_prefix [{"bos_token"}], format_system
["[SYSTEM_PROMPT]{{content}}[/SYSTEM_PROMPT]"], format_user ["[INST]{{content}}[/INST]"] and register_template's
default format_assistant ["{{content}}", {"eos_token"}] (:534-536); each element encoded alone
(Template._convert_elements_to_ids, :113-130; tests/vocab/test_sentencepiece_templates.py's lf_ids), labels as
processor/supervised.py:79-96 (lf_example).
"""
from __future__ import annotations

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import TEMPLATES
from pipeline.data.tokenize import encode_example, encode_prompt
from tests.vocab.test_phi_templates import assert_export_renders_the_training_ids
from tests.vocab.test_sentencepiece_templates import ANSWER, HISTORY, QUERY, SYSTEM, lf_example, lf_ids, row

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tekken_dir(tmp_path_factory):
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    directory = tmp_path_factory.mktemp("tekken_vocab")
    write_small_tokenizer_dir(directory, "mistral_tekken")
    return directory


def lf_texts(pairs: list[tuple[str, str]], system: str | None) -> list[list[tuple[str, str]]]:
    """Template._encode's elements per turn ("{bos}" / "{eos}" for the set elements), each its own string."""
    out = []
    for k, (query, answer) in enumerate(pairs):
        prompt = ["{bos}"] if k == 0 else []
        if k == 0 and system:
            prompt.append(f"[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT]")
        prompt.append(f"[INST]{query}[/INST]")
        out.append([(element, "") for element in prompt] + [("", answer + "{eos}")])
    return out


def test_conversations_are_llamafactorys(tekken_dir):
    """System prompt or none, three turns; labels with mask_history and train_on_prompt too; the prompt eval and chat
    generate from is the training prompt. Failed before: template 'mistral_small' was not known."""
    golden = transformers.AutoTokenizer.from_pretrained(tekken_dir)
    ours = load_tokenizer(tekken_dir)
    assert (ours.bos_id, ours.eos_id) == (golden.bos_token_id, golden.eos_token_id)
    for system in (SYSTEM, None):
        pairs = [([t for p, _ in turn for t in lf_ids(golden, [(p, "")])[0][0]], lf_ids(golden, [turn[-1]])[0][1])
                 for turn in lf_texts([*HISTORY, (QUERY, ANSWER)], system)]
        for flags in ({}, {"mask_history": True}, {"train_on_prompt": True}):
            got = encode_example(row(system), "mistral_small", ours, cutoff_len=4096, **flags)
            assert (got.input_ids, got.labels) == lf_example(pairs, **flags), (system, flags)
        prompt = [t for p, a in pairs[:-1] for t in p + a] + pairs[-1][0]
        assert encode_prompt("mistral_small", QUERY, system=system, history=HISTORY, tokenizer=ours) == prompt
        first = pairs[0][0]
        markup = [golden.convert_tokens_to_ids(t) for t in ("<s>", "[SYSTEM_PROMPT]", "[INST]")]
        assert first[:2] == (markup[:2] if system else [markup[0], markup[2]]) and pairs[0][1][-1] == ours.eos_id


def test_the_exported_chat_template_gives_the_training_ids(tekken_dir):
    assert_export_renders_the_training_ids(tekken_dir, "mistral_small")


def test_mistral_7bs_vocabulary_cannot_express_it(sp_folders):
    """Mistral 7B v0.3's vocabulary has [INST] / [/INST] but no [SYSTEM_PROMPT]: refused, naming the tokens."""
    problem = TEMPLATES["mistral_small"].vocabulary_problem(load_tokenizer(sp_folders["mistral_v3"]))
    assert problem is not None and "[SYSTEM_PROMPT], [/SYSTEM_PROMPT]" in problem and "[INST]" not in problem


def test_tools_go_inside_the_system_block(tekken_dir):
    """Function calling as Template._encode writes it (template.py:149-153: format_system(content=system + tool_text),
    also without a system prompt): the tools text after the system prompt inside [SYSTEM_PROMPT] ... [/SYSTEM_PROMPT];
    a call after [TOOL_CALLS] then the EOS, trained; a tool result inside [TOOL_RESULTS], masked (:1798-1799)."""
    from pipeline.data.tools import tool_text

    ours = load_tokenizer(tekken_dir)
    tools = '[{"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}]'
    template = TEMPLATES["mistral_small"].for_vocabulary(ours)
    for system in ("S", None):
        rows = {"instruction": "q", "input": "", "output": "done", "system": system, "tools": tools,
                "history": [["q0", '{"name": "f", "arguments": {}}'], ["{\"r\": 1}", "x"]],
                "roles": ["user", "function", "observation", "assistant", "user", "assistant"]}
        got = encode_example(rows, template, ours, cutoff_len=4096)
        text = ours.decode(got.input_ids)
        assert text.startswith(f"<s>[SYSTEM_PROMPT]{system or ''}{tool_text(tools, 'mistral')}[/SYSTEM_PROMPT]"
                               "[INST]q0[/INST][TOOL_CALLS]"), text
        assert '</s>[TOOL_RESULTS]{"content": {"r": 1}}[/TOOL_RESULTS]x</s>[INST]q[/INST]done</s>' in text, text
        trained = ours.decode([t for t, label in zip(got.input_ids, got.labels) if label != -100])
        assert "[TOOL_CALLS]" in trained and "[TOOL_RESULTS]" not in trained and "[SYSTEM_PROMPT]" not in trained
