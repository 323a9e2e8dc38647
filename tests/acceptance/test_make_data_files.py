"""`make data` re-runs when a data file the recipe reads is edited, wherever the registry puts it.

Only `<dataset_dir>/raw/*` and the registry were prerequisites: a LLaMA-Factory layout keeps its files beside
dataset_info.json, so an edited file re-ran nothing, and train then stopped on the stale build with advice
(`make data`) that did nothing either.
"""
from __future__ import annotations

import json
import os

from tests.acceptance.harness import make, scratch_repo, write_recipe


def test_an_edited_data_file_beside_the_registry_rebuilds(tmp_path):
    repo = scratch_repo(tmp_path / "repo")
    data = repo / "datasets"
    data.mkdir()
    (data / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "mine.json"}}), encoding="utf-8")
    rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i}"} for i in range(12)]
    (data / "mine.json").write_text(json.dumps(rows), encoding="utf-8")
    (repo / "recipes").mkdir()
    write_recipe(repo / "recipes" / "r.yaml", model_name_or_path="tiny", dataset="mine", max_steps=1)
    venv = f"VENV={repo / 'venv'}"
    assert "pipeline build" in make("data", "RECIPE=recipes/r.yaml", venv, cwd=repo).stdout
    assert "pipeline build" not in make("data", "RECIPE=recipes/r.yaml", venv, cwd=repo).stdout  # nothing changed

    (data / "mine.json").write_text(json.dumps(rows + [{"instruction": "Say 12.", "input": "", "output": "12"}]),
                                    encoding="utf-8")
    stamp = repo / ".stamps" / "recipes" / "r" / "data"
    os.utime(data / "mine.json", ns=(stamp.stat().st_mtime_ns + 10**9,) * 2)  # newer, whatever the clock's grain
    again = make("data", "RECIPE=recipes/r.yaml", venv, cwd=repo)
    assert "pipeline build" in again.stdout, again.stdout
    manifest = json.loads((data / "build" / "mine" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["rows_read"] == 13
