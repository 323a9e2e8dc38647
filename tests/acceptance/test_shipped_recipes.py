"""Every recipe shipped in recipes/ (examples/ included, and any added later) reaches its first optimizer step.

Each recipe runs as written through `python -m pipeline build` and `python -m pipeline train --dry-run`
(model load, fine-tuning setup, DeepSpeed initialisation with the recipe's own DeepSpeed JSON, one
optimizer step, a checkpoint write), with only these overrides:

- model_name_or_path: a 2-layer checkpoint of the recipe's family written by transformers' save_pretrained
  (the family comes from the model line or preset; a model that is another recipe's output takes that
  recipe's family), its context as long as the recipe's cutoff_len; a Llama / Qwen one with a 384-token
  tokenizer in the family's format (its template markup), whose real 128k / 152k-row head in bf16 only cost
  time here (test_family_paths.py trains each family's real vocabulary);
- dataset_dir: a copy of datasets/ (so nothing is written into the working tree);
- per_device_train_batch_size at most 2 (a pt recipe's: 1, its windows all cutoff_len long, so a second row only
  doubles the step: 2 x 1,024 tokens in bf16 against GPT-2's 50k-token head took 10 s of the 18 s of
  gpt2_pt_continue) and gradient_accumulation_steps 1 (the step stays cheap on a CPU: the examples' accumulation
  of 4 or 8 micro-batches against a 50k-token head took over a minute for one recipe; accumulation itself is
  tests/train's);
- without CUDA, fp16 recipes run with fp16=false (fp16 needs a GPU; tests/train/test_fp16.py covers
  the fp16 path), and adapter_name_or_path (another run's output) is dropped.

The dry run must also leave the recipe's output_dir uncreated.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.acceptance.harness import FAMILIES, REPO, family_of_recipe, pipeline, recipe_chain_value

RECIPES = sorted((REPO / "recipes").rglob("*.yaml"))
MAX_MICRO_BATCH = 2
MAX_PT_MICRO_BATCH = 1  # pt windows are all cutoff_len long: a second one only doubles the step


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A working directory like the repository root: recipes/ linked (DeepSpeed JSON paths are relative to
    it), datasets/ copied without build/."""
    root = tmp_path_factory.mktemp("shipped")
    (root / "recipes").symlink_to(REPO / "recipes")
    target = root / "datasets"
    target.mkdir()
    shutil.copy(REPO / "datasets" / "dataset_info.json", target)
    shutil.copytree(REPO / "datasets" / "raw", target / "raw")
    return root


def overrides_for(recipe: Path, checkpoint: Path, data: Path) -> list[str]:
    import torch

    keys = [f"model_name_or_path={checkpoint}", f"dataset_dir={data}"]
    batch = recipe_chain_value(recipe, "per_device_train_batch_size")
    most = MAX_PT_MICRO_BATCH if recipe_chain_value(recipe, "stage") == "pt" else MAX_MICRO_BATCH
    if batch is None or batch > most:
        keys.append(f"per_device_train_batch_size={most}")
    if (recipe_chain_value(recipe, "gradient_accumulation_steps") or 1) > 1:
        keys.append("gradient_accumulation_steps=1")
    if recipe_chain_value(recipe, "fp16") and not torch.cuda.is_available():
        keys.append("fp16=false")
    if recipe_chain_value(recipe, "adapter_name_or_path"):
        keys.append("adapter_name_or_path=null")
    return keys


def param(path: Path):
    """The demo recipes run in every `make test`; the GPU-sized examples (long cutoffs) are `slow` (CI runs them)."""
    name = path.relative_to(REPO / "recipes").as_posix()
    return pytest.param(path, id=name, marks=[pytest.mark.slow] if name.startswith("examples/") else [])


@pytest.mark.parametrize("recipe", [param(p) for p in RECIPES])
def test_recipe_reaches_its_first_optimizer_step(recipe, scratch, hf_checkpoint):
    if recipe_chain_value(recipe, "dataset") is None:
        pytest.skip("no dataset: not a training recipe (export/merge/chat recipes are covered by their own tests)")
    family = family_of_recipe(recipe, RECIPES)
    cutoff = int(recipe_chain_value(recipe, "cutoff_len") or 1024)
    small = {"small_vocab": True} if FAMILIES[family].tokenizer else {}  # GPT-2 keeps the pipeline's own ranks
    checkpoint = hf_checkpoint(family, **small, **{FAMILIES[family].context_key: max(64, cutoff)})
    relative = recipe.relative_to(REPO).as_posix()
    keys = overrides_for(recipe, checkpoint, scratch / "datasets")
    pipeline("build", relative, *keys, cwd=scratch)
    done = pipeline("train", relative, "--dry-run", *keys, cwd=scratch, timeout=600)
    assert "dry run: ok" in done.stdout, done.stderr[-3000:]
    output_dir = recipe_chain_value(recipe, "output_dir")
    assert output_dir and not (scratch / output_dir).exists(), f"the dry run created {output_dir}"
