"""The import graph of pipeline/ keeps its layers (INTERNALS.md, "Layers"), counting imports inside functions.

Lower layers never import higher ones, the stages never import each other (what two stages share lives
in pipeline.runtime or a library), and no two modules import each other through any chain: a circle
hidden by an in-function import is still a circle.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "pipeline"

# Top to bottom; a module may import its own layer and the layers below. First match wins.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("pipeline.__main__", "pipeline.launch", "pipeline.nodes")),
    ("stages", ("pipeline.train", "pipeline.merge", "pipeline.evaluate", "pipeline.chat", "pipeline.validate",
                "pipeline.prepare", "pipeline.export")),
    ("runtime", ("pipeline.runtime",)),
    ("recipe", ("pipeline.recipe",)),
    ("libraries", ("pipeline.model", "pipeline.data")),
    ("base", ("pipeline.errors", "pipeline.io", "pipeline.library_warnings", "pipeline.lock", "pipeline.names",
              "pipeline.rerun", "pipeline.launched", "pipeline")),
]
STAGES = LAYERS[1][1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every pipeline module this file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pipeline"):
            for alias in node.names:  # `from pipeline.x import y` names module pipeline.x.y when it is one
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}
GRAPH = {name: imports(path) - {name} for name, path in MODULES.items()}


def layer(module: str) -> tuple[int, str]:
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "pipeline" and module.startswith(prefix + ".")):
                return index, prefix
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layers.py")


def test_every_module_has_a_layer():
    for module in MODULES:
        layer(module)


def test_no_import_goes_up_a_layer_or_across_stages():
    bad = []
    for module, targets in sorted(GRAPH.items()):
        (mine, my_prefix) = layer(module)
        for target in sorted(targets):
            (theirs, their_prefix) = layer(target)
            if theirs < mine:
                bad.append(f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
            elif theirs == mine and my_prefix in STAGES and their_prefix != my_prefix:
                bad.append(f"{module} imports another stage's {target}: share it through pipeline.runtime "
                           "or a library instead")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


@functools.lru_cache(maxsize=None)
def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try)):
            names |= {n.name for n in ast.walk(node) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            names |= {(a.asname or a.name).split(".")[0] for n in ast.walk(node)
                      if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    return names


def test_every_imported_name_exists():
    """`from pipeline.x import y` (in functions too) names a module or a top-level name of pipeline.x: a moved
    or renamed function is caught here rather than when that function first runs."""
    bad = []
    for module, path in sorted(MODULES.items()):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "") in MODULES:
                defined = _top_level_names(MODULES[node.module])
                for alias in node.names:
                    if f"{node.module}.{alias.name}" not in MODULES and alias.name not in defined:
                        bad.append(f"{module}:{node.lineno}: {node.module} has no {alias.name}")
    assert not bad, "\n".join(bad)
