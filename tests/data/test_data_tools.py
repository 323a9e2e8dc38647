"""Function-calling rows (LLaMA-Factory's `tools` column, function_call / observation turns): rendered exactly as
LLaMA-Factory 0.9.5 renders them (expected strings in lf_tool_goldens.py, produced by llamafactory itself), with
function calls trained like answers and tool results masked like prompts."""
from __future__ import annotations

import json

import pytest

from lf_tool_goldens import GOLDEN, MESSAGES, THOUGHTS, TOOLS
from pipeline.data import tools as T
from pipeline.data.templates import TEMPLATES, get_template
from pipeline.data.tokenize import encode_example
from pipeline.data.tokenizer import gpt2
from pipeline.errors import UserError

EOS_ID = 50256  # GPT-2's <|endoftext|> (a published id)
M = -100


def conversation_row(messages=MESSAGES, tools=TOOLS, system=None) -> dict:
    """MESSAGES as a built row: the last two turns are instruction/output, earlier ones the history."""
    texts = [m["content"] for m in messages]
    row = {"instruction": texts[-2], "input": "", "output": texts[-1], "roles": [m["role"] for m in messages],
           "history": [[texts[i], texts[i + 1]] for i in range(0, len(texts) - 2, 2)], "tools": tools}
    if system:
        row["system"] = system
    return row


@pytest.fixture(autouse=True)
def fixed_date(monkeypatch):
    monkeypatch.setattr(T, "today", lambda: "{date}")  # the goldens mark llama3's "Today Date" as {date}


@pytest.mark.parametrize("name,system", sorted(GOLDEN))
def test_every_turn_is_llamafactorys_text(name, system):
    template = get_template(name)
    row = conversation_row(system=system)
    turns = template.turns(row["instruction"], "", row["output"], row.get("system"), row["history"], tools=TOOLS,
                           roles=row["roles"])
    got = [(template.text(p, "{eos}", "{bos}"), template.text(a, "{eos}", "{bos}")) for p, a in turns]
    assert got == GOLDEN[(name, system)]


@pytest.mark.parametrize("kind,name,thinking", sorted(THOUGHTS))
def test_a_thought_or_wrapped_call_in_a_function_turn(kind, name, thinking):
    content, want = THOUGHTS[(kind, name, thinking)]
    template = get_template(name)
    ((prompt, response),) = template.turns("Weather in Paris?", "", content, tools="[]", roles=["user", "function"],
                                           enable_thinking=thinking)
    assert (template.text(prompt, "{eos}"), template.text(response, "{eos}")) == want


def test_the_templates_that_render_tools():
    assert [n for n, t in TEMPLATES.items() if t.tool_format] == [
        "chatml", "qwen", "qwen3", "qwen3_nothink", "llama3", "deepseekr1", "llama2", "mistral", "default", "empty",
        "phi4_mini", "gemma", "gemma3", "gemma2", "glm4", "glmz1", "glm4_moe", "gpt_oss", "qwen2_vl", "qwen3_vl", "qwen3_vl_nothink", "mistral_small",
        "deepseek3", "moonlight"]
    assert TEMPLATES["alpaca"].tool_format is None  # the book's prompt: LLaMA-Factory has no rendering of it


@pytest.mark.parametrize("name", [n for n, t in TEMPLATES.items() if t.tool_format and not t.efficient_eos])
def test_function_calls_are_trained_and_tool_results_masked(name):
    """Turns: user, function_call | observation, answer | user, function_call (parallel calls). The efficient_eos
    templates (glm4, glmz1, gemma2: an EOS segment more, glm4's one call per turn) are checked label by label in
    test_tool_formats_more.py."""
    template = get_template(name)
    row = conversation_row()
    flags = [(s.trainable, s.response) for s in template.segments(row)]
    assert flags == [(False, False), (True, True)] * 3
    assert [s.trainable for s in template.segments(row, mask_history=True)] == [False] * 5 + [True]
    assert [s.trainable for s in template.segments(row, train_on_prompt=True)] == [True] * 6  # observations too


def _ids(text: str) -> list[int]:
    """A golden turn's ids as LLaMA-Factory's _convert_elements_to_ids makes them: the text between EOS marks
    encoded piece by piece, EOS by id."""
    out: list[int] = []
    for i, piece in enumerate(text.split("{eos}")):
        out += ([EOS_ID] if i else []) + (gpt2().encode(piece) if piece else [])
    return out


@pytest.mark.parametrize("name,system", [("default", "You are a weather bot."), ("empty", "You are a weather bot.")])
def test_token_masks_on_gpt2(name, system):
    """Token by token: prompt and observation turns -100, function calls and answers their ids (EOS included)."""
    got = encode_example(conversation_row(system=system), get_template(name), gpt2(), cutoff_len=4096)
    want_ids, want_labels = [], []
    for prompt, response in GOLDEN[(name, system)]:
        want_ids += _ids(prompt) + _ids(response)
        want_labels += [M] * len(_ids(prompt)) + _ids(response)
    assert got.input_ids == want_ids and got.labels == want_labels


# ---------------------------------------------------------------- building rows

def _registry_row(conversations, tools=TOOLS):
    return {"conversations": [{"from": f, "value": v} for f, v in conversations], "tools": tools}


CALL = json.dumps({"name": "get_weather", "arguments": {"location": "Paris"}})
ENTRY = {"file_name": "raw/t.json", "formatting": "sharegpt", "columns": {"messages": "conversations",
                                                                           "tools": "tools"}}


def test_build_keeps_roles_and_tools(make_recipe):
    from pipeline.data.build import build
    from pipeline.data.check import check_built
    from pipeline.recipe.args import data_args

    rows = [_registry_row([("human", f"Weather in city {i}?"), ("function_call", CALL), ("observation", "21"),
                           ("gpt", f"Sunny {i}.")]) for i in range(6)]
    rows.append({"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]})
    r = make_recipe({"t": ENTRY}, files={"raw/t.json": json.dumps(rows)}, template="default", val_size=0.2)
    build(data_args(r))
    check_built(data_args(r))  # validate accepts them
    from pipeline.data.load import load_split

    out = load_split(data_args(r), "train") + load_split(data_args(r), "val")
    tooled = [row for row in out if "roles" in row]
    assert len(tooled) == 6 and len(out) == 7
    assert all(row["roles"] == ["user", "function", "observation", "assistant"] and row["tools"] == TOOLS
               and row["history"][0][1] == CALL for row in tooled)
    plain = next(row for row in out if "roles" not in row)
    assert plain == {"instruction": "Hi", "input": "", "output": "Hello."}


def test_bad_tool_rows_are_named_by_file_and_line(make_recipe):
    import os

    from pipeline.data.build import build
    from pipeline.recipe.args import data_args

    rows = [
        _registry_row([("human", "a"), ("function_call", "get_weather(Paris)")]),  # 1 not JSON
        _registry_row([("human", "a"), ("function_call", '{"name": "f"}')]),  # 2 no arguments
        _registry_row([("human", "a"), ("gpt", "b")], tools='{"name": "f"}'),  # 3 not a list
        _registry_row([("human", "a"), ("gpt", "b")], tools="[{\"description\": \"x\"}]"),  # 4 no name
        _registry_row([("human", "a"), ("gpt", "b")], tools="[oops"),  # 5 not JSON
    ]
    r = make_recipe({"t": {**ENTRY, "file_name": "raw/t.jsonl"}}, files={"raw/t.jsonl": "".join(json.dumps(x) + "\n" for x in rows)},
                    template="default")
    with pytest.raises(UserError) as err:
        build(data_args(r))
    f = os.path.join(r["dataset_dir"], "raw", "t.jsonl")
    assert err.value.messages == [
        f"{f}:1: conversations[1].value (a function call) is not valid JSON (Expecting value at character 0); "
        "expected {\"name\": ..., \"arguments\": ...}",
        f"{f}:2: conversations[1].value (a function call) expected a JSON object {{\"name\": ..., \"arguments\": ...}} "
        "(or a list of them for parallel calls)",
        f"{f}:3: 'tools' is not a JSON list of objects; expected a JSON list of function schemas ([{{\"name\": ...}}, ...])",
        f"{f}:4: 'tools' tool 0 has no \"name\" (a string)",
        f"{f}:5: 'tools' is not valid JSON (Expecting value at character 1); expected a JSON list of function schemas",
    ]


def test_a_template_without_tools_refuses_rows_built_for_another():
    row = conversation_row()
    with pytest.raises(UserError, match="template 'alpaca' does not; use one that does \\(chatml, qwen"):
        get_template("alpaca").segments(row)
