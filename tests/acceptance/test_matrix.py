"""Train from a transformers-written GPT-2 in a pairwise covering set of configurations, merge, load in the peers.

finetuning_type (lora / full / freeze) x zero_stage (0 / 2 / 3) x ranks (1 / 2) x precision (fp32 / bf16):
9 rows in which every pair of values appears at least once (test_the_rows_cover_every_pair checks it), not
the 54 of the full product. Each row, as a user types it:

    python -m pipeline build R && python -m pipeline train R      (1 rank)
    make train RECIPE=R NPROC=2                                   (2 ranks, through the deepspeed launcher)
    python -m pipeline merge R

then transformers loads output_dir/merged and (LoRA) PEFT loads output_dir/adapter on top of the original
checkpoint; both give the logits our trained model gives. Training runs as typed in every row; build and merge run
as typed in the first row (TYPED) and, in the others, as main(argv) in this process (harness.pipeline
as_typed=False: the same command line and files, without an interpreter start and torch's import, ~1.3 CPU-s a
row): the row's point is what training left for the merge, not a second interpreter start.
"""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from tests.acceptance.harness import (assert_close, cli_env, make, pipeline, scratch_repo, trained_model, write_data,
                                     write_hf_checkpoint, write_recipe)

AXES = {"finetuning_type": ("lora", "full", "freeze"), "zero_stage": (0, 2, 3), "ranks": (1, 2),
        "precision": ("fp32", "bf16")}
# Three rows on 2 ranks, the fewest that give 2 ranks every finetuning_type and zero_stage: a row through the
# deepspeed launcher costs two to three times a 1-rank row (full ZeRO-3 on 2 ranks is also
# test_family_matrix.py's qwen3 resume row).
ROWS = [  # (finetuning_type, zero_stage, ranks, precision)
    ("lora", 0, 1, "fp32"),
    ("lora", 2, 2, "bf16"),
    ("lora", 3, 1, "bf16"),
    ("full", 0, 2, "bf16"),
    ("full", 2, 1, "fp32"),
    ("full", 3, 1, "fp32"),
    ("freeze", 0, 1, "bf16"),
    ("freeze", 2, 1, "fp32"),
    ("freeze", 3, 2, "fp32"),
]


def row_id(row: tuple) -> str:
    kind, zero, ranks, precision = row
    return f"{kind}-zero{zero}-{ranks}rank-{precision}"


def test_the_rows_cover_every_pair():
    names = list(AXES)
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        seen = {(row[i], row[j]) for row in ROWS}
        missing = set(itertools.product(AXES[a], AXES[b])) - seen
        assert not missing, f"{a} x {b}: no row has {sorted(missing)}"
    assert sum(row[2] == 2 for row in ROWS) == len(AXES["finetuning_type"])  # no launch more than the pairs need


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A scratch repository (for make) holding datasets/, a save_pretrained GPT-2 at gpt2/ and recipes/."""
    root = scratch_repo(tmp_path_factory.mktemp("matrix"))
    write_data(root / "datasets")
    write_hf_checkpoint(root / "gpt2", "gpt2")
    (root / "recipes").mkdir(exist_ok=True)
    return root


def ids(seed: int = 0, shape: tuple[int, int] = (2, 12)) -> torch.Tensor:
    return torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed))


TYPED = ROWS[0]  # build and merge as a user types them (the other rows: in this process)
# Every `make test` runs these two rows (one rank, no ZeRO: the cheapest); the others are `slow` (CI runs them).
EVERY_RUN = {("lora", 0, 1, "fp32"), ("freeze", 0, 1, "bf16")}


@pytest.mark.parametrize("row", [pytest.param(row, id=row_id(row), marks=[] if row in EVERY_RUN else [pytest.mark.slow])
                                 for row in ROWS])
def test_train_merge_and_load_in_the_peers(repo, row):
    import transformers

    kind, zero, ranks, precision = row
    name = row_id(row)
    out = repo / "saves" / name
    recipe = write_recipe(repo / "recipes" / f"{name}.yaml", model_name_or_path=str(repo / "gpt2"),
                          dataset_dir="datasets", output_dir=str(out), finetuning_type=kind, zero_stage=zero,
                          bf16=precision == "bf16", freeze_trainable_layers=1 if kind == "freeze" else None)
    if ranks == 1:
        pipeline("build", recipe, cwd=repo, as_typed=row == TYPED)
        pipeline("train", recipe, cwd=repo)
    else:
        made = make("train", f"RECIPE=recipes/{name}.yaml", "NPROC=2", f"VENV={repo / 'venv'}", cwd=repo,
                    env=cli_env(MAKEFLAGS="", MAKELEVEL=""))
        assert "--num_gpus 2" in made.stdout
    results = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    assert results["global_step"] == 2 and math.isfinite(results["train_loss"])
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2]
    assert (out / ("adapter/adapter_model.safetensors" if kind == "lora" else "model/model.safetensors")).is_file()

    pipeline("merge", recipe, cwd=repo, as_typed=row == TYPED)
    mine = trained_model(recipe, repo)
    x = ids()
    with torch.no_grad():
        expected = mine(x)
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert_close(merged(x).logits, expected)
        base = transformers.GPT2LMHeadModel.from_pretrained(repo / "gpt2").eval()
        assert (base(x).logits - merged(x).logits).abs().max() > 1e-4  # training changed the model
        if kind == "lora":
            import peft

            tuned = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
            assert_close(tuned(x).logits, expected)
