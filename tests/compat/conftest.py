"""Fixtures of the LLaMA-Factory compatibility suite: its data folder copied into a workdir, hub caches.

tests/compat/lf_data/ is our own file set in the shape LLaMA-Factory's data/README.md documents: a
dataset_info.json with every entry form (local, hub, ranking, tools, kto, multimodal, text corpora).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

LF_DATA = Path(__file__).with_name("lf_data")


@pytest.fixture
def lf_workdir(tmp_path: Path) -> Path:
    """tmp_path with data/ = a copy of lf_data (LLaMA-Factory's default dataset_dir); the CLI runs here."""
    shutil.copytree(LF_DATA, tmp_path / "data")
    return tmp_path


def write_hub_dataset(cache: Path, repo: str, files: dict[str, str], commit: str = "a" * 40) -> Path:
    """A dataset repository in the Hugging Face hub cache's documented layout: blobs/, refs/main, snapshots/."""
    root = cache / ("datasets--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    for rel, text in files.items():
        data = text.encode("utf-8")
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path("../" * (len(Path(rel).parts) + 1)) / "blobs" / blob.name)
    return snapshot


def jsonl(rows: list) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


@pytest.fixture(scope="session")
def lf_models(tmp_path_factory):
    """family -> a tiny transformers checkpoint with a small vocabulary holding its template markup and the
    examples' 2,048-token context (their cutoff_len), written on first use (tests.compat.lf_golden)."""
    from tests.compat.lf_golden import tiny_checkpoint

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = tiny_checkpoint(tmp_path_factory, family)
        return made[family]
    return get
