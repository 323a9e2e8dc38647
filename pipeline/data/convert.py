"""Records -> Alpaca rows (sft), preference pairs (dpo) or text documents (pt), through the registry's mapping.

An Alpaca row: {"instruction", "input", "output", "system"?, "history"?: [[instruction, response], ...]}.
A preference pair (registry "ranking": true): the same with "chosen" and "rejected" in place of "output".
A KTO row (stage kto, registry columns.kto_tag): an Alpaca row plus "kto_tag", true or false.
ShareGPT: the last assistant turn is the output, the user turn before it the instruction, earlier
pairs the history, a leading system turn (or the system column) the system prompt.
Text is normalised here (Unicode NFC, CRLF -> LF) so de-duplication compares like with like.
Wrong types and missing columns are problems (`file:line: ...`); null counts as empty.
"""
from __future__ import annotations

import json
import re
import unicodedata
from typing import Any

from pipeline.data.problems import Problems, alike
from pipeline.data.registry import OPENAI_TAGS, DatasetSpec
from pipeline.data.templates import tool_refusal
from pipeline.data.sources import Table
from pipeline.errors import article, did_you_mean

_MISSING = object()


def normalize(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return text


def _kind(value: Any) -> str:
    if value is None:  # JSON's word, not Python's NoneType
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def _name(column: str, what: str) -> str:
    """'answer' (output) when the source column is named differently from the Alpaca field."""
    return f"'{column}'" if column == what else f"'{column}' ({what})"


class _RowError(Exception):
    pass


class _TagsError(_RowError):
    """A turn laid out as another ShareGPT flavour than the entry's tags say (OpenAI-style role/content, or
    user/assistant roles under the default human/gpt): the fix is one line in the registry entry, not in the rows,
    so the file gets one message per kind naming the first row and the count, not one identical message per row."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


def _tags_error(message: str, spec: DatasetSpec, wanted: dict[str, str], kind: str) -> _TagsError:
    """`message` + '; for <kind> add "tags": {...} to the registry entry '<name>'', with only the tags that differ."""
    changed = {k: v for k, v in wanted.items() if spec.tags.get(k) != v}
    return _TagsError(f"{message}; for {kind} add \"tags\": {json.dumps(changed)} to the registry entry "
                      f"'{spec.name}'", kind)


# A UTF-16 surrogate left alone: JSON can spell one ("\ud800" without its low half), UTF-8 cannot encode it
_SURROGATE = re.compile("[\ud800-\udfff]")


def _string(value: Any, what: str) -> str:
    """A text field: str (normalised) or null (empty); anything else is the row's problem."""
    if type(value) is str:
        if not value.isascii() and (lone := _SURROGATE.search(value)):
            raise _RowError(f"{what} holds \\u{ord(lone.group()):04x} at character {lone.start() + 1}, half of a "
                            "UTF-16 surrogate pair (JSON escapes \\ud800-\\udfff come in high/low pairs); remove it or "
                            "complete the pair")
        return normalize(value)
    if value is None:
        return ""
    raise _RowError(f"{what} is {_kind(value)}; expected a string")


def _field(record: dict, column: str, what: str, required: bool) -> str:
    value = record.get(column, _MISSING)
    if value is _MISSING:
        if required:
            keys = ", ".join(map(str, record)) or "none"
            raise _RowError(f"missing {_name(column, what)}{did_you_mean(column, map(str, record))}; "
                            f"the row has: {keys}")
        return ""
    return _string(value, _name(column, what))


def _history(value: Any, column: str) -> list[list[str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _RowError(f"{_name(column, 'history')} is {_kind(value)}; expected a list of [instruction, response] "
                        "pairs")
    out = []
    for i, pair in enumerate(value):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            shape = f"a list of {len(pair)}" if isinstance(pair, (list, tuple)) else _kind(pair)
            raise _RowError(f"'{column}'[{i}] is {shape}; expected [instruction, response]")
        out.append([_string(pair[0], f"'{column}'[{i}][0]"), _string(pair[1], f"'{column}'[{i}][1]")])
    return out


def to_rows(table: Table, spec: DatasetSpec, stage: str, shown: str, problems: Problems
            ) -> tuple[list[dict], list[int | str]]:
    """Alpaca rows (sft) or {"text"} documents (pt) of one file, and where each was in it (`table.where`, for the
    built rows' origins); bad records go to `problems`."""
    cols = spec.columns
    if stage == "pt":
        if spec.formatting == "text":
            needed = {"text": cols["text"]}
            convert = lambda rec: {"text": _field(rec, cols["text"], "text", True)}  # noqa: E731
        else:  # alpaca for pt: the prompt (and input) is the document, as in LLaMA-Factory
            needed = {"prompt": cols["prompt"]}

            def convert(rec: dict) -> dict:
                # LLaMA-Factory's user turn: "\n".join of the non-empty ones (an empty instruction adds no "\n")
                parts = (_field(rec, cols["prompt"], "instruction", True), _field(rec, cols["query"], "input", False))
                return {"text": "\n".join(p for p in parts if p)}
    elif stage == "kto":
        base = {"messages": cols["messages"]} if spec.formatting == "sharegpt" else {"prompt": cols["prompt"],
                                                                                       "response": cols["response"]}
        needed = {**base, "kto_tag": cols["kto_tag"]}
        convert = lambda rec: _feedback(rec, spec)  # noqa: E731
    elif spec.ranking and spec.formatting == "sharegpt":
        needed = {"messages": cols["messages"], "chosen": cols["chosen"], "rejected": cols["rejected"]}
        convert = lambda rec: _sharegpt_pair(rec, spec)  # noqa: E731
    elif spec.ranking:
        needed = {"prompt": cols["prompt"], "chosen": cols["chosen"], "rejected": cols["rejected"]}
        convert = lambda rec: _alpaca_pair(rec, cols)  # noqa: E731
    elif spec.formatting == "sharegpt":
        needed = {"messages": cols["messages"]}
        convert = lambda rec: _sharegpt(rec, spec)  # noqa: E731
    else:
        needed = {"prompt": cols["prompt"], "response": cols["response"]}
        tools_column = cols["tools"] if "tools" in spec.given_columns else None
        convert = lambda rec: _alpaca(rec, cols, tools_column)  # noqa: E731
    if table.header is not None:  # a table: a missing column is one problem for the file, not one per row
        missing = [(k, c) for k, c in needed.items() if c not in table.header]
        line = None if shown.lower().endswith(".parquet") else 1
        separator = _wrong_separator(table.header, shown) if missing else None
        if separator:
            problems.add(shown, line, separator)
            return [], []
        for key, column in missing:
            padded = [name for name in table.header if name.strip() == column]
            hint = (f" ({padded[0]!r} has spaces around it: in CSV a space after the separator is part of the "
                    "column's name, so write the header without it)" if padded else did_you_mean(column, table.header))
            problems.add(shown, line, f"missing column '{column}' (columns.{key}){hint}; "
                                      f"the header has: {', '.join(table.header)}")
        if missing:
            return [], []
    rows, wheres = [], []
    tags_errors: dict[str, list] = {}  # kind -> [where, message, rows]: the entry's tags, said once at the end
    for where, record in zip(table.where, table.records):
        if not isinstance(record, dict):
            problems.add(shown, where, f"expected a JSON object (one row), got {_kind(record)}")
            continue
        try:
            rows.append(convert(record))
            wheres.append(where)
        except _TagsError as err:
            tags_errors.setdefault(err.kind, [where, str(err), 0])[2] += 1
        except _RowError as err:
            problems.add(shown, where, str(err))
    for where, message, count in tags_errors.values():
        problems.add(shown, where, message + alike(count))
    return rows, wheres


def _wrong_separator(header: list[str], shown: str) -> str | None:
    """The message for a table split on the wrong character: a header of one column holding ';', '|', a tab
    (.csv) or a comma (.tsv). Without it the column check proposed the whole header line as the column name
    ("did you mean 'instruction;output'?"), which hides what is wrong."""
    if len(header) != 1 or not shown.lower().endswith((".csv", ".tsv")):  # a parquet column name is what it is
        return None
    tsv = shown.lower().endswith(".tsv")
    names = {";": "';'", "|": "'|'", ",": "comma"} if tsv else {";": "';'", "|": "'|'", "\t": "tab"}
    found = next((sep for sep in names if sep in header[0]), None)
    if found is None:
        return None
    if tsv:
        expected = "a .tsv file separates columns with tabs" + ("; name it .csv" if found == "," else "")
    else:
        expected = "a .csv file separates columns with commas" + ("; name it .tsv" if found == "\t" else "")
    return f"the header has one column ({header[0]!r}); the file looks {names[found]}-separated: {expected}"


def _input_as_prompt(row: dict) -> dict:
    """LLaMA-Factory's user turn is "\n".join of the non-empty instruction and input: with an empty instruction the
    input alone is the prompt, so it becomes the instruction (else the row was dropped as an empty instruction)."""
    if not row["instruction"] and row["input"]:
        row["instruction"], row["input"] = row["input"], ""
    return row


def _alpaca(rec: dict, cols: dict[str, str], tools_column: str | None = None) -> dict:
    ins, inp, out = rec.get(cols["prompt"]), rec.get(cols["query"], ""), rec.get(cols["response"])
    if (type(ins) is str and ins and type(inp) is str and type(out) is str and cols["system"] not in rec
            and cols["history"] not in rec and tools_column not in rec):  # the common row: three strings
        if ins.isascii() and inp.isascii() and out.isascii() and "\r" not in ins and "\r" not in out \
                and "\r" not in inp:
            return {"instruction": ins, "input": inp, "output": out}
    row = {
        "instruction": _field(rec, cols["prompt"], "instruction", True),
        "input": _field(rec, cols["query"], "input", False),
        "output": _field(rec, cols["response"], "output", True),
    }
    return _with_context(_input_as_prompt(row), rec, cols, tools_column)


def _with_context(row: dict, rec: dict, cols: dict[str, str], tools_column: str | None = None) -> dict:
    """The row plus its optional system prompt, history and tool descriptions (alpaca form)."""
    system = _field(rec, cols["system"], "system", False)
    if system:
        row["system"] = system
    history = _history(rec.get(cols["history"]), cols["history"])
    if history:
        row["history"] = history
    return _with_tools(row, rec, tools_column)


def _with_tools(row: dict, rec: dict, column: str | None) -> dict:
    """The row plus "tools" (the JSON text of the function schemas) when the entry names a tools column and the
    record has a non-empty value there, as LLaMA-Factory reads it (a string)."""
    if column is None:
        return row
    tools = _field(rec, column, "tools", False)
    if tools:
        from pipeline.data.tools import tools_problem

        problem = tools_problem(tools)
        if problem:
            raise _RowError(f"{_name(column, 'tools')} {problem}")
        row["tools"] = tools
    return row


def _alpaca_pair(rec: dict, cols: dict[str, str]) -> dict:
    """A ranking row in alpaca form: instruction/input (system, history) + chosen and rejected strings."""
    row = {
        "instruction": _field(rec, cols["prompt"], "instruction", True),
        "input": _field(rec, cols["query"], "input", False),
        "chosen": _field(rec, cols["chosen"], "chosen", True),
        "rejected": _field(rec, cols["rejected"], "rejected", True),
    }
    return _with_context(_input_as_prompt(row), rec, cols)


def _sharegpt_pair(rec: dict, spec: DatasetSpec) -> dict:
    """A ranking row in sharegpt form: the conversation ends with a user turn; chosen and rejected are one
    assistant message object each ({role_tag: assistant_tag, content_tag: text}), as in LLaMA-Factory."""
    cols, tags = spec.columns, spec.tags
    role_tag, content_tag, assistant = tags["role_tag"], tags["content_tag"], tags["assistant_tag"]
    answers = {}
    for what in ("chosen", "rejected"):
        column = cols[what]
        message = _required(rec, column, what)
        if not isinstance(message, dict):
            raise _RowError(f"{_name(column, what)} is {_kind(message)}; expected a message object "
                            f"{{\"{role_tag}\": \"{assistant}\", \"{content_tag}\": ...}}")
        role = message.get(role_tag, _MISSING)
        if role is not _MISSING and role != assistant:
            raise _RowError(f"'{column}'.{role_tag} is {role!r}; expected '{assistant}' (the response)")
        if content_tag not in message:
            raise _RowError(f"'{column}': missing '{content_tag}' (the text){did_you_mean(content_tag, map(str, message))}")
        answers[what] = _string(message[content_tag], f"'{column}'.{content_tag}")
    # The prompt side is an ordinary conversation that ends with the user's turn: reuse the sharegpt reader
    # with a placeholder response, then put the pair in its place.
    column = cols["messages"]
    turns = rec.get(column, _MISSING)
    if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get(role_tag) == assistant:
        raise _RowError(f"'{column}' ends with {article(assistant)} '{assistant}' turn; for ranking data the conversation ends with "
                        f"the user's turn and the responses are in {_name(cols['chosen'], 'chosen')} and "
                        f"{_name(cols['rejected'], 'rejected')}")
    if isinstance(turns, list):
        rec = {**rec, column: [*turns, {role_tag: assistant, content_tag: ""}]}
    row = _sharegpt(rec, spec)
    if "roles" in row or "tools" in row:
        raise _RowError("function-calling turns or tools in preference data are not supported (stage dpo trains on "
                        "user/assistant conversations); remove them or train this data with stage: sft")
    del row["output"]
    return {"instruction": row.pop("instruction"), "input": row.pop("input"), **answers, **row}


def _required(rec: dict, column: str, what: str) -> Any:
    """The record's value in `column` (null included), or a _RowError naming the column and what the row has."""
    value = rec.get(column, _MISSING)
    if value is _MISSING:
        raise _RowError(f"missing {_name(column, what)}{did_you_mean(column, map(str, rec))}; "
                        f"the row has: {', '.join(map(str, rec)) or 'none'}")
    return value


def _feedback(rec: dict, spec: DatasetSpec) -> dict:
    """A KTO row (stage kto): an alpaca or sharegpt row (its last assistant turn the response) plus "kto_tag", which
    must be true (desirable) or false (undesirable), as LLaMA-Factory's converter requires a bool."""
    column = spec.columns["kto_tag"]
    tag = _required(rec, column, "kto_tag")
    if not isinstance(tag, bool):
        raise _RowError(f"{_name(column, 'kto_tag')} is {_kind(tag)}; expected true (a desirable response) or false "
                        "(an undesirable one)")
    row = _sharegpt(rec, spec) if spec.formatting == "sharegpt" else _alpaca(rec, spec.columns)
    if "roles" in row or "tools" in row:
        raise _RowError("function-calling turns or tools in KTO data are not supported (stage kto trains on "
                        "user/assistant conversations); remove them or train this data with stage: sft")
    return {**row, "kto_tag": tag}


def _sharegpt(rec: dict, spec: DatasetSpec) -> dict:
    cols, tags = spec.columns, spec.tags
    column = cols["messages"]
    turns = rec.get(column, _MISSING)
    if turns is _MISSING:
        raise _RowError(f"missing '{column}' (the conversation){did_you_mean(column, map(str, rec))}; "
                        f"the row has: {', '.join(map(str, rec)) or 'none'}")
    if not isinstance(turns, list) or not turns:
        raise _RowError(f"'{column}' is {_kind(turns) if turns != [] else 'an empty list'}; "
                        "expected a non-empty list of turns")
    role_tag, content_tag = tags["role_tag"], tags["content_tag"]
    user, assistant, system_role = tags["user_tag"], tags["assistant_tag"], tags["system_tag"]
    observation, function = tags["observation_tag"], tags["function_tag"]
    known = [user, assistant, system_role, observation, function]
    # LLaMA-Factory's alternation: the prompt side is a user turn or a tool's result (observation), the response
    # side an answer or a function call
    sides = ((user, observation), (assistant, function))
    role_names = {user: "user", assistant: "assistant", observation: "observation", function: "function"}
    system = _field(rec, cols["system"], "system", False)
    texts: list[str] = []
    roles: list[str] = []
    for i, turn in enumerate(turns):
        at = f"{column}[{i}]"
        if not isinstance(turn, dict):
            raise _RowError(f"{at} is {_kind(turn)}; expected an object with '{role_tag}' and '{content_tag}'")
        role = turn.get(role_tag, _MISSING)
        if role is _MISSING:
            message = (f"{at}: missing '{role_tag}' (the role){did_you_mean(role_tag, map(str, turn))}; "
                       f"the turn has: {', '.join(map(str, turn)) or 'none'}")
            if "role" in turn and "content" in turn:
                raise _tags_error(message, spec, OPENAI_TAGS, "OpenAI-style messages")
            raise _RowError(message)
        if content_tag not in turn:
            raise _RowError(f"{at}: missing '{content_tag}' (the text){did_you_mean(content_tag, map(str, turn))}")
        if turn.get("tool_calls"):  # OpenAI's function call: content null, the call beside it (never read here)
            raise _RowError(f"{at} has 'tool_calls' (an OpenAI-style function call), which a sharegpt turn does not "
                            f"carry; write the call as {article(function)} '{function}' turn whose '{content_tag}' is the JSON "
                            '{"name": ..., "arguments": {...}} (LLaMA-Factory\'s sharegpt form), the tool\'s result '
                            f"in the '{observation}' turn after it")
        content = _string(turn[content_tag], f"{at}.{content_tag}")
        if role == system_role and i == 0:
            system = content
            continue
        if role not in known:
            message = (f"{at}.{role_tag} is {role!r}; expected '{user}' or '{assistant}' (or '{system_role}' as the "
                       f"first turn, '{function}' / '{observation}' for tool use){did_you_mean(str(role), known)}")
            openai_roles = {k: OPENAI_TAGS[k] for k in ("user_tag", "assistant_tag", "system_tag")}
            if role in openai_roles.values():
                raise _tags_error(message, spec, openai_roles, "user/assistant roles")
            raise _RowError(message)
        expected = sides[len(texts) % 2]
        if role not in expected:
            what = "a system turn is only allowed first" if role == system_role else (
                f"turns must alternate '{user}' (or '{observation}'), '{assistant}' (or '{function}'), ... "
                f"starting with '{user}'")
            raise _RowError(f"{at}.{role_tag} is '{role}' where '{expected[0]}' was expected; {what}")
        if role in (observation, function):
            if not spec.tool_turns:
                raise _RowError(f"{at}.{role_tag} is '{role}': {tool_refusal(spec.template)}")
            if role == function:
                from pipeline.data.templates import TEMPLATES
                from pipeline.data.tools import function_problem

                template = TEMPLATES.get(spec.template)  # glm4 writes one call per turn; gpt_oss's thought words
                problem = function_problem(content, *((template.tool_format, template.thought_words) if template
                                                      else ()))
                if problem:
                    raise _RowError(f"{at}.{content_tag} (a function call) {problem}")
        texts.append(content)
        roles.append(role_names[role])
        last_tag = role
    if not texts or len(texts) % 2:
        last = f"'{last_tag}'" if texts else "no"
        raise _RowError(f"'{column}' ends with {last} turn; the last turn must be '{assistant}' (the response) "
                        f"or '{function}'")
    row: dict[str, Any] = {"instruction": texts[-2], "input": "", "output": texts[-1]}
    if system:
        row["system"] = system
    if len(texts) > 2:
        row["history"] = [[texts[i], texts[i + 1]] for i in range(0, len(texts) - 2, 2)]
    if any(r in ("observation", "function") for r in roles):
        row["roles"] = roles
    return _with_tools(row, rec, cols["tools"] if "tools" in spec.given_columns else None)
