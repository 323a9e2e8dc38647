"""Function calling in the exported chat template: pipeline.data.tools' formats as Jinja, so that
`apply_chat_template(messages, tools=...)` (transformers, vLLM) writes what training wrote for the equivalent
LLaMA-Factory sharegpt row.

Two macros, per tool format:
- `tool_text(tools)`: the text `tools` adds after the system prompt (tools.tool_text). transformers passes a tool as
  given: OpenAI's {"type": "function", "function": {...}} or a bare function schema; both are read as training
  reads them. JSON goes through transformers' `tojson` filter, which is json.dumps(ensure_ascii=False) (not Jinja's
  HTML-escaping one): the text of tools._dumps. llama3's "Today Date" is `date_string` when the caller passes one
  (as in Meta's template), else `strftime_now` (transformers' today, as LLaMA-Factory's datetime.now()).
- `call_text(calls)`: an assistant message's `tool_calls` ([{"type": "function", "function": {"name", "arguments"}}]
  or the function dicts themselves) as tools.function_text writes a function_call turn. `arguments` is a dict
  (written with tojson: training's text) or a JSON string, written as it is: training re-dumps a string, so
  only a string in json.dumps' own form (", " and ": ") gives training's text; vLLM passes dicts. glm4_moe writes
  each argument by its name, from a dict only (a JSON string raises: Jinja cannot parse it).

The prompts' wording comes from pipeline.data.tools (its constants, formatted with Jinja expressions in the
slots), so one source states it.
"""
from __future__ import annotations

from pipeline.data.jinja_text import formatted, literal
from pipeline.data.tools import (DEFAULT_TOOL_PROMPT, GLM4_MOE_CALL, GLM4_MOE_TOOL_PROMPT, GLM4_TOOL, GLM4_TOOL_PROMPT,
                                  KEY_VALUE_CALLS, LLAMA3_TOOL_PROMPT, PHI4_MINI_TOOLS, QWEN_TOOL_PROMPT, SINGLE_CALL)

NO_CALL = "this chat template (written by pipeline merge / export): a tool call needs a \"name\" and \"arguments\""
NOT_AN_OBJECT = ("this chat template (written by pipeline merge / export) writes each argument of a tool call by its name "
                 "(tool format '{fmt}', as training): give \"arguments\" as an object (a dict), not a JSON string")
SEVERAL_CALLS = ("this chat template (written by pipeline merge / export) writes one tool call per assistant message "
                 "(tool format '{fmt}', as training): give each call its own assistant message and tool result")


# a tool as LLaMA-Factory reads it: OpenAI's wrapping taken off (tools._unwrap), or put on (tools._wrapped).
# Subscripts, never attributes, and `in` before a key a dict method shares a name with ("items").
_UNWRAP = "{%- set fn = tool['function'] if tool['type'] == 'function' else tool -%}"
_WRAPPED = "(tool if tool['type'] == 'function' else {'type': 'function', 'function': tool})"

_DEFAULT_TOOLS = (
    "{%- set t = namespace(text='', names='') -%}"
    "{%- for tool in tools -%}" + _UNWRAP +
    "{%- set params = fn['parameters'] or {} -%}"
    "{%- set t.text = t.text ~ '> Tool Name: ' ~ fn['name'] ~ '\\nTool Description: ' ~ "
    "(fn['description'] if 'description' in fn else '') ~ '\\nTool Args:\\n' -%}"
    "{%- for name, param in (params['properties'] or {}).items() -%}"
    "{%- set t.text = t.text ~ '  - ' ~ name ~ ' (' ~ (param['type'] if 'type' in param else '')"
    " ~ (', required' if name in (params['required'] if 'required' in params else []) else '') ~ '): '"
    " ~ (param['description'] if 'description' in param else '')"
    " ~ ((', should be one of [' ~ param['enum'] | join(', ') ~ ']') if param['enum'] else '')"
    " ~ ((', where each item should be ' ~ (param['items']['type'] if 'type' in param['items'] else ''))"
    " if 'items' in param and param['items'] else '') ~ '\\n' -%}"
    "{%- endfor -%}"
    "{%- set t.text = t.text ~ '\\n' -%}"
    "{%- set t.names = t.names ~ (', ' if not loop.first else '') ~ fn['name'] -%}"
    "{%- endfor -%}"
    "{{- " + formatted(DEFAULT_TOOL_PROMPT, tool_text="t.text", tool_names="t.names") + " -}}"
)


def _each_tool(text: str, prompt: str, setup: str = "", **slots: str) -> str:
    """A tool format whose tool text is `text` (a Jinja expression of `tool`) for each tool, joined, in `prompt`."""
    return ("{%- set t = namespace(text='') -%}"
            "{%- for tool in tools -%}{%- set t.text = t.text ~ " + text + " -%}{%- endfor -%}"
            + setup + "{{- " + formatted(prompt, tool_text="t.text", **slots) + " -}}")


_TODAY = ("{%- if date_string is defined -%}{%- set today = date_string -%}"
          "{%- else -%}{%- set today = strftime_now('%d %b %Y') -%}{%- endif -%}")
_LLAMA3_TOOLS = _each_tool(_WRAPPED + " | tojson(indent=4) ~ '\\n\\n'", LLAMA3_TOOL_PROMPT, _TODAY, date="today")
_QWEN_TOOLS = _each_tool("'\\n' ~ " + _WRAPPED + " | tojson", QWEN_TOOL_PROMPT)
_GLM4_MOE_TOOLS = _each_tool("'\\n' ~ " + _WRAPPED + " | tojson", GLM4_MOE_TOOL_PROMPT)
_MISTRAL_TOOLS = ("{%- set t = namespace(items=[]) -%}"
                  "{%- for tool in tools -%}{%- set t.items = t.items + [" + _WRAPPED + "] -%}{%- endfor -%}"
                  "{{- '[AVAILABLE_TOOLS] ' ~ t.items | tojson ~ '[/AVAILABLE_TOOLS]' -}}")
_GLM4_TOOLS = ("{%- set t = namespace(text='') -%}"
               "{%- for tool in tools -%}" + _UNWRAP + "{%- set t.text = t.text ~ "
               + formatted(GLM4_TOOL, name="fn['name']", body="fn | tojson(indent=4)") + " -%}{%- endfor -%}"
               "{{- " + formatted(GLM4_TOOL_PROMPT, tool_text="t.text") + " -}}")
# training writes the tools column's text as given: a string (Phi-4-mini's own way: the system message's "tools") as it
# is, a list (transformers' tools=) as tojson writes it, which is that text when the column is json.dumps'
_PHI4_MINI_TOOLS = ("{{- " + literal(PHI4_MINI_TOOLS[0]) + " ~ (tools if tools is string else tools | tojson) ~ "
                    + literal(PHI4_MINI_TOOLS[1]) + " -}}")
TOOL_TEXT = {"default": _DEFAULT_TOOLS, "llama3": _LLAMA3_TOOLS, "qwen": _QWEN_TOOLS, "mistral": _MISTRAL_TOOLS,
             "glm4": _GLM4_TOOLS, "glm4_moe": _GLM4_MOE_TOOLS, "phi4_mini": _PHI4_MINI_TOOLS}

# one call's name and arguments (the function dict inside OpenAI's wrapping, or the call itself), as JSON text
_CALL = (
    "{%- set fn = call['function'] if call['function'] is defined else call -%}"
    "{%- if fn['name'] is not defined or fn['arguments'] is not defined -%}"
    "{{- raise_exception(" + literal(NO_CALL) + ") -}}{%- endif -%}"
    "{%- set arguments = fn['arguments'] if fn['arguments'] is string else fn['arguments'] | tojson -%}"
)
_CALL_TEXT = {  # tools._format_calls: one call's text, and what joins several
    "default": ("'Action: ' ~ fn['name'] ~ '\\nAction Input: ' ~ arguments", "'\\n'"),
    "llama3": ("'{\"name\": ' ~ fn['name'] | tojson ~ ', \"parameters\": ' ~ arguments ~ '}'", "', '"),
    "qwen": ("'<tool_call>\\n{\"name\": ' ~ fn['name'] | tojson ~ ', \"arguments\": ' ~ arguments ~ '}\\n</tool_call>'",
             "'\\n'"),
    "mistral": ("'{\"name\": ' ~ fn['name'] | tojson ~ ', \"arguments\": ' ~ arguments ~ '}'", "', '"),
    "glm4": ("fn['name'] ~ '\\n' ~ arguments", "''"),  # one call only (checked in _call_text)
}
_CALL_TEXT["phi4_mini"] = _CALL_TEXT["default"]
_START, _KEY, _KEY_END, _VALUE, _VALUE_END = map(literal, GLM4_MOE_CALL)
# tools._glm4_moe_call: the name, then each argument's pair (a string as it is, another value as JSON), read from the
# arguments object itself (the macro arg_pairs): a JSON string cannot be taken apart in Jinja
_CALL_TEXT["glm4_moe"] = (_START + " ~ fn['name'] ~ arg_pairs(fn['arguments'])", "'\\n'")
_ARG_PAIRS = (
    "{%- macro arg_pairs(arguments) -%}"
    "{%- if arguments is string or arguments is not mapping -%}{{- raise_exception({not_an_object}) -}}{%- endif -%}"
    "{%- for key, value in arguments.items() -%}"
    "{{- " + _KEY + " ~ key ~ " + _KEY_END + " ~ " + _VALUE + " ~ (value if value is string else value | tojson) ~ "
    + _VALUE_END + " -}}"
    "{%- endfor -%}{%- endmacro -%}\n"
)


def _call_text(fmt: str) -> str:
    one, join = _CALL_TEXT[fmt]
    body = (
        "{%- set t = namespace(text='') -%}"
        "{%- for call in calls -%}" + _CALL +
        "{%- set t.text = t.text ~ ('' if loop.first else " + join + ") ~ " + one + " -%}"
        "{%- endfor -%}"
    )
    if fmt == "llama3":  # one call is an object, several a JSON list of them
        return body + "{{- t.text if calls | length == 1 else '[' ~ t.text ~ ']' -}}"
    if fmt in SINGLE_CALL:
        body = ("{%- if calls | length > 1 -%}{{- raise_exception(" + literal(SEVERAL_CALLS.format(fmt=fmt)) + ") -}}"
                "{%- endif -%}" + body)
    if fmt == "mistral":  # always a JSON list
        return body + "{{- '[' ~ t.text ~ ']' -}}"
    return body + "{{- t.text -}}"


def tool_macros(fmt: str) -> str:
    """The Jinja macros tool_text(tools) and call_text(calls) of tool format `fmt` (pipeline.data.tools.FORMATS)."""
    pairs = _ARG_PAIRS.replace("{not_an_object}", literal(NOT_AN_OBJECT.format(fmt=fmt))) if fmt in KEY_VALUE_CALLS \
        else ""
    return (pairs + "{%- macro tool_text(tools) -%}" + TOOL_TEXT[fmt] + "{%- endmacro -%}\n"
            "{%- macro call_text(calls) -%}" + _call_text(fmt) + "{%- endmacro -%}\n")
