"""Every recipe shipped in recipes/ resolves (examples/ may target GPUs, so they are checked as `plan` does)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.recipe.args import data_args
from pipeline.recipe import resolve

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.y*ml"))


@pytest.mark.skipif(not RECIPES, reason="no recipes in recipes/ yet")
@pytest.mark.parametrize("path", RECIPES, ids=[str(p) for p in RECIPES])
def test_shipped_recipe_resolves(path, monkeypatch):
    monkeypatch.chdir(REPO)  # dataset_dir and extends paths are relative to the repository root
    r = resolve(path, command="plan")
    from pipeline.data.build import all_specs

    specs = all_specs(data_args(r))  # every dataset is in the registry the recipe points at (a UserError otherwise)
    assert [s.name for s in specs][:len(r["dataset"])] == list(r["dataset"])
    missing = [str(f) for s in specs for f in s.files if not Path(f).is_file()]
    assert not missing, f"{path} trains on files that are not in the repository: {missing}"
