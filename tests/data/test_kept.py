"""pipeline.data.kept's code digest: SOURCES, the one list of what a kept count or verdict depends on."""
from __future__ import annotations

import ast
from pathlib import Path

from pipeline.data.kept import SOURCES, source_files

ROOT = Path(__file__).resolve().parents[2]


def _module_file(name: str) -> Path | None:
    path = ROOT.joinpath(*name.split("."))
    return next((p for p in (path.with_suffix(".py"), path / "__init__.py") if p.is_file()), None)


def _imports(path: Path) -> set[str]:
    """The pipeline modules `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("pipeline")}
    return found


def test_the_sources_are_real_files_and_cover_every_module_the_data_library_imports():
    """Each SOURCES pattern names files, and every module the data library imports (the tokenizers' builders among
    them: pipeline.model.config's presets, pipeline.model.hub's folders) is one of them: a change there may change a
    count. Failed before: the digest covered pipeline/data's sources only."""
    for pattern in SOURCES:
        assert list((ROOT / "pipeline").glob(pattern)), pattern
    covered = set(source_files())
    todo = [f"pipeline.data.{p.stem}" for p in (ROOT / "pipeline/data").glob("*.py")]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or (path := _module_file(name)) is None:
            continue
        seen.add(name)
        assert path in covered, f"{name} ({path}) is imported by the data library but not in kept.SOURCES"
        todo += _imports(path)
    assert {"pipeline.model.config", "pipeline.model.hub"} <= seen
