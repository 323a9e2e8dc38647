"""The chat template merge/export write (pipeline.data.chat_template), rendered by transformers on the real GPT-2,
Llama 3 and Qwen vocabularies, gives the ids the pipeline trains and generates on.

Expected ids: pipeline.data.tokenize (encode_prompt: what eval and chat feed the model; encode_example: a training
row), themselves tied to the `tokenizers` library's ids by test_template_masks_real.py; expected strings written
out by hand.
"""
from __future__ import annotations

import json

import pytest

from pipeline import merge
from pipeline.data.chat_template import jinja_template, literal
from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import TEMPLATES, Template, recipe_template
from pipeline.data.tokenize import encode_example, encode_prompt
from tests.vocab.chat_render import hf_tokenizer as _hf
from tests.vocab.chat_render import ours as _ours
from tests.vocab.chat_render import render

transformers = pytest.importorskip("transformers")

SYSTEM = "You are terse."
HISTORY = [("What is 2+2?", "4"), ("And 3+3?", "It's 6.")]
QUERY = "Which word is a color?\nred\nhill"
CASES = {"one turn": (None, []), "system": (SYSTEM, []), "multi-turn": (SYSTEM, HISTORY),
         "multi-turn, no system": (None, HISTORY)}
# `empty` has no markup between a system prompt and the user's text, nor between turns: the tokenizer merges
# across them in the rendered string ("terse.Hello"), so there only the text is training's (docs say so)
TEXT_ONLY = {("empty", "system"), ("empty", "multi-turn"), ("empty", "multi-turn, no system")}
# olmo's bare system prompt before the text <|user|>: "terse.<" merges to ".<" in these byte-level vocabularies
TEXT_ONLY |= {("olmo", "system"), ("olmo", "multi-turn")}


def messages(system: str | None, history, query: str | None = None, answer: str | None = None) -> list[dict]:
    turns = [m for q, a in history for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    if query is not None:
        turns.append({"role": "user", "content": query})
    if answer is not None:
        turns.append({"role": "assistant", "content": answer})
    return ([{"role": "system", "content": system}] if system else []) + turns


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen2", "qwen3", "deepseek_r1_qwen"])
def test_every_template_prompts_as_training(family_dirs, family, case):
    """apply_chat_template(..., add_generation_prompt=True) == encode_prompt for every template the vocabulary can
    express (gpt2: alpaca, llama2, mistral, default, empty, olmo; llama3 adds llama3, openchat-3.6; qwen adds chatml,
    qwen, qwen3, qwen3_nothink, qwen2_vl, qwen3_vl, qwen3_vl_nothink; DeepSeek-R1-Distill-Qwen's adds deepseekr1, deepseek3)."""
    system, history = CASES[case]
    directory = family_dirs[family]
    ours = _ours(directory)
    names = [n for n, t in TEMPLATES.items() if t.vocabulary_problem(ours) is None]
    assert len(names) == {"gpt2": 6, "llama3": 8, "deepseek_r1_qwen": 8}.get(family, 13)
    for name in names:
        template = TEMPLATES[name]
        for thinking in (True, False) if template.thought_words else (True,):
            msgs = messages(system, history, QUERY)
            want = encode_prompt(template, QUERY, system=system, history=history, tokenizer=ours,
                                 enable_thinking=thinking)
            chat = jinja_template(template, ours, enable_thinking=thinking)
            hf = _hf(directory)
            if (name, case) in TEXT_ONLY:
                got = hf.apply_chat_template(msgs, chat_template=chat, tokenize=False, add_generation_prompt=True)
                assert got == ours.decode(want), name
                continue
            got = hf.apply_chat_template(msgs, chat_template=chat, add_generation_prompt=True)["input_ids"]
            assert got == want, (name, thinking, hf.decode(got), ours.decode(want))


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen3", "deepseek_r1_qwen"])
def test_a_whole_conversation_is_the_training_example(family_dirs, family):
    """Ending with the answer (no generation prompt): the ids of the training row, EOS / closing markup included
    (mask_history's rendering: the one a reasoning template's prompts follow)."""
    directory = family_dirs[family]
    ours = _ours(directory)
    row = {"instruction": QUERY, "input": "", "output": "red", "system": SYSTEM, "history": HISTORY}
    for name, template in TEMPLATES.items():
        if template.vocabulary_problem(ours):
            continue
        want = encode_example(row, template, ours, cutoff_len=4096, mask_history=True).input_ids
        msgs = messages(SYSTEM, HISTORY, QUERY, "red")
        if name in ("empty", "olmo") or (name == "default" and family != "gpt2"):
            # no markup between "Assistant:" and the answer: Llama 3's and Qwen's pre-tokenizer joins ":red" (GPT-2's
            # does not); olmo's system prompt and its text <|user|> join (".<"); the text is still training's
            assert render(directory, template, msgs, tokenize=False, add_generation_prompt=False) == ours.decode(want)
            continue
        got = render(directory, template, msgs, add_generation_prompt=False)
        assert got == want, (name, ours.decode(got), ours.decode(want))


def test_alpaca_by_hand(family_dirs):
    directory = family_dirs["gpt2"]
    alpaca = TEMPLATES["alpaca"]
    head = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n")
    assert render(directory, alpaca, messages(None, [], "Say hi"), tokenize=False) == \
        head + "### Instruction:\nSay hi\n\n### Response:\n"
    assert render(directory, alpaca, messages("Be brief.", [("Say hi", "hi")], "Again"), tokenize=False) == \
        ("Be brief.\n\n### Instruction:\nSay hi\n\n### Response:\nhi<|endoftext|>"
         "\n\n### Instruction:\nAgain\n\n### Response:\n")
    # without add_generation_prompt the last user turn ends before "### Response:\n"
    assert render(directory, alpaca, messages(None, [], "Say hi"), tokenize=False, add_generation_prompt=False) == \
        head + "### Instruction:\nSay hi\n\n"
    # the recipe's default_system replaces the book's first sentences (recipe_template)
    assert render(directory, recipe_template("alpaca", "Answer in one word."), messages(None, [], "Say hi"),
                  tokenize=False) == "Answer in one word.\n\n### Instruction:\nSay hi\n\n### Response:\n"


def test_llama3_by_hand(family_dirs):
    directory = family_dirs["llama3"]
    llama3 = TEMPLATES["llama3"]
    got = render(directory, llama3, messages("S", [("Q", "A")], "Hi"), tokenize=False)
    assert got == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nQ<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\nA<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # the published ids: 128000 <|begin_of_text|>, 128006 / 128007 the header marks, 128009 <|eot_id|>
    ids = render(directory, llama3, messages(None, [], "Hi"))
    assert ids[:2] == [128000, 128006] and ids.count(128009) == 1 and ids[-2] == 128007
    assert render(directory, llama3, messages(None, [], "Hi"), tokenize=False, add_generation_prompt=False) == \
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"


def test_qwen3_thinking_by_hand(family_dirs):
    directory = family_dirs["qwen3"]
    qwen3 = TEMPLATES["qwen3"]
    msgs = messages(None, [("Q", "<think>\nmull\n</think>\n\nA")], "Hi")
    base = "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
           "<|im_start|>assistant\n"
    assert render(directory, qwen3, msgs, tokenize=False) == base  # earlier thoughts dropped
    assert render(directory, qwen3, msgs, tokenize=False, enable_thinking=False) == base + "<think>\n\n</think>\n\n"
    # the recipe's enable_thinking is the default; the argument still overrides it
    off = jinja_template(qwen3, _ours(directory), enable_thinking=False)
    hf = _hf(directory)
    assert hf.apply_chat_template(msgs, chat_template=off, tokenize=False, add_generation_prompt=True) == \
        base + "<think>\n\n</think>\n\n"
    assert hf.apply_chat_template(msgs, chat_template=off, tokenize=False, add_generation_prompt=True,
                                  enable_thinking=True) == base


@pytest.mark.parametrize("system", ["It's \"quoted\" \\ back\\slash \\n not a newline", "{{ 1 + 1 }} {% endif %} {#",
                                    "line one\r\nline two\ttab\x00", "café 中文 😀 </think>"])
def test_default_system_is_kept_literally(family_dirs, system):
    """A recipe's default_system goes into the Jinja source as a string literal: Jinja reads escapes there and
    normalises \\r\\n, so every character must come out as written (and none runs as Jinja)."""
    directory = family_dirs["qwen2"]
    template = recipe_template("qwen", system)
    assert render(directory, template, messages(None, [], "Hi"), tokenize=False) == \
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert literal("a'b\\c\nd") == "'a\\'b\\\\c\\nd'"


def test_default_system_empty_drops_the_system_block(family_dirs):
    directory = family_dirs["qwen2"]
    assert render(directory, recipe_template("qwen", ""), messages(None, [], "Hi"), tokenize=False) == \
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert "You are Qwen" in render(directory, TEMPLATES["qwen"], messages(None, [], "Hi"), tokenize=False)


@pytest.mark.parametrize("msgs", [
    [{"role": "assistant", "content": "Hi"}],
    [{"role": "user", "content": "Hi"}, {"role": "user", "content": "again"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
     {"role": "assistant", "content": "!"}],
], ids=["assistant-first", "two-users", "two-assistants"])
def test_turns_out_of_trainings_order_are_refused(family_dirs, msgs):
    with pytest.raises(Exception, match="renders turns in training's order"):
        render(family_dirs["llama3"], TEMPLATES["llama3"], msgs, tokenize=False)


def test_a_reply_must_end_the_user_block():
    with pytest.raises(ValueError, match="must end with its reply"):
        Template(name="x", user="Q: {content}\n", reply="A:")


@pytest.mark.parametrize("answer", ["<think>\na<think>\nb\n</think>\n\nc", "x<think>\ny\n</think>\n\nz<think>\nw",
                                    "\n\nplain", "<think>\n</think>\n\nA", "stray </think> only",
                                    "<think>\none\n</think>\n\n<think>\ntwo\n</think>\n\n\nend"])
def test_qwen3_drops_thoughts_as_training_does(family_dirs, answer):
    """The chat template's thought removal (Jinja has no regex) against Template.remove_thought's, through the
    prompt ids: an earlier answer, and the last one with thinking off."""
    directory = family_dirs["qwen3"]
    ours, qwen3 = _ours(directory), TEMPLATES["qwen3"]
    for thinking in (True, False):
        want = encode_prompt(qwen3, "Hi", history=[("Q", answer)], tokenizer=ours, enable_thinking=thinking)
        assert render(directory, qwen3, messages(None, [("Q", answer)], "Hi"), enable_thinking=thinking) == want
    row = {"instruction": "Q", "input": "", "output": answer}
    want = encode_example(row, qwen3, ours, cutoff_len=4096, enable_thinking=False).input_ids
    assert render(directory, qwen3, messages(None, [], "Q", answer), add_generation_prompt=False,
                  enable_thinking=False) == want


def test_content_as_openai_parts_or_none(family_dirs):
    """OpenAI's list of parts (what chat clients send; vLLM joins a list's text parts by "\\n" for a template that
    takes strings) renders as that joined string, a None content (transformers drops the key) as "", in the system
    message too; an image part raises instead of vanishing from the prompt."""
    directory = family_dirs["qwen3"]
    qwen3, ours = TEMPLATES["qwen3"], _ours(directory)

    def parts(*texts: str) -> list[dict]:
        return [{"type": "text", "text": t} for t in texts]

    msgs = [{"role": "system", "content": parts("Be", "terse.")}, {"role": "user", "content": parts("Q", "more")},
            {"role": "assistant", "content": None}, {"role": "user", "content": parts("Hi")}]
    assert render(directory, qwen3, msgs) == encode_prompt(qwen3, "Hi", system="Be\nterse.", history=[("Q\nmore", "")],
                                                            tokenizer=ours)
    with pytest.raises(Exception, match="renders text only"):
        render(directory, qwen3, [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])


@pytest.mark.parametrize("family", ["llama3", "qwen2"])
def test_an_empty_system_message_and_unicode_are_trainings(family_dirs, family):
    """An empty system message gives the default system prompt (training's `system or default_system`);
    decomposed unicode (Qwen's tokenizer normalises NFC, as training does) and emoji give training's ids."""
    directory = family_dirs[family]
    ours = _ours(directory)
    name = "llama3" if family == "llama3" else "qwen"
    template = TEMPLATES[name]
    query = "cafe\u0301 中文 😀"
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": query}]
    assert render(directory, template, msgs) == encode_prompt(template, query, tokenizer=ours)
    if name == "qwen":
        assert "You are Qwen" in render(directory, template, msgs, tokenize=False)


@pytest.mark.parametrize("family, name, closing", [("llama3", "llama3", 1), ("qwen3", "qwen3", 2),
                                                   ("qwen3", "qwen3_nothink", 2), ("gpt2", "alpaca", 1)])
def test_continue_final_message_is_the_training_example_without_its_end(family_dirs, family, name, closing):
    """continue_final_message (prefilling the answer, as TRL's and vLLM's users do): the training example's ids up to
    the end of the answer's text, without its closing markup (`closing` ids: <|eot_id|>; <|im_end|> "\\n";
    <|endoftext|>); qwen3 with the empty thought in front of the answer (thinking) or ending the prompt (not)."""
    directory = family_dirs[family]
    ours, template = _ours(directory), TEMPLATES[name]
    row = {"instruction": QUERY, "input": "", "output": "It is red"}
    msgs = messages(None, [], QUERY, "It is red")
    for thinking in (True, False) if template.thought_words else (True,):
        want = encode_example(row, template, ours, cutoff_len=4096, enable_thinking=thinking).input_ids
        got = render(directory, template, msgs, add_generation_prompt=False, continue_final_message=True,
                     enable_thinking=thinking)
        assert got == want[:-closing], (name, thinking, ours.decode(got), ours.decode(want))


@pytest.mark.parametrize("family, template, stops", [
    ("qwen2_base", "qwen", [151645, 151643]),  # <|im_end|>, then the base's <|endoftext|>
    ("qwen2_base", "qwen3_nothink", [151645, 151643]),
    ("llama3_base", "llama3", [128009, 128008, 128001]),  # <|eot_id|>, <|eom_id|>, the base's <|end_of_text|>
    ("qwen2", "qwen", [151645, 151643]),  # an Instruct base already lists them: its order is kept
    ("llama3", "llama3", [128001, 128008, 128009]),
    ("deepseek_r1_qwen", "deepseekr1", 151643),  # no stop words: the base's own <｜end▁of▁sentence｜>, as it is
    ("llama3_base", "openchat-3.6", [128001, 128009]),  # the base's <|end_of_text|> ends answers, then <|eot_id|>
])
def test_the_exports_generation_config_stops_at_the_templates_stop_words(vocab_dirs, family, template, stops):
    """generation_config.json's eos_token_id of an export is where `pipeline generate` stops (Template.stop_ids): on
    a base whose only stop is its end of text, transformers' generate and vLLM would otherwise run past the answer's
    <|im_end|> / <|eot_id|>. pt (no chat format) keeps the base's. Ids: the published Llama 3 / Qwen2.5 ones."""
    from pipeline.recipe.args import GenerationArgs, data_args

    directory = vocab_dirs[family]
    ours = load_tokenizer(directory)
    base = json.loads((directory / "generation_config.json").read_text())
    recipe = {"model_name_or_path": str(directory), "template": template}
    config = merge.generation_config(GenerationArgs.from_recipe(recipe), ours, base,
                                     stops=merge.export_stop_ids(data_args({**recipe, "stage": "sft"}), ours))
    assert config["eos_token_id"] == stops
    pt = merge.export_stop_ids(data_args({**recipe, "stage": "pt"}), ours)
    assert set(pt) == set(base["eos_token_id"] if isinstance(base["eos_token_id"], list) else [base["eos_token_id"]])


# The hub's chat templates, re-typed: meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json, and the part of
# mistralai/Mistral-7B-Instruct-v0.3's without tools (its user branch: "[INST] " + system_message + "\\n\\n" +
# content + "[/INST]" when loop.last, its assistant " " + content|trim + eos_token)
HUB_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
HUB_MISTRAL_V03 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token }}{%- endif %}"
    "{%- endfor %}")


def test_llama2_and_mistral_against_the_hubs_chat_templates(family_dirs):
    """Text level (a byte-level vocabulary: the Llama 2 / Mistral sentencepiece one is not this test's), rendered by
    apply_chat_template: our export's chat template gives the training text, which is LLaMA-Factory's; the hub's
    templates give the same one-turn prompt, and differ where docs/tokenizers-templates.md says: Llama 2's hub
    template writes ' answer ' + EOS (LLaMA-Factory: answer + EOS), Mistral v0.3's puts the system prompt in the
    last message when it is a user's and drops it otherwise (LLaMA-Factory: always in the first)."""
    directory = family_dirs["llama3"]
    hf = _hf(directory)
    bos, eos = hf.bos_token, hf.eos_token
    one = messages(SYSTEM, [], QUERY)
    many = messages(SYSTEM, HISTORY, QUERY, "red")
    expected = {  # LLaMA-Factory's rendering, by hand
        "llama2": (f"{bos}[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\n{QUERY} [/INST]",
                   f"{bos}[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\nWhat is 2+2? [/INST]4{eos}{bos}[INST] And 3+3? [/INST]"
                   f"It's 6.{eos}{bos}[INST] {QUERY} [/INST]red{eos}"),
        "mistral": (f"{bos}[INST] {SYSTEM}\n\n{QUERY}[/INST]",
                    f"{bos}[INST] {SYSTEM}\n\nWhat is 2+2?[/INST] 4{eos}[INST] And 3+3?[/INST] It's 6.{eos}"
                    f"[INST] {QUERY}[/INST] red{eos}")}
    hub = {"llama2": HUB_LLAMA2, "mistral": HUB_MISTRAL_V03}
    for name, (prompt, conversation) in expected.items():
        assert render(directory, TEMPLATES[name], one, tokenize=False) == prompt
        assert render(directory, TEMPLATES[name], many, tokenize=False, add_generation_prompt=False) == conversation
        assert hf.apply_chat_template(one, chat_template=hub[name], tokenize=False) == prompt
    theirs = {name: hf.apply_chat_template(many, chat_template=hub[name], tokenize=False) for name in hub}
    assert theirs["llama2"] == conversation_with(expected["llama2"][1], [("[/INST]4", "[/INST] 4 "), (
        "[/INST]It's 6.", "[/INST] It's 6. "), ("[/INST]red", "[/INST] red ")])
    # Mistral's hub template: the system prompt in the last message when that is a user's, else nowhere
    assert theirs["mistral"] == conversation_with(expected["mistral"][1], [(f"{SYSTEM}\n\n", "")])
    prompt = hf.apply_chat_template(messages(SYSTEM, HISTORY, QUERY), chat_template=hub["mistral"], tokenize=False)
    assert prompt + " red" + eos == conversation_with(expected["mistral"][1], [(f"{SYSTEM}\n\n", ""), (
        f"[INST] {QUERY}", f"[INST] {SYSTEM}\n\n{QUERY}")])


def conversation_with(text: str, changes: list[tuple[str, str]]) -> str:
    for old, new in changes:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text
