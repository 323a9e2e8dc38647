"""Check the built files (used by `validate`): schema + rules per row, `file:row:field` messages.

Rows are checked by a fast path equivalent to schema/alpaca.schema.json (tested against it); only a
failing row goes through jsonschema, which words its messages. A missing or stale build says to run
`make data`. Token statistics come from an evenly spaced sample of at most SAMPLE rows per split
(exact for smaller splits), so validating stays fast on large datasets. Each built file is read once: its
rows, its sha256 and the markup warning (pipeline.data.markup) all come from that read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.data.args import DataArgs, rebuild
from pipeline.data.build import SPLITS, all_specs, built_dir, read_manifest
from pipeline.data.built import MANIFEST
from pipeline.data.load import build_problems, edited, make_data, read_rows_hashed, split_parts
from pipeline.data.markup import typed_markup_warnings
from pipeline.data.origins import Origin, built_origins
from pipeline.data.problems import Problems
from pipeline.data.registry import load_schema
from pipeline.errors import UserError
from pipeline.rerun import run_this

SAMPLE = 2000
ALPACA_FIELDS = ("instruction", "input", "output", "system", "history", "tools", "roles")
PROMPT_ROLES, RESPONSE_ROLES = ("user", "observation"), ("assistant", "function")


def row_ok(row: Any) -> bool:
    """True iff the row satisfies alpaca.schema.json (fast path, no messages)."""
    if type(row) is not dict:
        return False
    ins, out, inp = row.get("instruction"), row.get("output"), row.get("input")
    if type(ins) is not str or type(out) is not str or type(inp) is not str or not ins or not out \
            or ins.isspace() or out.isspace():
        return False
    if len(row) > 3:
        if not row.keys() <= set(ALPACA_FIELDS) or type(row.get("system", "")) is not str:
            return False
        history = row.get("history", [])
        if type(history) is not list:
            return False
        for pair in history:
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str or type(pair[1]) is not str:
                return False
        if type(row.get("tools", "")) is not str or ("roles" in row and _roles_problem(row)):
            return False
    return True


def _roles_problem(row: dict) -> str | None:
    """Why a row's roles do not name its turns (one role per turn, prompt and response sides alternating)."""
    roles, history = row.get("roles"), row.get("history", [])
    if type(roles) is not list or type(history) is not list:
        return None  # the schema's message says it
    turns = 2 * (len(history) + 1)
    if len(roles) != turns:
        return f"has {len(roles)} roles for {turns} turns (history, instruction and output); expected one per turn"
    for i, role in enumerate(roles):
        side = RESPONSE_ROLES if i % 2 else PROMPT_ROLES
        if role not in side:
            return f"[{i}] is {role!r}; expected {' or '.join(side)} ({'a response' if i % 2 else 'a prompt'})"
    return None


def pair_ok(row: Any) -> bool:
    """True iff the row satisfies pairwise.schema.json (a preference pair: chosen and rejected in place of output)."""
    if type(row) is not dict or type(row.get("chosen")) is not str or type(row.get("rejected")) is not str:
        return False
    chosen, rejected = row["chosen"], row["rejected"]
    if not chosen or not rejected or chosen.isspace() or rejected.isspace():
        return False
    return row_ok({k: v for k, v in row.items() if k not in ("chosen", "rejected")} | {"output": chosen})


def feedback_ok(row: Any) -> bool:
    """True iff the row satisfies feedback.schema.json (a KTO row: an Alpaca row with a boolean kto_tag)."""
    if type(row) is not dict or type(row.get("kto_tag")) is not bool:
        return False
    rest = {k: v for k, v in row.items() if k != "kto_tag"}
    return "tools" not in rest and "roles" not in rest and row_ok(rest)


def text_ok(row: Any) -> bool:
    text = row.get("text") if type(row) is dict else None
    return type(text) is str and len(row) == 1 and bool(text) and not text.isspace()


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _field(path: Any) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out


def row_messages(row: Any, schema_name: str) -> list[tuple[str, str]]:
    """(field, problem) for each schema violation of one row, worded for people."""
    import jsonschema

    schema = load_schema(schema_name)
    allowed = list(schema["properties"])
    out = []
    for err in jsonschema.Draft202012Validator(schema).iter_errors(row):
        field = _field(err.absolute_path)
        if err.validator == "required":
            for key in err.validator_value:
                if isinstance(err.instance, dict) and key not in err.instance:
                    out.append((_field(list(err.absolute_path) + [key]), "missing"))
        elif err.validator == "additionalProperties":
            for key in sorted(set(err.instance) - set(allowed)):
                out.append((key, f"unknown field; expected {', '.join(allowed)}"))
        elif err.validator == "type":
            words = {"string": "a string", "array": "a list", "object": "an object"}
            out.append((field, f"is {_kind(err.instance)}; expected {words.get(err.validator_value, err.validator_value)}"))
        elif err.validator == "pattern":
            out.append((field, "is blank; expected non-empty text"))
        elif err.validator in ("minItems", "maxItems"):
            out.append((field, f"has {len(err.instance)} items; expected [instruction, response]"))
        else:
            out.append((field, err.message))
    if not out and isinstance(row, dict) and "roles" in row:
        problem = _roles_problem(row)
        if problem:
            out.append(("roles", problem))
    return out


def check_rows(rows: list[Any], file: str, stage: str, problems: Problems,
               origins: Sequence[Origin] | None = None, rebuilt_by: str | None = None) -> None:
    """Schema problems of a built file's rows, `file:row:field`. The build never writes such a row, so the
    file was edited: the message names the built row, and the raw row it came from (`origins`) to fix instead, and
    the command that rebuilds it (`rebuilt_by`: pipeline.data.load.rebuild of the recipe; None: none at hand)."""
    ok, schema_name = {"pt": (text_ok, "text.schema.json"), "dpo": (pair_ok, "pairwise.schema.json"),
                       "kto": (feedback_ok, "feedback.schema.json")}.get(stage, (row_ok, "alpaca.schema.json"))
    for i, row in enumerate(rows, start=1):
        raw = origins[i - 1] if origins is not None and origins[i - 1].file != file else None
        source = f"; the row was built from {raw}" if raw else ""
        if not ok(row):
            for field, text in row_messages(row, schema_name) or [("", "does not match the schema")]:
                problems.add(file, f"{i}:{field}" if field else i, text + source)
        elif stage == "dpo" and row["chosen"] == row["rejected"]:
            problems.add(file, f"{i}:rejected", "equals chosen: the pair states no preference; "
                                                f"{rebuilt_by or run_this('data', None)} removes such pairs" + source)


@dataclass(frozen=True)
class Checked:
    """What check_built reports on valid built data: a summary row per split (format_summary prints them) and the
    warnings about the rows (markup typed in the data), found in the rows it read for the check."""
    summary: list[dict[str, Any]]
    warnings: list[str]


def check_built(data: DataArgs) -> Checked:
    """Validate every built split the recipe uses; UserError listing all problems, else the summary and warnings.
    A pass is kept beside the build (pipeline.data.kept, kind `check`) and read back by the next validate of the same
    built files, settings, tokenizer and code, which then reads no row; a build no longer current (its raw sources
    changed: build_problem) is asked every time, and a failure is never kept: its messages come each time."""
    from pipeline.data.kept import keep, made_key, read

    specs = all_specs(data)
    stale = build_problems(data, (s.name for s in specs))
    if stale:
        raise UserError(stale)
    key = made_key(lambda: check_key(data, specs))  # before the rows are read: a file replaced meanwhile misses
    found = None if key is None else read(data.dataset_dir, "check", key)
    if found is not None and (kept := _kept_checked(found)) is not None:
        return kept
    checked = _check_rows(data, specs)
    if key is not None:
        keep(data.dataset_dir, "check", key, {"summary": checked.summary, "warnings": checked.warnings})
    return checked


def check_key(data: DataArgs, specs: Sequence[Any]) -> dict[str, Any]:
    """Everything check_built's result depends on (pipeline.data.kept's key): every built file it reads (the splits
    by the manifest's sha256, the manifest and origins.json by their own), the raw files' names its warnings show,
    the recipe's data keys (the form: the schema; the template and cutoff_len: the token lengths), the tokenizer,
    the code and the schemas."""
    from pipeline.data.kept import FORMAT, code_digest, file_entry, settings, tokenizer_identity
    from pipeline.data.load import sha256_once
    from pipeline.data.model_tokenizer import available_tokenizer
    from pipeline.data.origins import ORIGINS

    files = []
    for spec in specs:
        directory = built_dir(data.dataset_dir, spec.name)
        recorded = (read_manifest(directory) or {}).get("files") or {}
        for name in (*(f"{split}.json" for split in SPLITS), MANIFEST, ORIGINS):
            path = directory / name
            if path.is_file():
                sha256 = (recorded.get(name) or {}).get("sha256") if name.endswith(SPLITS_JSON) else sha256_once(path)
                files.append(file_entry(spec.name, path, sha256))
    tokenizer = available_tokenizer(data)
    return {"format": FORMAT, "kind": "check", "code": code_digest(), "files": files,
            "sources": [[spec.name, list(spec.shown)] for spec in specs], "data": settings(data),
            "tokenizer": None if tokenizer is None else tokenizer_identity(tokenizer)}


SPLITS_JSON = tuple(f"{split}.json" for split in SPLITS)
SUMMARY_FIELDS = {"dataset": str, "split": str, "file": str, "rows": int, "tokens_min": int, "tokens_mean": float,
                  "tokens_max": int, "over_cutoff_len": int, "sampled": int}
NULLABLE = frozenset(SUMMARY_FIELDS) - {"dataset", "split", "file", "rows"}


def _kept_checked(record: dict[str, Any]) -> Checked | None:
    """The Checked a kept record holds; None unless it has the shape check_built gives (format_summary reads it)."""
    summary, warnings = record.get("summary"), record.get("warnings")
    if not isinstance(summary, list) or not isinstance(warnings, list) or \
            not all(isinstance(line, str) for line in warnings) or not all(map(_summary_row, summary)):
        return None
    return Checked(summary, warnings)


def _summary_row(row: Any) -> bool:
    if not isinstance(row, dict) or set(row) != set(SUMMARY_FIELDS):
        return False
    for name, value in row.items():
        kind = (int, float) if SUMMARY_FIELDS[name] is float else SUMMARY_FIELDS[name]
        if not (value is None and name in NULLABLE or isinstance(value, kind) and not isinstance(value, bool)):
            return False
    return True


def _check_rows(data: DataArgs, specs: Sequence[Any]) -> Checked:
    """check_built's checks of every row and its summary, on a current build."""
    from pipeline.data.model_tokenizer import available_tokenizer

    problems = Problems()
    changed: list[str] = []
    loaded: list[tuple[str, str, Path, list, list[Origin]]] = []
    for spec in specs:
        directory = built_dir(data.dataset_dir, spec.name)
        manifest = read_manifest(directory) or {}
        for split in SPLITS:
            path = directory / f"{split}.json"
            try:
                rows, digest = read_rows_hashed(path, data)  # a bad row is named below, more precisely than the hash can
            except UserError as err:
                changed += err.messages
                continue
            origins = built_origins(path, len(rows), spec.shown)
            check_rows(rows, str(path), data.form, problems, origins, rebuild(data))
            expected = manifest.get("splits", {}).get(split)
            if expected != len(rows):
                problems.add(str(path), None, f"{len(rows):,} rows, but manifest.json says {expected}; "
                             f"{make_data(data)}")
            if not problems.count[str(path)]:
                changed += [m for m in [edited(path, digest, data)] if m]
            loaded.append((spec.name, split, path, rows, origins))
    if changed or problems:
        raise UserError(changed + problems.messages())
    tokenizer = available_tokenizer(data)
    summary = []
    read = {path: (rows, origins) for _, _, path, rows, origins in loaded}
    for split, name, paths in used_files(data):
        rows = [row for path in paths for row in read[path][0]]
        row_origins = [origin for path in paths for origin in read[path][1]]
        pick = np.unique(np.linspace(0, len(rows) - 1, min(SAMPLE, len(rows))).astype(int)) if rows else []
        sample = [rows[i] for i in pick]
        lengths = None if tokenizer is None else _token_lengths(data, sample, tokenizer, [row_origins[i] for i in pick])
        known = lengths is not None and len(lengths) > 0
        summary.append({
            "dataset": name, "split": split, "file": ", ".join(map(str, paths)), "rows": len(rows),
            "tokens_min": int(lengths.min()) if known else None,
            "tokens_mean": round(float(lengths.mean()), 1) if known else None,
            "tokens_max": int(lengths.max()) if known else None,
            # pt documents are cut into windows, so only sft examples can be over cutoff_len
            "over_cutoff_len": None if data.stage == "pt" or lengths is None else int((lengths > data.cutoff_len).sum()),
            "sampled": len(sample) if len(sample) < len(rows) else None,
        })
    warnings = [] if tokenizer is None else typed_markup_warnings(
        tokenizer, data.split_special_tokens, [(name, rows, origins) for name, _, _, rows, origins in loaded])
    return Checked(summary, warnings)


def used_files(data: DataArgs) -> list[tuple[str, str, list[Path]]]:
    """(split, dataset, its built files) for what each stage reads (load.split_parts): "train" the rows training
    reads, "val" those evaluation reads. A dataset only in eval_dataset is evaluated whole (its train.json and
    val.json), and a training dataset's val.json is trained on when eval_dataset names others: per built file, the
    table showed demo_test as train 135 / val 15 where eval reads all 150 rows."""
    out: list[tuple[str, str, list[Path]]] = []
    for split in SPLITS:
        by_dataset: dict[str, list[Path]] = {}
        for name, path in split_parts(data, split):  # the name the recipe gives, not the build folder's
            by_dataset.setdefault(name, []).append(path)
        out += [(split, name, paths) for name, paths in by_dataset.items()]
    return out


def _token_lengths(data: DataArgs, sample: list[dict], tokenizer: Any, origins: list[Origin]) -> np.ndarray:
    """Token lengths of sampled rows as the recipe's stage tokenizes them (no cutoff); a row the template cannot
    render is named by its origin."""
    if data.stage == "pt":
        return np.array([len(t) for t in tokenizer.encode_batch([row["text"] for row in sample])])
    if data.form == "kto":
        from pipeline.data.feedback import encode_feedback

        return encode_feedback(sample, data.chat_template(), tokenizer, cutoff_len=2**62,
                               enable_thinking=data.enable_thinking, origins=origins).lengths
    if data.form == "dpo":
        from pipeline.data.pairs import encode_pairs

        return encode_pairs(sample, data.chat_template(), tokenizer, cutoff_len=2**62,
                            enable_thinking=data.enable_thinking, origins=origins).lengths
    from pipeline.data.tokenize import encode_rows

    return encode_rows(sample, data.chat_template(), tokenizer, cutoff_len=2**62, train_on_prompt=data.train_on_prompt,
                       mask_history=data.mask_history, enable_thinking=data.enable_thinking, origins=origins,
                       rebuilt_by=rebuild(data)).lengths


def _count(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_summary(rows: list[dict[str, Any]]) -> str:
    """The summary as a text table (what `validate` prints)."""
    head = f"{'dataset':<20} {'split':<5} {'rows':>9} {'tokens min':>10} {'mean':>8} {'max':>7} {'>cutoff':>8}"
    lines = [head]
    for s in rows:
        note = f"  (sample of {s['sampled']:,})" if s["sampled"] else ""
        lines.append(f"{s['dataset']:<20} {s['split']:<5} {s['rows']:>9,} {_count(s['tokens_min'], ','):>10} "
                     f"{_count(s['tokens_mean'], ',.1f'):>8} {_count(s['tokens_max'], ','):>7} "
                     f"{_count(s['over_cutoff_len'], ','):>8}{note}")
    return "\n".join(lines)

