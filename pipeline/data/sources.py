"""Read raw files into records that remember where they came from (`file:line`).

JSON (an array, or JSON Lines inside a .json file), JSONL, CSV/TSV (csv module: it knows the physical
line of each row, which pandas does not) and Parquet (pyarrow: native lists for history columns).
UTF-8 only; a BOM is accepted, CRLF is accepted, NaN/Infinity are refused. Every problem goes to a
Problems collector, so one pass reports them all.
"""
from __future__ import annotations

import bisect
import csv
import io
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.problems import Problems

BOM = b"\xef\xbb\xbf"
_WS = re.compile(r"[ \t\n\r]*")


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFinite(f"{name} is not valid JSON (write a number, null or a string)")


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


@dataclass
class Table:
    """Records of one file; `where[i]` is the line (JSON, CSV), 'N: row K' (rows sharing line N of a JSON array) or
    'row N' (Parquet) of `records[i]`."""

    records: list[Any] = field(default_factory=list)
    where: list[int | str] = field(default_factory=list)
    header: list[str] | None = None  # CSV/Parquet: the columns every record has


def decode(data: bytes, shown: str, problems: Problems) -> tuple[str | None, set[int]]:
    """(text, bad line numbers). Each non-UTF-8 line is reported with the byte offset of its first bad byte.

    With bad lines the text is still returned (bad bytes replaced) so line-oriented formats can check the rest.
    """
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        problems.add(shown, 1, "the file is UTF-16 (byte-order mark at byte offset 0); save it as UTF-8")
        return None, set()
    start = 3 if data.startswith(BOM) else 0
    try:
        return data[start:].decode("utf-8"), set()
    except UnicodeDecodeError as err:
        first_bad = start + err.start
    bad: set[int] = set()
    line_start = data.rfind(b"\n", 0, first_bad) + 1
    line_no = data.count(b"\n", 0, line_start) + 1
    while line_start < len(data):
        end = data.find(b"\n", line_start)
        end = len(data) if end < 0 else end
        try:
            data[line_start:end].decode("utf-8")
        except UnicodeDecodeError as err:
            offset = line_start + err.start
            bad.add(line_no)
            problems.add(shown, line_no, f"not valid UTF-8 at byte offset {offset} (byte 0x{data[offset]:02x}); "
                                         "save the file as UTF-8")
        line_start, line_no = end + 1, line_no + 1
    return data[start:].decode("utf-8", errors="replace"), bad


def read_table(path: Path, shown: str, problems: Problems) -> Table:
    """Records of a .json/.jsonl/.csv/.tsv/.parquet file (an empty Table when it cannot be read)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path, shown, problems)
    text, bad = decode(path.read_bytes(), shown, problems)
    if text is None:
        return Table()
    if suffix == ".json" and not bad and text.lstrip(" \t\r\n").startswith("{"):
        whole = _one_object(text, shown, problems)
        if whole is not None:
            return whole
    if suffix == ".jsonl" or (suffix == ".json" and text.lstrip(" \t\r\n").startswith("{")):
        return _read_jsonl(text, bad, shown, problems)
    if bad:  # a JSON array or a CSV cannot be re-synchronised after a bad line
        return Table()
    if suffix == ".json":
        return _read_json_array(text, shown, problems)
    return _read_csv(text, "\t" if suffix == ".tsv" else ",", shown, problems)


def read_text(path: Path, shown: str, problems: Problems) -> str | None:
    text, bad = decode(path.read_bytes(), shown, problems)
    return None if bad else text


def _json_problem(err: Exception) -> str:
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON at column {err.colno}: {err.msg}"
    return str(err)


def _read_jsonl(text: str, bad: set[int], shown: str, problems: Problems) -> Table:
    table = Table()
    records, where = table.records, table.where
    scan_once, decode_one = _DECODER.scan_once, _DECODER.decode
    for number, line in enumerate(text.split("\n"), start=1):
        try:  # fast path: the C scanner on a line that is exactly one value (CRLF's \r allowed)
            record, end = scan_once(line, 0)
            if end != len(line) and line[end:].strip():
                raise ValueError
        except (ValueError, StopIteration):
            if number in bad or not line.strip():
                continue
            try:
                record = decode_one(line)
            except (json.JSONDecodeError, _NonFinite) as err:
                problems.add(shown, number, _json_problem(err))
                continue
        if number in bad:
            continue
        records.append(record)
        where.append(number)
    return table


def _one_object(text: str, shown: str, problems: Problems) -> Table | None:
    """A .json file that is one (pretty-printed) object: one row, or rows nested under a key; None for JSON Lines."""
    try:
        record = _DECODER.decode(text)  # JSON Lines stop at the end of line 1 ("Extra data"): cheap
    except (ValueError, StopIteration):
        return None
    nested = [k for k, v in record.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
    if nested:
        problems.add(shown, 1, f"one JSON object whose '{nested[0]}' holds {len(record[nested[0]]):,} rows; expected "
                               "a JSON array of rows ([{...}, {...}]) or JSON Lines (one object per line): move the "
                               "rows to the top level")
        return Table()
    return Table(records=[record], where=[1])


def _read_json_array(text: str, shown: str, problems: Problems) -> Table:
    """A JSON array, each record with its line; records sharing a line (a minified array, json.dump's default,
    is all on line 1) are named `N: row K` (K from 1 in the array), else every problem would read `file:1:`."""
    table = _scan_json_array(text, shown, problems)
    per_line = Counter(table.where)
    if len(per_line) < len(table.where):
        table.where = [f"{line}: row {k}" if per_line[line] > 1 else line for k, line in enumerate(table.where, 1)]
    return table


def _scan_json_array(text: str, shown: str, problems: Problems) -> Table:
    """A JSON array, element by element with raw_decode, so each record knows its line."""
    table = Table()
    newlines = [m.start() for m in re.finditer("\n", text)]
    idx = _WS.match(text, 0).end()
    if idx == len(text):
        problems.add(shown, 1, "empty file; expected a JSON array of rows")
        return table
    if text[idx] != "[":
        problems.add(shown, bisect.bisect_left(newlines, idx) + 1,
                     "expected a JSON array of rows ([{...}, {...}]) or JSON Lines (one object per line)")
        return table
    idx = _WS.match(text, idx + 1).end()
    raw_decode = _DECODER.raw_decode
    if idx < len(text) and text[idx] == "]":
        return table
    while True:
        try:
            record, end = raw_decode(text, idx)
        except (json.JSONDecodeError, _NonFinite) as err:
            line = err.lineno if isinstance(err, json.JSONDecodeError) else bisect.bisect_left(newlines, idx) + 1
            problems.add(shown, line, _json_problem(err) + " (rows after this point were not read)")
            return table
        table.records.append(record)
        table.where.append(bisect.bisect_left(newlines, idx) + 1)
        idx = _WS.match(text, end).end()
        if idx < len(text) and text[idx] == "]":
            rest = _WS.match(text, idx + 1).end()
            if rest != len(text):
                problems.add(shown, bisect.bisect_left(newlines, rest) + 1, "unexpected text after the closing ]")
            return table
        if idx >= len(text) or text[idx] != ",":
            line = bisect.bisect_left(newlines, min(idx, len(text) - 1)) + 1
            problems.add(shown, line, "invalid JSON: expected ',' or ']' after a row "
                                      "(rows after this point were not read)")
            return table
        idx = _WS.match(text, idx + 1).end()


def _read_csv(text: str, delimiter: str, shown: str, problems: Problems) -> Table:
    """Header on line 1; `where` is the physical line a row starts on (quoted cells may span lines)."""
    table = Table()
    csv.field_size_limit(2**31 - 1)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    last_line = 0
    try:
        for row in reader:
            start, last_line = last_line + 1, reader.line_num
            if not row or row == [""]:
                continue
            if table.header is None:
                table.header = row
                seen: set[str] = set()
                for name in row:
                    if name in seen:
                        problems.add(shown, start, f"column '{name}' appears twice in the header")
                    seen.add(name)
                continue
            if len(row) != len(table.header):
                problems.add(shown, start, f"{len(row)} fields, but the header has {len(table.header)} "
                                           "(check the delimiter and quoting)")
                continue
            table.records.append(dict(zip(table.header, row)))
            table.where.append(start)
    except csv.Error as err:
        problems.add(shown, last_line + 1, f"CSV error: {err} (rows after this point were not read)")
    if table.header is None:
        problems.add(shown, 1, "empty file; expected a header line naming the columns")
    return table


def _read_parquet(path: Path, shown: str, problems: Problems) -> Table:
    import pyarrow.parquet as pq

    try:
        arrow = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types for damaged files
        problems.add(shown, None, f"not a readable Parquet file: {err}")
        return Table()
    records = arrow.to_pylist()
    return Table(records=records, where=[f"row {i}" for i in range(1, len(records) + 1)],
                 header=list(arrow.column_names))


class _ShiftedProblems:
    """A Problems stand-in for one block of a file: line numbers shifted to the whole file's."""

    def __init__(self, problems: Problems, shift: int):
        self.problems, self.shift = problems, shift

    def add(self, file: str, where: int | str | None, text: str) -> None:
        self.problems.add(file, where + self.shift if isinstance(where, int) else where, text)


def read_jsonl_block(path: Path, start: int, end: int, first_line: int, shown: str,
                     problems: Problems) -> Table | None:
    """Records of bytes [start, end) of a JSON Lines file whose first line is `first_line` of the file.

    None when the block is not valid UTF-8: the caller then reads the whole file serially, whose messages
    give exact byte offsets. Used by build with preprocessing_num_workers (blocks end at newlines).
    """
    with open(path, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    if start == 0 and data.startswith(BOM):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    table = _read_jsonl(text, set(), shown, _ShiftedProblems(problems, first_line - 1))  # type: ignore[arg-type]
    table.where = [w + first_line - 1 for w in table.where]
    return table

