"""The dataset registry `<dataset_dir>/dataset_info.json`: names -> files and column mappings.

LLaMA-Factory's dataset_info.json is read as shipped: every entry form it documents is understood
(alpaca / sharegpt with tags, tools, ranking, kto_tag, multimodal columns, hub URLs, folders, .txt
corpora through columns.prompt). Only the entries a recipe names are checked in full (schema plus the
rules the schema cannot say), each problem as `dataset_info.json:line` with a suggestion; entries it
does not name never block - their problems are one summary line (`unused_note`). What a used entry
asks for that this pipeline cannot do (images, ModelScope, loading scripts) or that its stage cannot read (kto_tag
outside stage kto, ranking outside dpo) is refused with why.
"""
from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.args import DataArgs
from pipeline.errors import UserError, did_you_mean
from pipeline.data.jsonpos import key_lines, line_of
from pipeline.names import split_names

REGISTRY_FILE = "dataset_info.json"
SCHEMA_DIR = Path(__file__).with_name("schema")

_COMMON_COLUMNS = {"system": "system", "tools": "tools", "chosen": "chosen", "rejected": "rejected",
                   "kto_tag": "kto_tag", "images": "images", "videos": "videos", "audios": "audios"}
# Columns each formatting takes, with their defaults (as LLaMA-Factory names them).
DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
               **_COMMON_COLUMNS},
    "sharegpt": {"messages": "conversations", **_COMMON_COLUMNS},
    "text": {"text": "text"},
}
DEFAULT_TAGS: dict[str, str] = {
    "role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
    "system_tag": "system", "observation_tag": "observation", "function_tag": "function_call",
}
TABLE_EXTS = (".json", ".jsonl", ".csv", ".tsv", ".parquet")
TEXT_EXTS = (".txt", ".md")
MULTIMODAL_COLUMNS = ("images", "videos", "audios")
# Where a used entry's rows would come from, when not file_name or hf_hub_url: why each is refused.
REFUSED_SOURCES = {
    "ms_hub_url": "ModelScope downloads are not supported: download the files and set file_name (or give the "
                  "same dataset's hf_hub_url)",
    "om_hub_url": "Modelers hub downloads are not supported: download the files and set file_name (or give the "
                  "same dataset's hf_hub_url)",
    "script_url": "dataset loading scripts are refused: they are Python code, and remote code never runs here; "
                  "convert the data to JSON/CSV/Parquet and set file_name",
    "cloud_file_name": "S3/GCS downloads are not supported: download the file and set file_name",
}
HUB_ONLY_KEYS = ("subset", "folder")
# The sharegpt tags of OpenAI-style messages ({"role": "user", "content": ...}), suggested when data or an entry
# looks like that
OPENAI_TAGS = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
               "system_tag": "system"}
# LLaMA-Factory formattings not implemented here: why, and what to write instead
REFUSED_FORMATTINGS = {
    "openai": "LLaMA-Factory's openai converter (assistant tool_calls, consecutive tool results merged, and a "
              "\"detailed thinking off\" line added to the system prompt) is not implemented; OpenAI-style "
              "role/content messages read as \"formatting\": \"sharegpt\" with \"tags\": " + json.dumps(OPENAI_TAGS)
              + ", the entry LLaMA-Factory's data/README.md gives for them",
}


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
    ranking: bool = False  # preference data: chosen/rejected columns (stages dpo, rm)
    given_columns: frozenset[str] = frozenset()  # the columns the entry names explicitly
    template: str = ""  # the recipe's template (named in refusals)
    tool_turns: bool = False  # the template renders tools and function_call/observation turns


@dataclass(frozen=True)
class Registry:
    """The parsed registry: entries, key lines, and each entry's own problems (checked only when used)."""

    entries: dict[str, Any]
    lines: dict[tuple, int]
    shown: str
    problems: dict[str, list[str]]


def dataset_names(data: DataArgs, key: str = "dataset") -> list[str]:
    """`dataset` / `eval_dataset` as a list (a resolved recipe already has lists; plain dicts may not)."""
    return split_names(getattr(data, key))


def _shown(path: str) -> str:
    return os.path.normpath(path)


def read_registry(dataset_dir: str | os.PathLike[str]) -> Registry:
    """The registry with every entry's problems found; UserError only when the file itself is unreadable."""
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
    problems: dict[str, list[tuple[int, str]]] = {}
    for p, first, dup in duplicates:
        problems.setdefault(p[0], []).append(
            (dup, f"{shown}:{dup}: {_path_text(p)} is given twice (first at line {first}); JSON keeps only the last"))
    for name, item in _schema_problems(entries, lines, shown):
        problems.setdefault(name, []).append(item)
    ordered = {name: [text for _, text in sorted(found, key=lambda x: x[0])] for name, found in problems.items()}
    return Registry(entries, lines, shown, ordered)


def unused_note(data: DataArgs) -> str | None:
    """One line about registry entries the recipe does not use that have problems (they never block)."""
    try:
        registry = read_registry(data.dataset_dir)
    except UserError:
        return None
    used = set(dataset_names(data, "dataset")) | set(dataset_names(data, "eval_dataset"))
    broken = [name for name in registry.problems if name not in used]
    if not broken:
        return None
    listed = ", ".join(f"{n} (line {registry.lines.get((n,), '?')})" for n in broken[:5])
    more = f" and {len(broken) - 5} more" if len(broken) > 5 else ""
    return (f"note: {registry.shown}: {len(broken)} entr{'y' if len(broken) == 1 else 'ies'} this recipe does not "
            f"use ha{'s' if len(broken) == 1 else 've'} problems and {'was' if len(broken) == 1 else 'were'} "
            f"skipped: {listed}{more}; name one in `dataset` to see its problems")


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


def _schema_problems(entries: dict[str, Any], lines: dict[tuple, int], shown: str
                     ) -> list[tuple[str, tuple[int, str]]]:
    """(entry name, (line, message)) for every schema problem, so each entry's can be shown only when used."""
    import jsonschema

    schema = load_schema("registry.schema.json")
    validator = jsonschema.Draft202012Validator(schema)
    dataset_schema = schema["$defs"]["dataset"]
    out: list[tuple[str, tuple[int, str]]] = []

    def add(path: tuple, text: str) -> None:
        line = line_of(lines, path)
        out.append((path[0], (line or 0, f"{shown}:{line}: {text}" if line else f"{shown}: {text}")))

    for err in validator.iter_errors(entries):
        path = tuple(err.absolute_path)
        where = _path_text(path)
        if err.validator == "additionalProperties":
            sub = _subschema_at(dataset_schema, path[1:])
            allowed = list(sub.get("properties", {}))
            for key in sorted(set(err.instance) - set(allowed)):
                add(path + (key,), f"{where}: '{key}': unknown field{did_you_mean(key, allowed)}; "
                                   f"allowed: {', '.join(allowed)}")
        elif err.validator == "anyOf" and len(path) == 1:
            add(path, f"{where}: no data source; give 'file_name' (a file or folder relative to dataset_dir) "
                      "or 'hf_hub_url' (a Hugging Face dataset repository)")
        elif err.validator == "enum" and path[-1:] == ("formatting",) and err.instance in REFUSED_FORMATTINGS:
            add(path, f"{where} is {json.dumps(err.instance)}: {REFUSED_FORMATTINGS[err.instance]}")
        elif err.validator == "enum":
            options = ", ".join(map(str, err.validator_value))
            add(path, f"{where} is {json.dumps(err.instance)}; expected one of {options}"
                      f"{did_you_mean(str(err.instance), map(str, err.validator_value))}")
        elif err.validator == "type":
            add(path, f"{where} is {_kind(err.instance)} ({json.dumps(err.instance)[:60]}); "
                      f"expected {_type_words(err.validator_value)}")
        else:
            add(path, f"{where}: {err.message}")
    return out


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


def resolve_datasets(data: DataArgs, key: str = "dataset") -> list[DatasetSpec]:
    """The registry entries the recipe names under `key`, with files found; one UserError for all problems."""
    names = dataset_names(data, key)
    if not names:
        return []
    registry = read_registry(data.dataset_dir)
    entries, shown = registry.entries, registry.shown
    problems: list[str] = []
    specs: list[DatasetSpec] = []
    for name in dict.fromkeys(names):
        if name not in entries:
            known = ", ".join(entries) or "none"
            if len(entries) > 20:
                known = ", ".join(list(entries)[:20]) + f", ... ({len(entries)} in all)"
            problems.append(f"{data.names(key)}: dataset '{name}' is not in {shown}"
                            f"{did_you_mean(name, entries)}; registered: {known}")
            continue
        if registry.problems.get(name):
            problems.extend(registry.problems[name])
            continue
        spec = _spec(name, entries[name], data, registry.lines, shown, problems)
        if spec is not None:
            specs.append(spec)
    if problems:
        raise UserError(problems)
    return specs


def _shared_columns(given: dict[str, str], allowed: dict[str, str], ranking: bool, stage: str
                    ) -> dict[str, list[str]]:
    """Source column -> the fields reading it, where two or more fields read one column and the entry named at
    least one of them: prompt and response on one column built without a word and trained a model to echo its
    prompt. Only fields this entry reads count (pt reads the prompt and query or the text, so `prompt: output` for
    a corpus is fine; response is not read for ranking data, chosen/rejected only for it, tools only when given);
    the defaults never collide among themselves."""
    unread = {*(() if stage == "kto" else ("kto_tag",)), *MULTIMODAL_COLUMNS, *(("response",) if ranking else ("chosen", "rejected"))}
    read = {f: c for f, c in {**allowed, **given}.items()
            if f in allowed and f not in unread and (f != "tools" or f in given)
            and (stage != "pt" or f in ("prompt", "query", "text"))}
    by_column: dict[str, list[str]] = {}
    for field_name, column in read.items():
        by_column.setdefault(column, []).append(field_name)
    return {c: fs for c, fs in by_column.items() if len(fs) > 1 and any(f in given for f in fs)}


def _spec(name: str, entry: dict[str, Any], data: DataArgs, lines: dict[tuple, int], shown: str,
          problems: list[str]) -> DatasetSpec | None:
    """A used entry checked against what the recipe does with it (stage, template), files found."""
    before = len(problems)

    def add(path: tuple, text: str) -> None:
        line = line_of(lines, (name,) + path)
        problems.append(f"{shown}:{line}: \"{name}\"{''.join('.' + p for p in path)}: {text}")

    if name in ("", ".", "..") or "/" in name or "\\" in name:  # else built outside build/, or inside another's
        add((), "a dataset's name is also its build folder (dataset_dir/build/<name>), so it cannot contain '/' or "
                "'\\' or be '.' or '..'; rename the entry (and the recipe's dataset)")
    stage = data.stage
    formatting = entry.get("formatting", "alpaca")
    given = entry.get("columns", {})
    ranking = bool(entry.get("ranking", False))
    allowed = DEFAULT_COLUMNS[formatting]
    for col in given:
        if col not in allowed:
            add(("columns", col), f"column '{col}' does not apply to formatting '{formatting}'; "
                                  f"it takes: {', '.join(allowed)}")
    for column, fields in _shared_columns(given, allowed, ranking, stage).items():
        named = " and ".join(f"'{f}'" + ("" if f in given else " (by default)") for f in fields)
        echo = " (a model trained so learns to repeat its prompt)" if {"prompt", "response"} <= set(fields) else ""
        add(("columns", next(f for f in fields if f in given)),
            f"{named} {'both' if len(fields) == 2 else 'all'} read column '{column}'; each field needs its own "
            f"column{echo}")
    for col in MULTIMODAL_COLUMNS:
        if col in given:
            add(("columns", col), f"multimodal data ({col}) is not supported: the models here read text only (an "
                                  "image-text checkpoint such as Gemma3ForConditionalGeneration trains its language "
                                  "model, its vision tower carried to the export unchanged); name a text-only dataset")
    if "kto_tag" in given and data.form != "kto":
        add(("columns", "kto_tag"), "KTO data (a desirable/undesirable label per row) trains with stage: kto; rows "
                                    f"labelled undesirable would be learned as good answers under stage {stage}; "
                                    "set stage: kto, or name a dataset without kto_tag")
    if data.form == "kto" and "kto_tag" not in given:
        add(("columns",) if "columns" in entry else (), "has no kto_tag column but the recipe's stage is kto, which "
            "trains on responses tagged desirable or not; give the entry \"columns\": {\"kto_tag\": \"<the column "
            "holding true/false>\"} (LLaMA-Factory's KTO format), or set stage: sft")
    if data.form == "kto" and ranking:
        add(("ranking",), "preference pairs (ranking: true) train with stage: dpo (or rm); stage kto takes one "
                          "response per prompt with a kto_tag; remove \"ranking\" or set stage: dpo")
    elif ranking and data.form != "dpo":  # kto's own line above says it for stage kto: one message per mistake
        add(("ranking",), f"preference data (ranking: true: chosen/rejected answers) trains with stage: dpo, but the "
                          f"recipe's stage is {stage}; set stage: dpo (or rm: a reward model), or name an instruction "
                          "dataset")
    if ranking and formatting == "text":
        add(("ranking",), "ranking data needs formatting 'alpaca' or 'sharegpt' (a prompt with chosen and rejected "
                          "responses), not 'text'")
    if not ranking and data.form == "dpo":
        add(("ranking",) if "ranking" in entry else (), f"has no preference pairs but the recipe's stage is {stage}, "
            "which trains on chosen/rejected pairs; give the dataset \"ranking\": true with chosen and rejected "
            "columns (LLaMA-Factory's ranking format), or set stage: sft")
    if not ranking:
        for col in ("chosen", "rejected"):
            if col in given:
                add(("columns", col), f"column '{col}' is read only for preference data; add \"ranking\": true "
                                      "(and train with stage: dpo) or remove the column")
    renders_tools = _renders_tools(data.template)
    if "tools" in given and not renders_tools:
        from pipeline.data.templates import tool_refusal

        add(("columns", "tools"), tool_refusal(data.template))
    if "tools" in given and ranking:
        add(("columns", "tools"), "function-calling preference data is not supported (stage dpo trains on "
                                  "user/assistant conversations); remove the tools column or train with stage: sft")
    if "tags" in entry and formatting != "sharegpt":
        add(("tags",), f"tags apply only to formatting 'sharegpt' (this entry is '{formatting}')")
    if formatting == "sharegpt" and stage == "pt":
        add(("formatting",), "stage pt reads text corpora: use formatting 'text' (or 'alpaca' with columns.prompt)")
    if formatting == "text" and stage == "sft":
        add(("formatting",), "is 'text' (a pretraining corpus) but the recipe's stage is sft, which needs "
                             "alpaca or sharegpt rows; set stage: pt or name another dataset")
    columns = {**allowed, **given}
    tags = {**DEFAULT_TAGS, **entry.get("tags", {})}
    if "hf_hub_url" in entry:
        from pipeline.data.hub import hub_files

        files, shown_files = hub_files(entry, add, data)
    elif "file_name" in entry:
        for key in HUB_ONLY_KEYS:
            if key in entry:
                add((key,), f"'{key}' applies to hf_hub_url entries; for local data, point file_name at the file "
                            "or folder itself")
        if entry.get("split", "train") != "train":
            add(("split",), f"is {entry['split']!r}, but a local file is one split (train); keep one file per split "
                            "and register each under its own name")
        files, shown_files = _find_files(name, entry["file_name"], formatting, Path(data.dataset_dir), add)
    else:
        key = next(k for k in REFUSED_SOURCES if k in entry)
        add((key,), REFUSED_SOURCES[key])
        files, shown_files = [], []
    if formatting == "alpaca" and stage != "pt" and any(p.suffix.lower() in TEXT_EXTS for p in files):
        add(("file_name",), "a .txt file holds lines of text (column 'text'), a pretraining corpus; stage "
                            f"{stage} needs instruction/output rows: set stage: pt, or use a JSON/CSV file")
    if len(problems) > before:
        return None
    num_samples = entry.get("num_samples")  # JSON Schema's integer admits 3.0: a row count all the same
    return DatasetSpec(name=name, formatting=formatting, files=tuple(files), shown=tuple(shown_files), columns=columns,
                       tags=tags, num_samples=None if num_samples is None else int(num_samples), entry=entry,
                       registry=shown, line=lines.get((name,)), ranking=ranking, given_columns=frozenset(given),
                       template=data.template, tool_turns=renders_tools)


def _renders_tools(template: str) -> bool:
    from pipeline.data.templates import TEMPLATES

    found = TEMPLATES.get(template)
    return found is not None and found.tool_format is not None


def _find_files(name: str, file_name: str, formatting: str, dataset_dir: Path, add) -> tuple[list[Path], list[str]]:
    """The source files of an entry: one file, or a folder's supported files (sorted); paths checked."""
    given = Path(file_name)
    inside = not given.is_absolute()
    path = dataset_dir / given if inside else given
    base = dataset_dir.resolve()
    exts = TEXT_EXTS if formatting == "text" else TABLE_EXTS + TEXT_EXTS if formatting == "alpaca" else TABLE_EXTS
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
    if formatting == "alpaca" and any(p.suffix.lower() in TABLE_EXTS for p in found):
        found = [p for p in found if p.suffix.lower() in TABLE_EXTS]  # a README.md beside the data is not data
    escaping = [p for p in found if escapes(p)]
    for p in escaping:
        add(("file_name",), f"{_shown(str(p))} (in folder '{file_name}') resolves to {p.resolve()}, outside "
                            f"dataset_dir ({base}); refused")
    if not found:
        add(("file_name",), f"folder {_shown(str(path))} holds no {', '.join(exts)} files")
    if escaping or not found:
        return [], []
    return found, [_shown(str(p)) for p in found]


def source_paths(data: DataArgs) -> list[Path]:
    """Every file a recipe's data depends on (registry + sources); for the Makefile's dependency list."""
    specs = resolve_datasets(data, "dataset") + resolve_datasets(data, "eval_dataset")
    paths = [Path(data.dataset_dir) / REGISTRY_FILE]
    for spec in specs:
        paths.extend(p for p in spec.files if p not in paths)
    return paths
