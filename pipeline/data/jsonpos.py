"""Line numbers of the keys of a JSON document, so registry errors can point at `file:line`.

`json` gives values but not positions; this small scanner walks the same text and records the
line of every object key by its path, e.g. ("alpaca_demo", "columns", "prompt") -> 7.
"""
from __future__ import annotations

import json
import re

_TOKEN = re.compile(r'"(?:[^"\\\n]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+|\s+')


def key_lines(text: str) -> tuple[dict[tuple, int], list[tuple[tuple, int, int]]]:
    """(path -> line of its key, [(path, first line, duplicate line)]) for a well-formed JSON text."""
    lines: dict[tuple, int] = {}
    duplicates: list[tuple[tuple, int, int]] = []
    stack: list[list] = []  # frames: [kind, path, key or index, keys seen]
    line = 1
    pending: tuple[str, int] | None = None  # a string that may turn out to be a key
    for match in _TOKEN.finditer(text):
        tok = match.group()
        if tok[0] in " \t\r\n":
            line += tok.count("\n")
            continue
        if tok == ":" and pending is not None and stack and stack[-1][0] == "obj":
            frame = stack[-1]
            key = json.loads(pending[0])
            path = frame[1] + (key,)
            if key in frame[3]:
                duplicates.append((path, lines[path], pending[1]))
            else:
                frame[3].add(key)
                lines[path] = pending[1]
            frame[2] = key
            pending = None
            continue
        pending = None
        if tok in "{[":
            parent = stack[-1] if stack else None
            path = () if parent is None else parent[1] + (parent[2],)
            stack.append(["obj" if tok == "{" else "arr", path, 0, set()])
        elif tok in "}]":
            if stack:
                stack.pop()
        elif tok == ",":
            if stack and stack[-1][0] == "arr":
                stack[-1][2] += 1
        elif tok[0] == '"':
            pending = (tok, line)
    return lines, duplicates


def line_of(lines: dict[tuple, int], path: tuple) -> int | None:
    """The line of `path`, or of its nearest ancestor that has one."""
    path = tuple(path)
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return None
