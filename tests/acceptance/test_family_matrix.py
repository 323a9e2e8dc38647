"""Llama 3 / Qwen3 / Qwen2 from transformers-written checkpoints (real vocabularies) across the training matrix.

GPT-2's pairwise set (test_matrix.py) covers every pair of finetuning_type x zero_stage x ranks x precision;
that code is the same for every family. What can differ per family is how the model meets each of those
values (weight layout under ZeRO-3 partitioning, GQA and q/k norms in bf16, Qwen2's biases in LoRA, the
full-run export of the family's tokenizer, resume of every family's state), so this set covers every
(family, value) pair for Llama and Qwen3 - each family sees every fine-tuning type, every ZeRO stage, 1 and 2
ranks, fp32 and bf16 - together with test_family_paths.py's LoRA / ZeRO-0 / 1-rank / fp32 session of each
(which already checks generation token for token against transformers and PEFT). Qwen2 gets one row.
Each row, as a user types it:

    python -m pipeline build R && python -m pipeline train R      (1 rank)
    make train RECIPE=R NPROC=2                                   (2 ranks, through the deepspeed launcher)
    python -m pipeline merge R

then transformers loads output_dir/merged and (LoRA) PEFT loads output_dir/adapter on the original checkpoint,
with the logits of our trained model. Training runs as typed in every row; a one-rank row's build and the merge run
as typed in the Qwen2 row (TYPED; test_family_paths.py's sessions type them for Llama and Qwen3) and, in the other
rows, as main(argv) in this process (harness.pipeline as_typed=False: the same command line and files, without an
interpreter start and torch's import): a row's point is what training (and resuming) left for the merge.
A `resume` row trains 4 steps with a checkpoint at step 2, then a
copy of what a crash after that checkpoint leaves is resumed with resume_from_checkpoint=latest on as many ranks
(`make train NPROC=2 ARGS=resume_from_checkpoint=latest` for two) and must end bitwise equal to the
uninterrupted run; the merge and the peers' checks then run on the resumed run's outputs. The resume rows train
with dropout (the resumed ranks must restore their RNG to draw the same masks) and hold every state a resume
restores: Llama's LoRA ZeRO-2 2-rank bf16 row the adapter and its optimizer state sharded over the ranks, each
rank's loader position (the resumed adapter then loads in PEFT with our logits); Qwen3's full ZeRO-3 2-rank
bf16 row every weight and its optimizer state partitioned over the ranks; Llama's freeze row a partly frozen
model on one rank (test_every_family_meets_every_value checks that a LoRA and a 2-rank ZeRO resume row stay). 2 layers, width 32. The real 128k / 152k-token vocabularies would
dominate the time (every process reads them, every head is that wide), so the rows use a 384-token
byte-level BPE in the family's format with its template markup (tests/helpers/hf_vocab.py
write_small_tokenizer_dir); the Qwen2 row keeps the real vocabulary (a ZeRO-3-partitioned 152k-row tied
embedding under LoRA, with PEFT), as do test_family_paths.py's sessions. The rows are `slow` (CI runs them).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.acceptance.harness import (FAMILIES, assert_close, assert_same_run, cli_env, crash_copy, make, pipeline,
                                      scratch_repo, trained_model, write_data, write_recipe)

AXES = {"finetuning_type": ("lora", "full", "freeze"), "zero_stage": (0, 2, 3), "ranks": (1, 2),
        "precision": ("fp32", "bf16")}
TEMPLATES = {"llama": "llama3", "qwen3": "qwen3_nothink", "qwen2": "qwen"}
# test_family_paths.py's session of each family: LoRA, ZeRO 0, 1 rank, fp32 (counted for the coverage)
SESSIONS = [("llama", "lora", 0, 1, "fp32"), ("qwen3", "lora", 0, 1, "fp32")]
ROWS = [  # (family, finetuning_type, zero_stage, ranks, precision, resume)
    ("llama", "lora", 2, 2, "bf16", True),
    ("llama", "full", 3, 1, "bf16", False),
    ("llama", "freeze", 2, 1, "fp32", True),
    ("qwen3", "full", 3, 2, "bf16", True),
    ("qwen3", "freeze", 2, 1, "fp32", False),
    ("qwen2", "lora", 3, 1, "bf16", False),
]
REAL_VOCABULARY = {("qwen2", "lora", 3, 1, "bf16", False)}
TYPED = {("qwen2", "lora", 3, 1, "bf16", False)}  # build and merge as typed (the other rows: in this process)


def row_id(row: tuple) -> str:
    family, kind, zero, ranks, precision, resume = row
    return f"{family}-{kind}-zero{zero}-{ranks}rank-{precision}" + ("-resume" if resume else "")


def test_every_family_meets_every_value():
    for family in ("llama", "qwen3"):
        runs = [r[1:5] for r in SESSIONS + ROWS if r[0] == family]
        for i, (axis, values) in enumerate(AXES.items()):
            missing = set(values) - {run[i] for run in runs}
            assert not missing, f"{family}: no row has {axis} {sorted(missing)}"
        assert any(r[5] for r in ROWS if r[0] == family), f"{family}: no resume row"
    # resume keeps what GPT-2's resume tests check: LoRA state (adapter + its optimizer), and several ranks
    # (ZeRO-sharded optimizer state, each rank's RNG and loader position), for the families between them
    resumed = [r for r in ROWS if r[5] and r[0] in ("llama", "qwen3")]
    assert any(r[1] == "lora" for r in resumed), "no LoRA resume row"
    assert any(r[3] == 2 and r[2] in (2, 3) for r in resumed), "no 2-rank ZeRO-2/3 resume row"


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A scratch repository (for make) holding datasets/ and recipes/ (the checkpoints: conftest's hf_checkpoint)."""
    root = scratch_repo(tmp_path_factory.mktemp("family_matrix"))
    write_data(root / "datasets")
    (root / "recipes").mkdir(exist_ok=True)
    return root


def train(repo: Path, recipe: Path, ranks: int, *overrides: str, typed_build: bool = True) -> str:
    """Train as a user types it (1 rank: build + train; 2 ranks: make NPROC=2 ARGS=...); returns what it said.
    typed_build=False: a one-rank build runs in this process (main(argv))."""
    if ranks == 1:
        pipeline("build", recipe, cwd=repo, as_typed=typed_build)
        return pipeline("train", recipe, *overrides, cwd=repo).stderr
    made = make("train", f"RECIPE={recipe.relative_to(repo)}", "NPROC=2", f"VENV={repo / 'venv'}",
                *([f"ARGS={' '.join(overrides)}"] if overrides else []), cwd=repo,
                env=cli_env(MAKEFLAGS="", MAKELEVEL=""))
    assert "--num_gpus 2" in made.stdout
    return made.stdout + made.stderr


@pytest.mark.slow
@pytest.mark.parametrize("row", ROWS, ids=row_id)
def test_train_resume_merge_and_load_in_the_peers(repo, hf_checkpoint, row):
    import transformers

    family, kind, zero, ranks, precision, resume = row
    name = row_id(row)
    base = hf_checkpoint(family, small_vocab=row not in REAL_VOCABULARY)
    out = repo / "saves" / name
    keys = dict(model_name_or_path=str(base), dataset_dir="datasets", template=TEMPLATES[family],
                finetuning_type=kind, zero_stage=zero, bf16=precision == "bf16",
                freeze_trainable_layers=1 if kind == "freeze" else None)
    if resume:  # dropout: the resumed run must restore each rank's RNG to draw the same masks
        keys.update(max_steps=4, save_steps=2, lr_scheduler_type="cosine", warmup_steps=1,
                    **{"lora_dropout" if kind == "lora" else "dropout": 0.1})
    recipe = write_recipe(repo / "recipes" / f"{name}.yaml", output_dir=str(out), **keys)
    typed = row in TYPED
    train(repo, recipe, ranks, typed_build=typed)
    steps = 4 if resume else 2
    results = json.loads((out / "all_results.json").read_text(encoding="utf-8"))
    assert results["global_step"] == steps and math.isfinite(results["train_loss"])
    final = "adapter/adapter_model.safetensors" if kind == "lora" else "model/model.safetensors"
    assert (out / final).is_file()
    if kind != "lora":  # the full / freeze export carries the family's tokenizer (usable as model_name_or_path)
        assert (out / "model" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()

    if resume:  # resumed on as many ranks; the checks below then load the resumed run's outputs
        checkpoint = out / "checkpoint-2"
        assert {p.name for p in (checkpoint / "rng").iterdir()} == {f"rank-{r}.safetensors" for r in range(ranks)}
        if zero and ranks > 1:  # ZeRO-2/3: each rank saved its own shard of the optimizer state
            shards = {p.name.removeprefix("bf16_") for p in (checkpoint / "deepspeed").glob("*optim_states.pt")}
            assert shards == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ranks)}
        crashed = crash_copy(out, repo / "saves" / f"{name}-crashed", 2)
        recipe = write_recipe(repo / "recipes" / f"{name}-crashed.yaml", output_dir=str(crashed), **keys)
        resumed = train(repo, recipe, ranks, "resume_from_checkpoint=latest", typed_build=typed)
        assert "resuming from" in resumed and "at step 2" in resumed
        assert_same_run(out, crashed, final)
        out = crashed

    pipeline("merge", recipe, cwd=repo, as_typed=typed)
    mine = trained_model(recipe, repo)
    x = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))  # in every vocabulary
    with torch.no_grad():
        expected = mine(x)
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
        assert type(merged).__name__ == FAMILIES[family].model_class
        assert_close(merged(x).logits, expected)
        original = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
        assert (original(x).logits - merged(x).logits).abs().max() > 1e-4  # training changed the model
        if kind == "lora":
            import peft

            tuned = peft.PeftModel.from_pretrained(original, out / "adapter").eval()
            assert_close(tuned(x).logits, expected)
