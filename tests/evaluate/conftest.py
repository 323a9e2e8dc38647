"""A finished-looking run made without training: built data + a tiny base + an adapter (or full model) with
random, non-zero weights. merge and eval only need the files train would leave."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest
import torch

QA = [{"instruction": f"What is {i} plus {i}?", "input": "" if i % 3 else f"Use digits. ({i})",
       "output": f"{i} plus {i} is {2 * i}."} for i in range(24)]
TEXT = "\n\n".join(f"Document {i}. The quick brown fox number {i} jumps over the lazy dog {i % 5} times."
                   for i in range(40))


def write_run(root: Path, *, stage: str = "sft", finetuning_type: str = "lora", extra: str = "") -> Path:
    """dataset_dir + recipe under root; returns the recipe path (output_dir = root/out)."""
    data = root / "data"
    (data / "raw").mkdir(parents=True, exist_ok=True)
    (data / "raw" / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in QA), encoding="utf-8")
    (data / "raw" / "corpus.txt").write_text(TEXT, encoding="utf-8")
    (data / "dataset_info.json").write_text(json.dumps({
        "qa": {"file_name": "raw/qa.jsonl", "formatting": "alpaca"},
        "corpus": {"file_name": "raw/corpus.txt", "formatting": "text"},
    }), encoding="utf-8")
    recipe = root / "run.yaml"
    recipe.write_text(
        f"model_name_or_path: tiny\nstage: {stage}\nfinetuning_type: {finetuning_type}\n"
        f"dataset: {'qa' if stage == 'sft' else 'corpus'}\ndataset_dir: {data}\noutput_dir: {root / 'out'}\n"
        "template: alpaca\ncutoff_len: 96\nval_size: 0.25\nmax_steps: 1\nseed: 7\n"
        + ("lora_rank: 4\n" if finetuning_type == "lora" else "")
        + "max_new_tokens: 6\nper_device_eval_batch_size: 1\ngroup_by_length: false\n" + extra,
        encoding="utf-8",
    )
    return recipe


def resolve_run(recipe: Path, *overrides: str, command: str = "eval"):
    from pipeline.recipe import resolve

    return resolve(recipe, list(overrides), command=command)


def fake_training(r) -> None:
    """What `train` leaves: output_dir/adapter (LoRA, B random so it changes the model) or output_dir/model."""
    from pipeline.data.build import build
    from pipeline.model import lora as L
    from pipeline.model.build import build_model
    from pipeline.recipe.args import data_args, recipe_args
    from pipeline.model.weights import save_model

    build(data_args(r))
    model = build_model(*recipe_args(r))
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        if r["finetuning_type"] == "lora":
            for wrapper in L.lora_modules(model).values():
                wrapper.lora.B.copy_(torch.randn(wrapper.lora.B.shape, generator=gen) * 0.2)
            L.save_adapter(model, Path(r["output_dir"]) / "adapter", {"base_model_name_or_path": "tiny"})
        else:
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
            save_model(model, Path(r["output_dir"]) / "model")


@pytest.fixture
def make_run(tmp_path: Path) -> Callable:
    """make_run(*overrides, stage=, finetuning_type=, extra='yaml lines', trained=True) -> a resolved recipe with
    built data and (unless trained=False) a 'trained' adapter or model in its output_dir."""

    def make(*overrides: str, stage: str = "sft", finetuning_type: str = "lora", extra: str = "",
             command: str = "eval", trained: bool = True):
        recipe = write_run(tmp_path, stage=stage, finetuning_type=finetuning_type, extra=extra)
        r = resolve_run(recipe, *overrides, command=command)
        if trained:
            fake_training(r)
        return r

    return make
