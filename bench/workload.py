"""Generated workloads: an Alpaca-like dataset with a realistic length spread, its registry and recipe, and a
model checkpoint with gpt2-small widths.

Lengths are log-normal (a few long answers, many short ones), as in Alpaca: 40% of the rows have an
input, instructions are short, responses vary most. Text is drawn from a fixed word list, so every run
of a given size and seed is the same dataset.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

WORDS = tuple((
    "the of and to in is for that on with as are this be by it from at an or not have can which will more "
    "water energy system process data model example describe explain write list give provide summary answer "
    "question research important different between people number function value result analysis language "
    "computer program learning network information history science student teacher company product market "
    "customer service health environment climate change economic social political cultural technology "
    "develop create improve increase reduce understand consider identify evaluate compare classify translate "
    "sentence paragraph article story poem essay letter email report review recipe ingredient method step "
    "because however therefore although while during after before through without within around against "
    "quickly carefully especially generally usually significantly approximately particularly effectively "
    "algorithm database software hardware internet website application security privacy government policy "
    "beautiful difficult interesting necessary possible available traditional international professional "
    "mountain river forest ocean island city village country government university hospital restaurant"
).split())
NAME = "bench_alpaca"


def _lognormal(rng: np.random.Generator, median: float, sigma: float, n: int, cap: int) -> np.ndarray:
    return np.clip(np.round(rng.lognormal(np.log(median), sigma, n)), 1, cap).astype(np.int64)


def _texts(rng: np.random.Generator, counts: np.ndarray) -> list[str]:
    words = np.array(WORDS)[rng.integers(0, len(WORDS), int(counts.sum()))]
    ends = np.cumsum(counts)
    return [" ".join(words[e - c:e]) for c, e in zip(counts.tolist(), ends.tolist())]


def alpaca_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n distinct Alpaca rows; in words: instruction ~ 11 (median), input ~ 14 in 40% of rows, output ~ 45."""
    rng = np.random.default_rng(seed)
    instruction = _texts(rng, _lognormal(rng, 11, 0.45, n, 60))
    has_input = rng.random(n) < 0.4
    inputs = _texts(rng, np.where(has_input, _lognormal(rng, 14, 0.8, n, 200), 0))
    output = _texts(rng, _lognormal(rng, 45, 0.85, n, 400))
    return [{"instruction": f"{ins.capitalize()} ({i}).", "input": inp, "output": f"{out.capitalize()}."}
            for i, (ins, inp, out) in enumerate(zip(instruction, inputs, output))]


def write_dataset(dataset_dir: Path, rows: list[dict[str, str]], name: str = NAME) -> Path:
    """raw/<name>.jsonl + dataset_info.json registering it (alpaca formatting)."""
    raw = dataset_dir / "raw" / f"{name}.jsonl"
    raw.parent.mkdir(parents=True, exist_ok=True)
    with open(raw, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    registry = {name: {"file_name": f"raw/{name}.jsonl", "formatting": "alpaca"}}
    (dataset_dir / "dataset_info.json").write_text(json.dumps(registry, indent=2) + "\n", encoding="utf-8")
    return raw


def write_recipe(path: Path, keys: Mapping[str, Any]) -> Path:
    """A recipe file (JSON values are valid YAML)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()), encoding="utf-8")
    return path


def one_rank_env() -> dict[str, str]:
    return {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}


def resolve_recipe(path: Path, overrides: list[str] | tuple[str, ...] = (), command: str = "train") -> Any:
    from pipeline.recipe import resolve

    return resolve(path, list(overrides), command=command, env=one_rank_env())


def save_gpt2_small_widths(directory: Path, n_layers: int, seed: int = 0) -> Path:
    """Our checkpoint format: gpt2-small's widths (768, 12 heads, vocab 50257, context 1024), n_layers blocks."""
    from pipeline.model.config import PRESETS
    from pipeline.model.gpt import GPTModel
    from pipeline.model.weights import save_model

    if (directory / "config.json").exists():
        return directory
    return save_model(GPTModel(PRESETS["gpt2-small"].replace(n_layers=n_layers), seed=seed), directory)


def sft_recipe_keys(workdir: Path, *, model: str, cutoff_len: int, batch_size: int, val_size: float) -> dict[str, Any]:
    """LoRA sft as the benchmark runs it: r=16, alpha 32 on every attention and MLP Linear, bf16."""
    return {
        "model_name_or_path": model, "stage": "sft", "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32,
        "lora_target": "all", "dataset": NAME, "dataset_dir": str(workdir / "data"), "template": "alpaca",
        "cutoff_len": cutoff_len, "val_size": val_size, "per_device_train_batch_size": batch_size,
        "per_device_eval_batch_size": batch_size, "gradient_accumulation_steps": 1, "learning_rate": 1e-4,
        "max_steps": 1000, "warmup_steps": 0, "lr_scheduler_type": "constant", "bf16": True,
        "group_by_length": True, "logging_steps": 1, "save_steps": 100000, "plot_loss": False,
        "output_dir": str(workdir / "saves" / "sft"), "overwrite_output_dir": True, "seed": 42,
    }
