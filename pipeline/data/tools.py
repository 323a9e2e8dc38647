"""Function-calling text, as LLaMA-Factory 0.9.5 writes it (its data/tool_utils.py and formatter.py).

A function-calling example has three extra parts, and each template's tool format says how they read:
- the tool descriptions (the dataset's `tools` column: a JSON list of function schemas), rendered into the
  system prompt after the system text (`tool_text`);
- a `function_call` turn (on the assistant's side: trained): JSON {"name", "arguments"} or a list of them,
  rendered as the model is to write its call (`function_text`);
- an `observation` turn (the tool's result, on the user's side: masked like a prompt): its text as given,
  in the template's observation block (pipeline.data.templates).

Seven formats, by LLaMA-Factory's names: `default` (DefaultToolUtils: "Action: ...\\nAction Input: ..."),
`llama3` (Llama3ToolUtils: JSON tool list, today's date, {"name", "parameters"} calls), `qwen`
(QwenToolUtils, Hermes style: <tools>...</tools> in the system prompt, <tool_call>...</tool_call> calls),
`mistral` (MistralToolUtils, Mistral v0.3: "[AVAILABLE_TOOLS] [...][/AVAILABLE_TOOLS]", a JSON list of calls; the
template writes [TOOL_CALLS] before it), `glm4` (GLM4ToolUtils: GLM-4's Chinese tool prompt with each function as
json.dumps(indent=4), a call as "name\\narguments", one call per turn), `glm4_moe` (GLM4MOEToolUtils, GLM-4.5 / 4.6:
qwen's tool list under an English prompt, a call as "\\n<tool_call>name" and an <arg_key> / <arg_value> pair per
argument, a string value as it is, others as JSON; no closing </tool_call>, as LLaMA-Factory 0.9.5 writes it) and
`phi4_mini` (not a tool utils of
LLaMA-Factory's but phi4_mini's own format_tools: the `tools` text as given, between <|tool|> and <|/tool|>; calls
in the default format, which LLaMA-Factory's register_template gives a template without format_function).
JSON is written with Python's json.dumps(ensure_ascii=False), exactly as LLaMA-Factory does.

`tools_problem` / `function_problem` say why a row's text cannot be rendered (the build reports them as the
row's problems), so that tokenizing never meets a value LLaMA-Factory would crash on.
"""
from __future__ import annotations

import json
import re
from datetime import datetime
from typing import Any, NamedTuple

FORMATS = ("default", "llama3", "qwen", "mistral", "glm4", "glm4_moe", "phi4_mini")
# formats that write one call per turn (LLaMA-Factory's GLM4ToolUtils.function_formatter raises on several)
SINGLE_CALL = frozenset({"glm4"})
# formats that write each argument by its key (LLaMA-Factory's GLM4MOEToolUtils calls .items() on the arguments): they
# must be a JSON object
KEY_VALUE_CALLS = frozenset({"glm4_moe"})
# formats that write the tools column's text as given, an empty list ("[]") too (phi4_mini's StringFormatter)
VERBATIM_TOOLS = frozenset({"phi4_mini"})
# LLaMA-Factory's defaults for every template: a function_call turn may carry a thought before its call, and
# may wrap the call in these words.
THOUGHT_WORDS = ("<think>\n", "\n</think>\n\n")
TOOL_CALL_WORDS = ("<tool_call>", "</tool_call>")

DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    """(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n"""
    "```\n"
)
LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    """Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. """
    "Do not use variables.\n\n{tool_text}"
)
QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)
# LLaMA-Factory 0.9.5 src/llamafactory/data/tool_utils.py:41-44 (GLM4_TOOL_PROMPT) and :377-386 (each tool's text)
GLM4_TOOL_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)
GLM4_TOOL = "\n\n## {name}\n\n{body}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
# LLaMA-Factory 0.9.5 src/llamafactory/data/tool_utils.py:46-56 (GLM4_MOE_TOOL_PROMPT; str.format's {{ }} are braces)
GLM4_MOE_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, output the function name and arguments within the following XML format:"
    "\n<tool_call>{{function-name}}"
    "\n<arg_key>{{arg-key-1}}</arg_key>"
    "\n<arg_value>{{arg-value-1}}</arg_value>"
    "\n<arg_key>{{arg-key-2}}</arg_key>"
    "\n<arg_value>{{arg-value-2}}</arg_value>"
    "\n...\n</tool_call>\n"
)
# tool_utils.py:699-713 (GLM4MOEToolUtils.function_formatter): each call opens "\n<tool_call>" + its name, then one
# pair per argument; the calls joined by "\n"
GLM4_MOE_CALL = ("\n<tool_call>", "\n<arg_key>", "</arg_key>", "\n<arg_value>", "</arg_value>")
# LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:1919-1927: phi4_mini's format_tools, a StringFormatter
PHI4_MINI_TOOLS = ("<|tool|>", "<|/tool|>")


class FunctionCall(NamedTuple):
    name: str
    arguments: Any  # the decoded JSON value of "arguments"


def _dumps(value: Any, indent: int | None = None) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


def _unwrap(tool: dict) -> dict:
    """{"type": "function", "function": {...}} -> the function (OpenAI's wrapping), else the tool itself."""
    return tool.get("function", "") if tool.get("type") == "function" else tool


def _default_tools(tools: list[dict]) -> str:
    tool_text, names = "", []
    for tool in map(_unwrap, tools):
        param_text = ""
        params = tool.get("parameters") or {}  # LLaMA-Factory requires both; a tool without arguments lists none
        for name, param in (params.get("properties") or {}).items():
            required = ", required" if name in params.get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(map(str, param["enum"]))) if param.get("enum") else ""
            items = (", where each item should be {}".format(param["items"].get("type", ""))
                     if param.get("items") else "")
            param_text += f"  - {name} ({param.get('type', '')}{required}): {param.get('description', '')}{enum}{items}\n"
        tool_text += f"> Tool Name: {tool['name']}\nTool Description: {tool.get('description', '')}\nTool Args:\n{param_text}\n"
        names.append(tool["name"])
    return DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(names))


def _wrapped(tool: dict) -> dict:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _llama3_tools(tools: list[dict]) -> str:
    # LLaMA-Factory writes the day the text is rendered (Meta's prompt format asks for it): tokenized on another
    # day, the same row gives another date.
    tool_text = "".join(_dumps(_wrapped(tool), indent=4) + "\n\n" for tool in tools)
    return LLAMA3_TOOL_PROMPT.format(date=today(), tool_text=tool_text)


def today() -> str:
    """The date in Llama 3's tool prompt, as LLaMA-Factory writes it ("03 Dec 2026")."""
    return datetime.now().strftime("%d %b %Y")


def _qwen_tools(tools: list[dict], prompt: str = QWEN_TOOL_PROMPT) -> str:
    return prompt.format(tool_text="".join("\n" + _dumps(_wrapped(tool)) for tool in tools))


def _glm4_moe_tools(tools: list[dict]) -> str:
    # tool_utils.py:689-695: qwen's tool list (each tool wrapped, one JSON line each) in GLM-4.5's prompt
    return _qwen_tools(tools, GLM4_MOE_TOOL_PROMPT)


def _mistral_tools(tools: list[dict]) -> str:
    # LLaMA-Factory 0.9.5 src/llamafactory/data/tool_utils.py:557-564: the wrapped tools as one JSON list
    return "[AVAILABLE_TOOLS] " + _dumps([_wrapped(tool) for tool in tools]) + "[/AVAILABLE_TOOLS]"


def _glm4_tools(tools: list[dict]) -> str:
    return GLM4_TOOL_PROMPT.format(tool_text="".join(
        GLM4_TOOL.format(name=tool["name"], body=_dumps(tool, indent=4)) for tool in map(_unwrap, tools)))


def tool_text(tools: str, fmt: str) -> str:
    """The text the tool descriptions add after the system prompt ("" for an empty list), from the `tools` JSON.
    phi4_mini's is the text itself, as given (an empty list too): its format_tools is a StringFormatter, which
    LLaMA-Factory's Template._encode applies to the column's string without parsing it (template.py:152)."""
    if fmt in VERBATIM_TOOLS:
        return PHI4_MINI_TOOLS[0] + tools + PHI4_MINI_TOOLS[1]
    parsed = json.loads(tools)
    if not parsed:
        return ""
    return {"default": _default_tools, "llama3": _llama3_tools, "qwen": _qwen_tools, "mistral": _mistral_tools,
            "glm4": _glm4_tools, "glm4_moe": _glm4_moe_tools}[fmt](parsed)


def _calls(text: str) -> list[FunctionCall]:
    parsed = json.loads(text)
    return [FunctionCall(c["name"], c["arguments"]) for c in (parsed if isinstance(parsed, list) else [parsed])]


def _format_calls(calls: list[FunctionCall], fmt: str) -> str:
    problem = calls_problem(fmt, [c.arguments for c in calls])
    if problem:  # the build refuses such rows (function_problem); data built elsewhere
        from pipeline.errors import UserError

        raise UserError("a function_call turn " + problem)
    if fmt == "glm4":  # tool_utils.py:388-394
        return f"{calls[0].name}\n{_dumps(calls[0].arguments)}"
    if fmt == "glm4_moe":
        return "\n".join(_glm4_moe_call(c) for c in calls)
    if fmt in ("default", "phi4_mini"):
        return "\n".join(f"Action: {c.name}\nAction Input: {_dumps(c.arguments)}" for c in calls)
    if fmt == "llama3":
        objects = [{"name": c.name, "parameters": c.arguments} for c in calls]
        return _dumps(objects[0] if len(objects) == 1 else objects)
    if fmt == "mistral":  # tool_utils.py:566-571: always a list, even of one call
        return _dumps([{"name": c.name, "arguments": c.arguments} for c in calls])
    return "\n".join(f"<tool_call>\n{_dumps({'name': c.name, 'arguments': c.arguments})}\n</tool_call>" for c in calls)


def _glm4_moe_call(call: FunctionCall) -> str:
    """One call as GLM4MOEToolUtils writes it: a string argument as it is, any other value as JSON."""
    start, key_open, key_close, value_open, value_close = GLM4_MOE_CALL
    return start + call.name + "".join(
        key_open + key + key_close + value_open + (value if isinstance(value, str) else _dumps(value)) + value_close
        for key, value in call.arguments.items())


def _split(content: str, thought_words: tuple[str, str] | None = None) -> tuple[str, str]:
    """(text kept before the call, the call's JSON): LLaMA-Factory's FunctionFormatter. A call wrapped in
    <tool_call>...</tool_call> keeps the rest of the turn (a thought) in front; otherwise a thought in the template's
    thought words (formatter.py:119-133: Template._encode passes its own, <think>...</think> by default) is kept in
    front and the rest is the JSON."""
    start, end = map(re.escape, TOOL_CALL_WORDS)
    wrapped = re.search(f"{start}(.*?){end}", content, re.DOTALL)
    if wrapped:
        return content.replace(wrapped.group(0), ""), wrapped.group(1)
    start, end = map(re.escape, thought_words or THOUGHT_WORDS)
    thought = re.search(f"{start}(.*?){end}", content, re.DOTALL)
    if thought:
        return thought.group(0), content.replace(thought.group(0), "")
    return "", content


def function_text(content: str, fmt: str, thought_words: tuple[str, str] | None = None) -> str:
    """A function_call turn's content (JSON {"name", "arguments"}, or a list for parallel calls) as the
    assistant writes it in `fmt`, a thought in `thought_words` (the template's; None: the default) kept in front."""
    before, call = _split(content, thought_words)
    return before + _format_calls(_calls(call), fmt)


# ---------------------------------------------------------------- checks (the build reports them per row)

def tools_problem(tools: str) -> str | None:
    """Why a `tools` value cannot be rendered (None: it can), in any format: the build does not depend on the
    template."""
    try:
        parsed = json.loads(tools)
    except json.JSONDecodeError as err:
        return f"is not valid JSON ({err.msg} at character {err.pos}); expected a JSON list of function schemas"
    if not isinstance(parsed, list) or not all(isinstance(t, dict) for t in parsed):
        return "is not a JSON list of objects; expected a JSON list of function schemas ([{\"name\": ...}, ...])"
    for i, tool in enumerate(parsed):
        function = _unwrap(tool)
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return f"tool {i} has no \"name\" (a string)"
        params = function.get("parameters", {})
        if not isinstance(params, dict) or not isinstance(params.get("properties", {}), dict):
            return f"tool {i} ('{function['name']}'): \"parameters\" is not an object with \"properties\""
        for name, param in params.get("properties", {}).items():
            if not isinstance(param, dict) or not isinstance(param.get("items", {}), dict) \
                    or not isinstance(param.get("enum", []), list):
                return (f"tool {i} ('{function['name']}'): parameter '{name}' is not an object (with \"items\" an object "
                        "and \"enum\" a list)")
    return None


def single_call_problem(fmt: str, calls: int) -> str:
    """Why a turn of several calls cannot be written in a one-call format."""
    return (f"holds {calls} parallel calls, but tool format '{fmt}' writes one call per turn (LLaMA-Factory 0.9.5's "
            "GLM4ToolUtils refuses several: 'GLM-4 does not support parallel functions.'); give each call its own "
            "function_call turn, each followed by its observation")


def function_problem(content: str, fmt: str | None = None, thought_words: tuple[str, str] | None = None) -> str | None:
    """Why a function_call turn cannot be rendered (None: it can), in tool format `fmt` when given (the template's),
    a thought in front in `thought_words` (the template's; None: the default)."""
    _, call = _split(content, thought_words)
    try:
        parsed = json.loads(call)
    except json.JSONDecodeError as err:
        return f"is not valid JSON ({err.msg} at character {err.pos}); expected {{\"name\": ..., \"arguments\": ...}}"
    calls = parsed if isinstance(parsed, list) else [parsed]
    if not calls or not all(isinstance(c, dict) and isinstance(c.get("name"), str) and "arguments" in c
                            for c in calls):
        return "expected a JSON object {\"name\": ..., \"arguments\": ...} (or a list of them for parallel calls)"
    return calls_problem(fmt, [c["arguments"] for c in calls])


def calls_problem(fmt: str | None, arguments: list[Any]) -> str | None:
    """Why tool format `fmt` cannot write a turn of these calls (their decoded arguments, one per call), or None."""
    if fmt in SINGLE_CALL and len(arguments) > 1:
        return single_call_problem(fmt, len(arguments))
    if fmt in KEY_VALUE_CALLS and not all(isinstance(a, dict) for a in arguments):
        return (f"has \"arguments\" that are not a JSON object, but tool format '{fmt}' writes each argument by its "
                "name (LLaMA-Factory 0.9.5's GLM4MOEToolUtils reads them as one); give the arguments as an object, "
                "{} for none")
    return None
