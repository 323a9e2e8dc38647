"""The dataset registry `<dataset_dir>/dataset_info.json`: names -> files and column mappings.

LLaMA-Factory compatible for local files. Validated by schema/registry.schema.json plus rules the
schema cannot say (which columns fit which formatting, paths that stay inside dataset_dir). Every
problem names `dataset_info.json:line`; nothing unknown is ignored.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import UserError, did_you_mean
from pipeline.data.jsonpos import key_lines, line_of

REGISTRY_FILE = "dataset_info.json"
SCHEMA_DIR = Path(__file__).with_name("schema")

DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "system": "system",
               "history": "history"},
    "sharegpt": {"messages": "conversations", "system": "system"},
    "text": {"text": "text"},
}
DEFAULT_TAGS: dict[str, str] = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call",
}
TABLE_EXTS = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
TEXT_EXTS = (".txt", ".md")
# LLaMA-Factory keys for remote datasets: recognised, so the message can say what to do instead.
HUB_KEYS = ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloudfile", "subset", "folder", "split")


@functools.lru_cache(maxsize=None)
def load_schema(name: str) -> dict[str, Any]:
    with open(SCHEMA_DIR / name, encoding="utf-8") as handle:
        return json.load(handle)


@dataclass(frozen=True)
class DatasetSpec:
    """One registry entry, checked and with its files found."""

    name: str
    formatting: str
    files: tuple[Path, ...]
    shown: tuple[str, ...]  # how each file is named in messages
    columns: dict[str, str]
    tags: dict[str, str]
    num_samples: int | None
    entry: dict[str, Any] = field(repr=False)  # the registry entry as written (part of the build key)
    registry: str = ""
    line: int | None = None


def dataset_names(r: Mapping[str, Any], key: str = "dataset") -> list[str]:
    """`dataset` / `eval_dataset` as a list (a resolved recipe already has lists; plain dicts may not)."""
    value = r[key]
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    return [name.strip() for name in value if name and name.strip()]


def recipe_where(r: Mapping[str, Any], key: str) -> str:
    """`recipes/x.yaml:5` (or 'cli', 'default') for a recipe key, when the recipe knows it."""
    source = getattr(r, "source", None)
    if callable(source):
        try:
            return str(source(key))
        except Exception:  # a plain mapping stand-in, or a key without provenance
            return f"recipe key '{key}'"
    return f"recipe key '{key}'"


def _shown(path: str) -> str:
    return os.path.normpath(path)


def read_registry(dataset_dir: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[tuple, int], str]:
    """(entries, key lines, registry path as shown); UserError on a missing, non-JSON or invalid file."""
    path = Path(dataset_dir) / REGISTRY_FILE
    shown = _shown(str(path))
    if not Path(dataset_dir).is_dir():
        raise UserError(f"dataset_dir '{dataset_dir}' is not a folder; it must hold {REGISTRY_FILE} and the raw files")
    if not path.is_file():
        raise UserError(f"{shown}: not found; create the dataset registry there (see docs/datasets.md: the registry)")
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise UserError(f"{shown}:{line}: not valid UTF-8 at byte offset {err.start}; save the file as UTF-8") from None
    try:
        entries = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise UserError(f"{shown}:{err.lineno}: invalid JSON at column {err.colno}: {err.msg}") from None
    except ValueError as err:
        raise UserError(f"{shown}: {err}") from None
    if not isinstance(entries, dict):
        raise UserError(f"{shown}:1: expected a JSON object mapping dataset names to entries, got {_kind(entries)}")
    lines, duplicates = key_lines(text)
    problems = [f"{shown}:{dup}: {_path_text(p)} is given twice (first at line {first}); JSON keeps only the last"
                for p, first, dup in duplicates]
    problems += _schema_problems(entries, lines, shown)
    if problems:
        raise UserError(problems)
    return entries, lines, shown


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (use a number or null)")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _path_text(path: tuple) -> str:
    if not path:
        return "the registry"
    head, *rest = path
    return f'"{head}"' + "".join(f".{p}" if isinstance(p, str) else f"[{p}]" for p in rest)


def _schema_problems(entries: dict[str, Any], lines: dict[tuple, int], shown: str) -> list[str]:
    import jsonschema

    schema = load_schema("registry.schema.json")
    validator = jsonschema.Draft202012Validator(schema)
    dataset_schema = schema["$defs"]["dataset"]
    out: list[tuple[int, str]] = []

    def add(path: tuple, text: str) -> None:
        line = line_of(lines, path)
        out.append((line or 0, f"{shown}:{line}: {text}" if line else f"{shown}: {text}"))

    for err in validator.iter_errors(entries):
        path = tuple(err.absolute_path)
        where = _path_text(path)
        if err.validator == "additionalProperties":
            sub = _subschema_at(dataset_schema, path[1:])
            allowed = list(sub.get("properties", {}))
            for key in sorted(set(err.instance) - set(allowed)):
                if key in HUB_KEYS:
                    hint = ("remote datasets are not downloaded (no network): download the file into dataset_dir "
                            "and set file_name")
                else:
                    hint = f"unknown field{did_you_mean(key, allowed)}; allowed: {', '.join(allowed)}"
                add(path + (key,), f"{where}: '{key}': {hint}")
        elif err.validator == "enum":
            options = ", ".join(map(str, err.validator_value))
            add(path, f"{where} is {json.dumps(err.instance)}; expected one of {options}"
                      f"{did_you_mean(str(err.instance), map(str, err.validator_value))}")
        elif err.validator == "type":
            add(path, f"{where} is {_kind(err.instance)} ({json.dumps(err.instance)[:60]}); "
                      f"expected {_type_words(err.validator_value)}")
        elif err.validator == "required":
            missing = [k for k in err.validator_value if k not in err.instance]
            for key in missing:
                add(path, f"{where}: missing '{key}' (the data file, relative to dataset_dir)")
        else:
            add(path, f"{where}: {err.message}")
    return [text for _, text in sorted(out, key=lambda item: item[0])]


def _type_words(value: Any) -> str:
    words = {"object": "an object", "string": "a string", "integer": "an integer", "boolean": "true or false",
             "array": "a list", "number": "a number", "null": "null"}
    values = value if isinstance(value, list) else [value]
    return " or ".join(words.get(v, v) for v in values)


def _subschema_at(schema: dict[str, Any], path: tuple) -> dict[str, Any]:
    for key in path:
        schema = schema.get("properties", {}).get(key, {})
        if "$ref" in schema:
            schema = load_schema("registry.schema.json")["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def resolve_datasets(r: Mapping[str, Any], key: str = "dataset") -> list[DatasetSpec]:
    """The registry entries the recipe names under `key`, with files found; one UserError for all problems."""
    names = dataset_names(r, key)
    if not names:
        return []
    entries, lines, shown = read_registry(r["dataset_dir"])
    problems: list[str] = []
    specs: list[DatasetSpec] = []
    for name in dict.fromkeys(names):
        if name not in entries:
            known = ", ".join(entries) or "none"
            problems.append(f"{recipe_where(r, key)}: dataset '{name}' is not in {shown}"
                            f"{did_you_mean(name, entries)}; registered: {known}")
            continue
        spec = _spec(name, entries[name], r, lines, shown, problems)
        if spec is not None:
            specs.append(spec)
    if problems:
        raise UserError(problems)
    return specs


def _spec(name: str, entry: dict[str, Any], r: Mapping[str, Any], lines: dict[tuple, int], shown: str,
          problems: list[str]) -> DatasetSpec | None:
    before = len(problems)

    def add(path: tuple, text: str) -> None:
        line = line_of(lines, (name,) + path)
        problems.append(f"{shown}:{line}: \"{name}\"{''.join('.' + p for p in path)}: {text}")

    formatting = entry.get("formatting", "alpaca")
    if entry.get("ranking"):
        add(("ranking",), "preference data (ranking: true) is not supported; the stages are pt and sft")
    allowed = DEFAULT_COLUMNS[formatting]
    for col in entry.get("columns", {}):
        if col not in allowed:
            add(("columns", col), f"column '{col}' does not apply to formatting '{formatting}'; "
                                  f"it takes: {', '.join(allowed)}")
    if "tags" in entry and formatting != "sharegpt":
        add(("tags",), f"tags apply only to formatting 'sharegpt' (this entry is '{formatting}')")
    if formatting == "sharegpt" and r["stage"] == "pt":
        add(("formatting",), "stage pt reads text corpora: use formatting 'text' (or 'alpaca' with columns.prompt)")
    if formatting == "text" and r["stage"] == "sft":
        add(("formatting",), "is 'text' (a pretraining corpus) but the recipe's stage is sft, which needs "
                             "alpaca or sharegpt rows; set stage: pt or name another dataset")
    columns = {**allowed, **entry.get("columns", {})}
    tags = {**DEFAULT_TAGS, **entry.get("tags", {})}
    files, shown_files = _find_files(name, entry["file_name"], formatting, Path(r["dataset_dir"]), add)
    if len(problems) > before:
        return None
    return DatasetSpec(name=name, formatting=formatting, files=tuple(files), shown=tuple(shown_files),
                       columns=columns, tags=tags, num_samples=entry.get("num_samples"), entry=entry,
                       registry=shown, line=lines.get((name,)))


def _find_files(name: str, file_name: str, formatting: str, dataset_dir: Path, add) -> tuple[list[Path], list[str]]:
    """The source files of an entry: one file, or a folder's supported files (sorted); paths checked."""
    given = Path(file_name)
    inside = not given.is_absolute()
    path = dataset_dir / given if inside else given
    base = dataset_dir.resolve()
    exts = TEXT_EXTS if formatting == "text" else TABLE_EXTS
    if formatting == "text" and path.suffix.lower() in TABLE_EXTS:
        exts = TABLE_EXTS  # a corpus in a table/JSON file: its text column holds the documents

    def escapes(p: Path) -> bool:
        return inside and not p.resolve().is_relative_to(base)

    if escapes(path):
        add(("file_name",), f"'{file_name}' resolves to {path.resolve()}, outside dataset_dir ({base}); refused. "
                            "Move the file into dataset_dir, or write its absolute path in the registry")
        return [], []
    if not path.exists():
        parent = path.parent
        near = did_you_mean(path.name, [p.name for p in parent.iterdir()]) if parent.is_dir() else ""
        add(("file_name",), f"{_shown(str(path))} does not exist{near}")
        return [], []
    if path.is_file():
        if path.suffix.lower() not in exts:
            add(("file_name",), f"{_shown(str(path))}: unsupported file type '{path.suffix}' for formatting "
                                f"'{formatting}'; expected {', '.join(exts)}")
            return [], []
        return [path], [_shown(str(path))]
    skip = (base / "build", base / REGISTRY_FILE)  # never read our own output or the registry as data
    found = sorted(p for p in path.rglob("*") if p.suffix.lower() in exts and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(path).parts)
                   and not any(p.resolve() == s or p.resolve().is_relative_to(s) for s in skip))
    escaping = [p for p in found if escapes(p)]
    for p in escaping:
        add(("file_name",), f"{_shown(str(p))} (in folder '{file_name}') resolves to {p.resolve()}, outside "
                            f"dataset_dir ({base}); refused")
    if not found:
        add(("file_name",), f"folder {_shown(str(path))} holds no {', '.join(exts)} files")
    if escaping or not found:
        return [], []
    return found, [_shown(str(p)) for p in found]


def source_paths(r: Mapping[str, Any]) -> list[Path]:
    """Every file a recipe's data depends on (registry + sources); for the Makefile's dependency list."""
    specs = resolve_datasets(r, "dataset") + resolve_datasets(r, "eval_dataset")
    paths = [Path(r["dataset_dir"]) / REGISTRY_FILE]
    for spec in specs:
        paths.extend(p for p in spec.files if p not in paths)
    return paths
