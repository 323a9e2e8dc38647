"""Fixtures for the training stage: tiny datasets and recipes made in tmp_path, resolved by the real resolver.

Training runs in-process (DeepSpeed on the CPU accelerator, gloo, one rank) unless a test needs a fresh
process (signals, exit codes, several ranks).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest

from pipeline.runtime import dist
from tests.train.helpers import BASE_SFT, corpus, sft_rows, varied_sft_rows


@pytest.fixture(scope="session", autouse=True)
def launch_env() -> None:
    """One rank in this process (a plain python run does the same in run()), on the CPU: resume and equivalence
    tests compare weights bitwise, which holds only on one device kind."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.ensure_launch_env()


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tmp_path with data/ (registry + raw files); the current directory, so relative paths work."""
    data = tmp_path / "data"
    (data / "raw").mkdir(parents=True)
    (data / "raw" / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft_rows(40)), encoding="utf-8")
    (data / "raw" / "varied.jsonl").write_text("".join(json.dumps(r) + "\n" for r in varied_sft_rows(40)),
                                              encoding="utf-8")
    (data / "raw" / "corpus.txt").write_text(corpus(30), encoding="utf-8")
    registry = {"tiny_sft": {"file_name": "raw/sft.jsonl", "formatting": "alpaca"},
                "varied_sft": {"file_name": "raw/varied.jsonl", "formatting": "alpaca"},
                "tiny_pt": {"file_name": "raw/corpus.txt", "formatting": "text"}}
    (data / "dataset_info.json").write_text(json.dumps(registry, indent=2), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def make_recipe(workdir: Path) -> Callable[..., Any]:
    """make_recipe(base, name=..., **keys) -> Resolved for `train` (data built on first use)."""
    from pipeline.data.build import build
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    def make(base: dict[str, Any] = BASE_SFT, name: str = "run", **keys: Any) -> Any:
        values = {**base, "output_dir": f"saves/{name}", **keys}
        if values.get("finetuning_type") != "lora":  # the resolver rejects LoRA keys without LoRA
            values = {k: v for k, v in values.items() if not k.startswith("lora_")}
        path = workdir / f"{name}.yaml"
        path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()), encoding="utf-8")
        r = resolve(path, [], command="train", env={**os.environ, "WORLD_SIZE": "1", "RANK": "0",
                                                    "LOCAL_RANK": "0"})
        build(data_args(r))
        return resolve(path, [], command="train", env={**os.environ, "WORLD_SIZE": "1", "RANK": "0",
                                                       "LOCAL_RANK": "0"})

    return make


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, tuple[Path, Any]]:
    """{family: (directory, transformers model)}: tiny Qwen2 and GPT-2 checkpoints written by save_pretrained (the
    optimizer tests read their parameter names and shapes)."""
    from tests.acceptance.harness import write_hf_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {family: (root / family, write_hf_checkpoint(root / family, family, vocab_size=256))
            for family in ("qwen2", "gpt2")}
