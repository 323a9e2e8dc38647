"""Read recipe YAML with a line:column for every key, follow `extends:`, parse `key=value` overrides.

Scalars follow YAML 1.2's core schema, not PyYAML's YAML 1.1 defaults: `5e-5` and `1e3` are floats,
only true/false are booleans (`yes`, `no`, `on`, `off` stay strings and the schema reports them),
`010` is ten and `1:30` is a string. Duplicate keys are an error, and only plain data tags are read
(python/object tags are refused). Every problem becomes a UserError message `file:line:column: ...`.
A duplicate key leaves the recipe readable (the last value is kept), so it is reported together with the schema's
and the rules' problems (`Chain.problems`) rather than alone: a user fixes every mistake in one pass.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pipeline.errors import UserError, article, did_you_mean

_Y = "tag:yaml.org,2002:"
STR, INT, FLOAT, BOOL, NULL, SEQ, MAP = (_Y + t for t in ("str", "int", "float", "bool", "null", "seq", "map"))
_MAX_NODES = 100_000  # alias bombs ("billion laughs") stop here
_MAX_DEPTH = 64


@dataclass(frozen=True)
class Origin:
    """Where a value came from: a file position, a command line override, a default or a derivation."""

    kind: str  # "file" | "cli" | "default" | "derived"
    file: str | None = None  # as shown to the user (relative when the recipe was given relative)
    line: int = 0  # 1-based
    column: int = 0  # 1-based
    text: str | None = None  # the override as typed, for kind "cli"

    @property
    def provenance(self) -> str:
        """`recipes/x.yaml:12`, `cli`, `default` or `derived`."""
        return f"{self.file}:{self.line}" if self.kind == "file" else self.kind

    @property
    def where(self) -> str:
        """Prefix for error messages: `recipes/x.yaml:12:5` or `command line override key=value`."""
        if self.kind == "file":
            return f"{self.file}:{self.line}:{self.column}"
        if self.kind == "cli":
            return f"command line override {self.text}"
        return f"{self.kind} value"

    @property
    def cited(self) -> str:
        """How a message cites where a key was set, the key named after it: `recipes/x.yaml:12` (provenance) for a
        file, for the command line the override as typed (`command line override output_dir=x`, as `where` and
        every rule's message say it; the bare provenance `cli` read "cli: output_dir: ...")."""
        return self.where if self.kind == "cli" else self.provenance

    def names(self, key: str) -> str:
        """How a message names recipe key `key` set here: `recipes/x.yaml:12: key`, `command line override
        key=value: key`, or the bare `key` for a default or derived value (recipe.args.key_at)."""
        return f"{self.cited}: {key}" if self.kind in ("file", "cli") else key

    def derived(self) -> "Origin":
        """The origin of a value the pipeline derived from this one (a run's output_dir made its adapter/ or model/
        folder): kind derived, as plan shows it, keeping the file position where the user wrote it, so that a rule
        about the derived value still names that line."""
        return Origin("derived", self.file, self.line, self.column) if self.kind == "file" else DERIVED


DEFAULT = Origin("default")
DERIVED = Origin("derived")


@dataclass(frozen=True)
class Entry:
    value: Any
    origin: Origin  # of the value (its column points at the value)
    key_origin: Origin  # of the key (unknown-key messages point here)


class _Loader(yaml.SafeLoader):
    """Composes nodes only; the implicit resolvers are YAML 1.2 core schema."""

    yaml_implicit_resolvers: dict = {}


for _tag, _regex, _first in (
    (NULL, r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    (BOOL, r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    (INT, r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    (
        FLOAT,
        r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
        list("-+.0123456789"),
    ),
):
    _Loader.add_implicit_resolver(_tag, re.compile(_regex), _first)


class _Builder:
    """Turns composed nodes into Python values, collecting every problem instead of stopping at one.

    `errors`: the value could not be read. `duplicates`: ((file, line, column), message) of each key set twice,
    the last value kept, so that the caller may go on and validate the recipe."""

    def __init__(self, file: str, errors: list[str]):
        self.file, self.errors, self.count = file, errors, 0
        self.duplicates: list[tuple[tuple[str, int, int], str]] = []

    def at(self, node: Node) -> Origin:
        return Origin("file", self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def error(self, node: Node, message: str) -> None:
        self.errors.append(f"{self.at(node).where}: {message}")

    def value(self, node: Node, depth: int = 0) -> Any:
        self.count += 1
        if self.count > _MAX_NODES or depth > _MAX_DEPTH:
            if self.count == _MAX_NODES + 1 or depth == _MAX_DEPTH + 1:
                self.error(node, "the value is too large or too deeply nested (recursive anchor?)")
            return None
        tag = node.tag
        if _is_python(tag):
            self.error(node, _PYTHON_REFUSED.format(tag=_short(tag)))
            return None
        if isinstance(node, ScalarNode):
            return self.scalar(node)
        if isinstance(node, SequenceNode) and tag == SEQ:
            return [self.value(child, depth + 1) for child in node.value]
        if isinstance(node, MappingNode) and tag == MAP:
            return {key: self.value(v, depth + 1) for key, (_, v) in self.mapping(node).items()}
        self.error(node, f"unsupported tag '{_short(tag)}'; use plain YAML values (strings, numbers, lists)")
        return None

    def scalar(self, node: ScalarNode) -> Any:
        text, tag = node.value, node.tag
        try:
            if tag in (STR, "!"):
                return text
            if tag == NULL:
                return None
            if tag == BOOL:
                if text.lower() not in ("true", "false"):
                    raise ValueError(text)
                return text.lower() == "true"
            if tag == INT:
                return _parse_int(text)
            if tag == FLOAT:
                return _parse_float(text)
        except ValueError:
            self.error(node, f"cannot read {text!r} as {_short(tag)}")
            return None
        self.error(node, f"unsupported tag '{_short(tag)}'; use plain YAML values (strings, numbers, lists)")
        return None

    def mapping(self, node: MappingNode) -> dict[str, tuple[ScalarNode, Node]]:
        """key -> (key node, value node); duplicate (the last one kept) and non-string keys are reported."""
        seen: dict[str, tuple[ScalarNode, Node]] = {}
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode) or key_node.tag not in (STR, "!"):
                shown = key_node.value if isinstance(key_node, ScalarNode) else "a list or mapping"
                self.error(key_node, f"key {shown!r} is not a name; keys are plain words such as learning_rate")
                continue
            key = key_node.value
            if key in seen:
                at = self.at(key_node)
                self.duplicates.append(((self.file, at.line, at.column), (
                    f"{at.where}: duplicate key '{key}' (first set on line {first_line[key]}, again on line "
                    f"{at.line}); keep one")))
                del seen[key]  # the last value counts, in its place
            first_line.setdefault(key, key_node.start_mark.line + 1)
            seen[key] = (key_node, value_node)
        return seen


_PYTHON_REFUSED = "tag '{tag}' refused: a recipe is plain data, python tags could run code"


def _is_python(tag: str) -> bool:
    return tag.startswith(_Y + "python/") or tag.startswith("!!python")


def _short(tag: str) -> str:
    return "!!" + tag[len(_Y):] if tag.startswith(_Y) else tag


def _parse_int(text: str) -> int:
    if text.startswith("0o"):
        return int(text[2:], 8)
    if text.startswith("0x"):
        return int(text[2:], 16)
    return int(text, 10)


def _parse_float(text: str) -> float:
    lowered = text.lower()
    if lowered.endswith(".inf"):
        return -math.inf if text.startswith("-") else math.inf
    if lowered == ".nan":
        return math.nan
    return float(text)


def _yaml_problem(err: yaml.YAMLError, text: str = "") -> tuple[int, int, str]:
    """(line, column, message) of a PyYAML error, 1-based."""
    if isinstance(err, yaml.reader.ReaderError):  # a control character: PyYAML gives only its offset
        offset = err.position if isinstance(err.position, int) else 0
        line = text.count("\n", 0, offset) + 1
        char = chr(err.character) if isinstance(err.character, int) else str(err.character)
        return line, offset - (text.rfind("\n", 0, offset) + 1) + 1, (
            f"control character {char!r} ({err.reason}); a recipe is plain text")
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    context_mark = getattr(err, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        problem = f"{problem} ({context} on line {context_mark.line + 1})"
    return line, col, problem


def _tab_positions(text: str) -> list[tuple[int, int]]:
    """(line, column) of every tab outside quotes and comments: YAML allows none there."""
    found = []
    for lineno, line in enumerate(text.splitlines(), 1):
        quote = None
        for col, ch in enumerate(line, 1):
            if quote:
                if ch == quote:
                    quote = None
            elif ch in "'\"":
                quote = ch
            elif ch == "#":
                break
            elif ch == "\t":
                found.append((lineno, col))
                break
    return found


def _decode(data: bytes, file: str) -> str:
    for bom, name in ((b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe\x00\x00", "UTF-32"),
                      (b"\xfe\xff", "UTF-16"), (b"\xff\xfe", "UTF-16")):
        if data.startswith(bom):
            raise UserError(f"{file}:1:1: the file is {name} encoded (it starts with {article(name)} {name} byte order mark); "
                            "save it as UTF-8")
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte order mark (Windows editors) is harmless: drop it
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise UserError(f"{file}:{line}:{col}: the file is not UTF-8 (byte 0x{data[err.start]:02x}); "
                        "save it as UTF-8") from None


def compose(text: str, file: str) -> Node | None:
    """Parse YAML text into a node tree; syntax errors (tabs included) become UserError."""
    try:
        return yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as err:
        line, col, problem = _yaml_problem(err, text)
        if "'\\t'" in problem or "\\t" in problem:
            tabs = _tab_positions(text) or [(line, col)]
            raise UserError([f"{file}:{ln}:{c}: tab character; YAML indents and separates with spaces, not tabs"
                             for ln, c in tabs]) from None
        raise UserError(f"{file}:{line}:{col}: invalid YAML: {problem}") from None


def read_recipe_file(path: Path, file: str) -> dict[str, Entry]:
    """One recipe file -> key -> Entry. Raises UserError listing every problem in the file."""
    entries, duplicates = _read_recipe_file(path, file)
    if duplicates:
        raise UserError([message for _, message in duplicates])
    return entries


def _read_recipe_file(path: Path, file: str) -> tuple[dict[str, Entry], list[tuple[tuple[str, int, int], str]]]:
    """One recipe file -> (key -> Entry, its duplicate keys). Raises UserError listing every problem in the file
    when one leaves a value unreadable (duplicate keys included, then)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{file}: cannot read the recipe: {err.strerror}") from None
    text = _decode(data, file)
    root = compose(text, file)
    if root is None or (isinstance(root, ScalarNode) and root.tag == NULL):
        raise UserError(f"{file}:1:1: the recipe is empty; expected 'key: value' lines such as 'model_name_or_path: tiny'")
    if not isinstance(root, MappingNode) or root.tag != MAP:
        at = f"{file}:{root.start_mark.line + 1}:{root.start_mark.column + 1}"
        if root.tag not in (MAP, SEQ, STR, INT, FLOAT, BOOL):  # a tag on the whole recipe: its node is no answer
            problem = _PYTHON_REFUSED if _is_python(root.tag) else "unsupported tag '{tag}' on the recipe"
            raise UserError(f"{at}: {problem.format(tag=_short(root.tag))}; remove the tag (the recipe is a "
                            "mapping of 'key: value' lines)")
        kind = "a list" if isinstance(root, SequenceNode) else f"the single value {root.value!r}"
        raise UserError(f"{at}: the recipe must be a mapping of 'key: value' lines, found {kind}")
    errors: list[str] = []
    builder = _Builder(file, errors)
    entries = {
        key: Entry(builder.value(value_node), builder.at(value_node), builder.at(key_node))
        for key, (key_node, value_node) in builder.mapping(root).items()
    }
    if errors:
        raise UserError(sorted(errors + [m for _, m in builder.duplicates], key=_position))
    return entries, builder.duplicates


def _position(message: str) -> tuple[int, int]:
    """(line, column) of a `file:line:column: ...` message of one file, for listing them in file order."""
    found = re.search(r":(\d+):(\d+): ", message)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def parse_value(text: str, origin: Origin) -> Any:
    """Parse one override value with the recipe's YAML rules (`[c_attn,c_fc]` is a list, `5e-5` a float)."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as err:
        _, _, problem = _yaml_problem(err)
        raise UserError(f"{origin.where}: the value is not valid YAML: {problem}") from None
    if node is None:
        return None
    errors: list[str] = []
    builder = _Builder("<override>", errors)
    value = builder.value(node)
    errors += [message for _, message in builder.duplicates]
    if errors:
        raise UserError([f"{origin.where}: {e.split(': ', 1)[1]}" for e in errors])
    return value


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_overrides(overrides: Iterable[str]) -> dict[str, Entry]:
    """`key=value` strings -> key -> Entry (the last one wins when a key repeats, like make variables)."""
    out, errors = parse_overrides_partial(overrides)
    if errors:
        raise UserError(errors)
    return out


def parse_overrides_partial(overrides: Iterable[str]) -> tuple[dict[str, Entry], list[str]]:
    """The overrides that parse, and a message for each that does not."""
    out: dict[str, Entry] = {}
    errors: list[str] = []
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        origin = Origin("cli", text=text)
        if not sep or not _KEY.match(key):
            errors.append(f"command line override {text!r}: expected key=value, e.g. learning_rate=5e-5 "
                          "or lora_target=[c_attn,c_fc]")
            continue
        if key == "extends":
            errors.append(f"{origin.where}: extends cannot be set on the command line; "
                          "put it in the recipe or pass another recipe")
            continue
        try:
            out[key] = Entry(parse_value(raw, origin), origin, origin)
        except UserError as err:
            errors.extend(err.messages)
    return out, errors


def shown_path(base_file: str, target: str) -> str:
    """The path of `target` relative to the folder of `base_file`, as the user would type it."""
    if os.path.isabs(target):
        return os.path.normpath(target)
    return os.path.normpath(os.path.join(os.path.dirname(base_file), target))


def shown_here(path: Path) -> Path:
    """A path as make and the messages name it: relative to the working directory when inside it."""
    relative = os.path.relpath(path)
    return path if relative.startswith(os.pardir) else Path(relative)


def _extends_targets(entry: Entry, errors: list[str]) -> list[str]:
    value = entry.value
    if value is None:
        return []
    if isinstance(value, str) and value:
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, str) and v for v in value):
        return list(value)
    errors.append(f"{entry.origin.where}: extends: given {value!r}, expected a file name or a list of file names")
    return []


@dataclass
class Chain:
    """A recipe and everything it extends: layers in merge order (bases first, the recipe last)."""

    layers: list[dict[str, Entry]]
    files: list[str]  # every file read, the recipe first, as shown to the user
    # ((file, line, column), message) of what does not stop the reading (duplicate keys): the caller reports them
    # with the validation's problems
    problems: list[tuple[tuple[str, int, int], str]] = field(default_factory=list)


def _not_a_recipe(file: str) -> str:
    """Why `file` cannot be read as a recipe; a misspelt name (`recipes/demo_sf.yaml`) gets its closest sibling."""
    if os.path.exists(file):
        return f"{file}: recipe not found"
    folder = os.path.dirname(file)
    siblings = [n for n in os.listdir(folder or ".") if n.endswith((".yaml", ".yml"))] \
        if os.path.isdir(folder or ".") else []
    # names compared alone (whole paths sharing a long folder were all 'close'), shown with the folder as typed
    hint = did_you_mean(os.path.basename(file), siblings, show=lambda name: os.path.join(folder, name))
    return f"{file}: recipe not found (looked in {os.path.abspath(file)}){hint}"


def load_chain(path: str | os.PathLike[str]) -> Chain:
    """Read a recipe and its extends chain; report missing files, cycles and self-reference."""
    file = os.fspath(path)
    errors: list[str] = []
    chain = Chain([], [])
    if os.path.isdir(file):
        inside = sorted(p.name for p in Path(file).glob("*.y*ml"))
        raise UserError(f"{file}: is a directory, not a recipe file; give one of its recipes" +
                        (f", e.g. {os.path.join(file, inside[0])} ({len(inside)} there)" if inside else ""))
    if not os.path.isfile(file):
        raise UserError(_not_a_recipe(file))
    _load_into(file, [], None, chain, errors)
    if errors:
        raise UserError(list(dict.fromkeys(errors + [message for _, message in chain.problems])))
    return chain


def _load_into(file: str, stack: list[tuple[str, str]], via: Origin | None, chain: Chain, errors: list[str]) -> None:
    real = os.path.realpath(file)
    names = [shown for shown, _ in stack]
    for i, (_, seen_real) in enumerate(stack):
        if seen_real == real:
            assert via is not None
            if i == len(stack) - 1:
                errors.append(f"{via.where}: extends: {file} extends itself; remove the extends line")
            else:
                cycle = " -> ".join(names[i:] + [file])
                errors.append(f"{via.where}: extends: cycle {cycle}; a recipe cannot extend itself through others")
            return
    if file not in chain.files:
        chain.files.append(file)
    try:
        entries, duplicates = _read_recipe_file(Path(file), file)
    except UserError as err:
        errors.extend(err.messages)
        return
    chain.problems += duplicates
    extends = entries.get("extends")
    if extends is not None:
        for target in _extends_targets(extends, errors):
            child = shown_path(file, target)
            if not os.path.isfile(child):
                found = "is a directory, not a recipe file" if os.path.isdir(child) else "not found"
                errors.append(f"{extends.origin.where}: extends: file {target!r} {found} (looked for {child})")
                continue
            _load_into(child, stack + [(file, real)], extends.origin, chain, errors)
    chain.layers.append(entries)
