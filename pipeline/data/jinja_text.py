"""Python text as Jinja source: the pieces the exported chat templates (pipeline.data.chat_template and
chat_template_tools) are written from."""
from __future__ import annotations


def literal(text: str) -> str:
    """`text` as a Jinja string literal. Jinja reads a literal's backslash escapes (unicode-escape) and turns
    \\r\\n into \\n, so backslashes, quotes and control characters are escaped; other characters stay as they are."""
    out = []
    for char in text:
        if char in "\\'":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) < 32 or ord(char) == 127:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "'" + "".join(out) + "'"


def formatted(prompt: str, **expressions: str) -> str:
    """A str.format string (its {{ }} read as braces) as one Jinja expression: its text as literals, each slot
    the given Jinja expression."""
    names = list(expressions)
    text = prompt.format(**{name: f"\x00{i}\x00" for i, name in enumerate(names)})
    items = [f"({expressions[names[int(part)]]})" if i % 2 else literal(part)
             for i, part in enumerate(text.split("\x00")) if i % 2 or part]
    return " ~ ".join(items) or "''"
