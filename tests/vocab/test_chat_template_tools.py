"""Function calling in the chat template merge/export write: transformers' apply_chat_template with `tools=`, an
assistant's `tool_calls` and "tool" messages gives, on the real GPT-2 / Llama 3 / Qwen3 vocabularies, the ids
training built from the equivalent LLaMA-Factory sharegpt row (a `tools` column, function_call / observation turns).

Expected ids come from the pipeline's own tokenize path (encode_prompt / encode_example). That is a fair oracle
here only because training's rendering of these rows is itself pinned to LLaMA-Factory 0.9.5's text by independent
goldens (tests/data/lf_tool_goldens.py, produced by llamafactory; checked in tests/data/test_data_tools.py) and its
ids to the `tokenizers` library (test_template_masks_real.py). The llama3 and qwen conversations are also written
out by hand below.
"""
from __future__ import annotations

import json

import pytest

from pipeline.data import tools as T
from pipeline.data.templates import TEMPLATES, get_template
from pipeline.data.tokenize import encode_example, encode_prompt
from tests.data.lf_tool_goldens import MESSAGES, THOUGHTS, TOOLS
from tests.vocab.chat_render import ours, render

pytest.importorskip("transformers")

SYSTEM = "You are a weather bot."


def openai(lf_messages: list[dict]) -> list[dict]:
    """LLaMA-Factory's turns as an OpenAI chat: a function_call turn is an assistant message with tool_calls, an
    observation a "tool" message."""
    out = []
    for m in lf_messages:
        if m["role"] == "function":
            calls = json.loads(m["content"])
            calls = calls if isinstance(calls, list) else [calls]
            out.append({"role": "assistant", "content": "",
                        "tool_calls": [{"type": "function", "function": c} for c in calls]})
        else:
            out.append({"role": "tool" if m["role"] == "observation" else m["role"], "content": m["content"]})
    return out


def row(lf_messages: list[dict], system: str | None, tools: str = TOOLS) -> dict:
    """The built row of LLaMA-Factory's turns (ending with an answer): history pairs, then instruction / output."""
    texts = [m["content"] for m in lf_messages]
    return {"instruction": texts[-2], "input": "", "output": texts[-1], "system": system, "tools": tools,
            "roles": [m["role"] for m in lf_messages],
            "history": [[texts[i], texts[i + 1]] for i in range(0, len(texts) - 2, 2)]}


def prompt_ids(template, tokenizer, lf_messages: list[dict], system: str | None, thinking: bool) -> list[int]:
    """Training's prompt ids for the turns so far (ending with a user or observation turn)."""
    texts, roles = [m["content"] for m in lf_messages], [m["role"] for m in lf_messages] + ["assistant"]
    history = [(texts[i], texts[i + 1]) for i in range(0, len(texts) - 1, 2)]
    return encode_prompt(template, texts[-1], system=system, history=history, tokenizer=tokenizer, tools=TOOLS,
                         roles=roles, enable_thinking=thinking)


TOOL_TEMPLATES = {"gpt2": ["default", "empty"], "llama3": ["llama3", "llama2", "mistral"], "qwen3": ["chatml", "qwen", "qwen3",
                                                                                 "qwen3_nothink"]}
# no markup between the system prompt and the user's text (empty), or between "Assistant:" and the answer (default on
# Llama 3's / Qwen's pre-tokenizer): the rendered string's BPE merges across them; the text is still training's
TEXT_ONLY = {"empty"}
# mistral on a byte-level vocabulary without its control tokens (Llama 3's): "[/INST][TOOL_CALLS]" merges "][" across
# the blocks' edge; on Mistral v0.3's they are tokens (test_mistral_v3_control_tokens_are_trainings_ids), and on the
# sentencepiece v0.1 the template writes " [TOOL_CALLS]" (test_sentencepiece_templates.py)
TEXT_ONLY_ON = {"llama3": {"mistral"}}


def assert_trainings(name: str, tokenizer, got: list[int] | str, want: list[int], text_only: set[str]) -> None:
    """The rendering (ids; the text for TEXT_ONLY templates) is training's."""
    if name in text_only:
        assert got == tokenizer.decode(want), name
    else:
        assert got == want, (name, tokenizer.decode(got), tokenizer.decode(want))


@pytest.mark.parametrize("family", list(TOOL_TEMPLATES))
def test_tools_calls_and_results_are_trainings_ids(family_dirs, family):
    """The goldens' conversation (two tools, one bare and one OpenAI-wrapped; a call, its result, an answer; then
    two parallel calls): every prompt with add_generation_prompt (after a user or a tool message) is encode_prompt's,
    and the whole conversation, ending in the parallel calls, is the training example (mask_history's rendering,
    which a reasoning template's prompts follow). With and without a system message, thinking on and off."""
    for name in TOOL_TEMPLATES[family]:
        assert_conversation(family_dirs[family], name, TEXT_ONLY | TEXT_ONLY_ON.get(family, set()))


def test_mistral_v3_control_tokens_are_trainings_ids(tmp_path):
    """On a stand-in of Mistral v0.3's vocabulary ([INST], [TOOL_CALLS], [AVAILABLE_TOOLS], [TOOL_RESULTS] ...
    control tokens in a byte-level BPE): the same conversation, id for id."""
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    write_small_tokenizer_dir(tmp_path, "mistral_v3")
    assert_conversation(tmp_path, "mistral", set())


def assert_conversation(directory, name: str, text_only: set[str], messages: list[dict] = MESSAGES) -> None:
    """The goldens' conversation (or `messages`, in its shape) rendered by apply_chat_template is training's, prompt by
    prompt and whole."""
    tokenizer = ours(directory)
    tools = json.loads(TOOLS)
    template = get_template(name)
    for system in (SYSTEM, None):
        head = [{"role": "system", "content": system}] if system else []
        for thinking in (True, False) if template.thought_words else (True,):
            for end in (1, 3, 5):  # after the user, after the tool result, after the second user turn
                got = render(directory, template, head + openai(messages[:end]), tools=tools,
                             enable_thinking=thinking, tokenize=name not in text_only)
                assert_trainings(name, tokenizer, got, prompt_ids(template, tokenizer, messages[:end], system,
                                                                  thinking), text_only)
            want = encode_example(row(messages, system), template, tokenizer, cutoff_len=8192, mask_history=True,
                                  enable_thinking=thinking).input_ids
            got = render(directory, template, head + openai(messages), tools=tools, add_generation_prompt=False,
                         enable_thinking=thinking, tokenize=name not in text_only)
            assert_trainings(name, tokenizer, got, want, text_only)


@pytest.mark.parametrize("kind, name, thinking", sorted(k for k in THOUGHTS if k[1] == "qwen3"))
def test_text_before_a_call_is_kept_in_front(family_dirs, kind, name, thinking):
    """An assistant message with content and tool_calls is the function_call turn LLaMA-Factory writes for a thought
    in front of the call, or words before a <tool_call>-wrapped call (the goldens' THOUGHTS rows, tools "[]":
    `tools=[]`, which still opens a system block, as the row's empty tools column does)."""
    directory = family_dirs["qwen3"]
    tokenizer, template = ours(directory), get_template(name)
    content, _ = THOUGHTS[(kind, name, thinking)]
    if "<tool_call>" in content:  # words, then the call wrapped in <tool_call>...</tool_call>
        before, call = content.removesuffix("</tool_call>").split("<tool_call>")
    else:  # a thought, then the call
        before, call = content.split("</think>\n\n")
        before += "</think>\n\n"
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": before,
             "tool_calls": [{"type": "function", "function": json.loads(call)}]}]
    lf = row([{"role": "user", "content": "Weather in Paris?"}, {"role": "function", "content": content}], None, "[]")
    want = encode_example(lf, template, tokenizer, cutoff_len=4096, mask_history=True, enable_thinking=thinking)
    got = render(directory, template, msgs, tools=[], add_generation_prompt=False, enable_thinking=thinking)
    assert got == want.input_ids, tokenizer.decode(got)


WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = {"role": "assistant", "tool_calls": [{"type": "function",
                                             "function": {"name": "get_weather", "arguments": {"city": "Köln"}}}]}
CHAT = [{"role": "user", "content": "Weather in Köln?"}, CALL, {"role": "tool", "content": "21 C"}]


def test_llama3_by_hand(family_dirs):
    got = render(family_dirs["llama3"], TEMPLATES["llama3"], CHAT, tools=[WEATHER], tokenize=False,
                 date_string="05 Dec 2026")
    assert got == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 05 Dec 2026\n\n"
        "You have access to the following functions. To call a function, please respond with JSON for a function call. "
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. '
        "Do not use variables.\n\n"
        '{\n    "type": "function",\n    "function": {\n        "name": "get_weather",\n'
        '        "description": "Weather in a city",\n        "parameters": {\n            "type": "object",\n'
        '            "properties": {\n                "city": {\n                    "type": "string"\n'
        '                }\n            },\n            "required": [\n                "city"\n            ]\n'
        "        }\n    }\n}\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWeather in Köln?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
        '{"name": "get_weather", "parameters": {"city": "Köln"}}<|eot_id|>'
        "<|start_header_id|>ipython<|end_header_id|>\n\n21 C<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # without date_string: today, as training writes it (transformers' strftime_now, LLaMA-Factory's datetime.now())
    today = render(family_dirs["llama3"], TEMPLATES["llama3"], CHAT, tools=[WEATHER], tokenize=False)
    assert f"Today Date: {T.today()}\n" in today


def test_qwen_by_hand(family_dirs):
    """Two calls in one message, arguments as a dict or as JSON text (OpenAI's form), one tool message after them."""
    calls = {"role": "assistant", "content": None, "tool_calls": [
        CALL["tool_calls"][0],
        {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]}
    msgs = [{"role": "system", "content": "Be brief."}, CHAT[0], calls, {"role": "tool", "content": "21 C; 25 C"}]
    wrapped = {"type": "function", "function": WEATHER}
    got = render(family_dirs["qwen3"], TEMPLATES["qwen"], msgs, tools=[wrapped], tokenize=False)
    assert got == (
        "<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with the user query."
        "\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n</tools>\n\n'
        "For each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Köln?<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n21 C; 25 C\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


def test_default_format_by_hand(family_dirs):
    """LLaMA-Factory's default tool text (chatml, default, empty): the Action / Action Input lines, every optional
    parameter field (enum, items) and a tool without parameters."""
    clock = {"name": "clock"}
    units = {**WEATHER, "parameters": {"type": "object", "properties": {
        "unit": {"type": "string", "description": "degrees", "enum": ["c", "f"]},
        "days": {"type": "array", "items": {"type": "integer"}}}}}
    got = render(family_dirs["gpt2"], TEMPLATES["default"], [{"role": "user", "content": "Hi"}],
                 tools=[{"type": "function", "function": units}, clock], tokenize=False)
    assert got == T.DEFAULT_TOOL_PROMPT.format(
        tool_text="> Tool Name: get_weather\nTool Description: Weather in a city\nTool Args:\n"
                  "  - unit (string): degrees, should be one of [c, f]\n"
                  "  - days (array): , where each item should be integer\n\n"
                  "> Tool Name: clock\nTool Description: \nTool Args:\n\n",
        tool_names="get_weather, clock").join(["System: ", "<|endoftext|>\nHuman: Hi<|endoftext|>\nAssistant:"])


@pytest.mark.parametrize("family, name, msgs, kwargs, message", [
    ("gpt2", "alpaca", [{"role": "user", "content": "Hi"}], {"tools": [WEATHER]}, "template 'alpaca' has no tool"),
    ("gpt2", "alpaca", CHAT, {}, "template 'alpaca' has no tool format"),
    ("llama3", "llama3", [*CHAT, {"role": "tool", "content": "again"}], {}, "in one tool message"),
    ("llama3", "llama3", [CHAT[0], {"role": "assistant", "tool_calls": [{"function": {"name": "f"}}]}], {},
     "a tool call needs a \"name\" and \"arguments\""),
], ids=["alpaca-tools", "alpaca-calls", "two-tool-messages", "no-arguments"])
def test_what_cannot_be_rendered_as_trained_is_refused(family_dirs, family, name, msgs, kwargs, message):
    with pytest.raises(Exception, match=message):
        render(family_dirs[family], TEMPLATES[name], msgs, tokenize=False, **kwargs)
