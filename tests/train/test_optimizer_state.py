"""`plan`'s optimizer memory is what the recipe's optimizer keeps (pipeline.model.optimizer_state): Muon's momentum,
GaLore's and APOLLO's projected moments and projections, Adam-mini's per-block second moments, BAdam's one layer
(ratio mode: each tensor's window), in fp32, in bf16 under pure_bf16, and with DeepSpeed's fp32 master copies
under bf16 mixed precision; its gradient memory is the gradients the backward leaves (BAdam: the active layer's).

Golden: the optimizer itself. The pipeline builds the recipe's model from a tiny transformers checkpoint and its
optimizer (pipeline.train.optim.make_optimizer), one backward and one step run, and the bytes of every tensor in
the optimizer's state are summed (numel x element_size); under bf16 mixed precision 4 bytes per number of the
tensors in its param groups (what DeepSpeed keeps an fp32 master copy of) are added; the bytes of the .grad tensors
present after the backward are summed. plan's arithmetic is not used.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from tests.acceptance.harness import write_data, write_hf_checkpoint

# (family, recipe keys): each client optimizer, where its rules differ (GPT-2's Conv1D rows for Adam-mini, Qwen2's
# q/k/v biases; a rank above a matrix's sides, which the SVD clips and a random projection does not)
CASES = {
    "muon": ("qwen2", {"use_muon": True}),
    "muon, LoRA with DoRA and a norm in full": ("llama", {"finetuning_type": "lora", "use_muon": True,
                                                           "use_dora": True, "additional_target": "norm"}),
    "galore": ("qwen2", {"use_galore": True, "galore_rank": 4}),
    "galore full, rank 100": ("llama", {"use_galore": True, "galore_rank": 100, "galore_proj_type": "full"}),
    "galore under freeze": ("llama", {"finetuning_type": "freeze", "freeze_trainable_layers": 1, "use_galore": True,
                                      "galore_rank": 2, "galore_proj_type": "reverse_std", "galore_target": "mlp"}),
    "apollo random, rank 100": ("qwen2", {"use_apollo": True, "apollo_rank": 100, "apollo_scale_type": "tensor",
                                          "apollo_proj_type": "left"}),
    "apollo svd": ("llama", {"use_apollo": True, "apollo_rank": 4, "apollo_proj": "svd"}),
    "adam-mini": ("qwen2", {"use_adam_mini": True}),
    "adam-mini, GPT-2": ("gpt2", {"use_adam_mini": True}),
    "badam": ("llama", {"use_badam": True}),
    "badam ratio": ("llama", {"use_badam": True, "badam_mode": "ratio", "badam_update_ratio": 0.3}),
    "sgd": ("llama", {"optim": "sgd"}),
    "sgd, momentum": ("llama", {"optim": "sgd", "optim_args": "momentum=0.9"}),
    "adagrad": ("llama", {"optim": "adagrad"}),
    "rmsprop": ("qwen2", {"optim": "rmsprop"}),
    "adafactor, GPT-2": ("gpt2", {"optim": "adafactor"}),
    "adafactor, LoRA": ("qwen2", {"finetuning_type": "lora", "optim": "adafactor"}),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Tiny transformers checkpoints (save_pretrained) of three families and a dataset registry."""
    root = tmp_path_factory.mktemp("state")
    for family in ("llama", "qwen2"):
        write_hf_checkpoint(root / family, family, small_vocab=True)
    write_hf_checkpoint(root / "gpt2", "gpt2")
    write_data(root / "data")
    return root


def recipe(folder: Path, family: str, keys: dict[str, Any], precision: dict[str, Any]) -> Any:
    from pipeline.recipe import resolve

    values = {"model_name_or_path": str(folder / family), "dataset": ["tiny_sft"], "dataset_dir": str(folder / "data"),
              "template": "default", "output_dir": str(folder / "saves"), "finetuning_type": "full",
              "cutoff_len": 32, **keys, **precision}
    path = folder / "r.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()), encoding="utf-8")
    return resolve(path, [], command="plan", env={**os.environ, "WORLD_SIZE": "1"})


class Kept(NamedTuple):
    state: int  # bytes of the optimizer's state tensors after the step
    gradients: int  # bytes of the .grad tensors the backward left (before the step: a BAdam switch drops some)
    stepped: int  # numbers in the optimizer's param groups
    tensors: int  # tensors in its param groups


def kept_after_a_step(r: Any, dtype: torch.dtype) -> Kept:
    """What the recipe's model and optimizer, as train builds them in `dtype`, hold around one backward and step."""
    from pipeline.model.build import build_model
    from pipeline.recipe.args import recipe_args, train_args
    from pipeline.train.optim import make_optimizer

    model = build_model(*recipe_args(r), dtype=dtype)
    optimizer = make_optimizer(model, train_args(r))
    ids = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    (model(ids).float() ** 2).mean().backward()
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    optimizer.step()
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                if torch.is_tensor(v))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    return Kept(state, gradients, sum(p.numel() for p in params), len(params))


def planned(r: Any, line: str = "optimizer") -> int:
    from pipeline.recipe.plan import estimate_memory

    return estimate_memory(r).gpu[line]


@pytest.mark.parametrize("case", CASES)
def test_plans_optimizer_and_gradient_lines_are_what_the_optimizer_keeps(folder, case):
    """fp32, pure_bf16 (bf16 state, no master copy) and bf16 mixed precision (fp32 state + fp32 masters). The
    gradients: BAdam's layer mode holds the active layer's alone (the tiny model's layers are alike: the largest is
    any), ratio mode every tensor but the embedding and the head (dense), the others every trained tensor's."""
    family, keys = CASES[case]
    r = recipe(folder, family, keys, {})
    fp32 = kept_after_a_step(r, torch.float32)
    assert (planned(r), planned(r, "gradients")) == (fp32.state, fp32.gradients)
    assert planned(recipe(folder, family, keys, {"bf16": True})) == fp32.state + 4 * fp32.stepped
    pure = recipe(folder, family, keys, {"pure_bf16": True})
    bf16 = kept_after_a_step(pure, torch.bfloat16)
    assert (planned(pure), planned(pure, "gradients")) == (bf16.state, bf16.gradients)


def test_adamw_is_its_two_moments_and_torchs_step_counts(folder):
    """AdamW (torch's, fused where it can be): m and v, 8 bytes a number in fp32 (4 in bf16 under pure_bf16), and
    a 4-byte fp32 step tensor per tensor, whatever the weights' dtype: the plan's line is their sum."""
    r = recipe(folder, "llama", {}, {})
    kept = kept_after_a_step(r, torch.float32)
    assert planned(r) == kept.state == 8 * kept.stepped + 4 * kept.tensors
    pure = recipe(folder, "llama", {}, {"pure_bf16": True})
    bf16 = kept_after_a_step(pure, torch.bfloat16)
    assert planned(pure) == bf16.state == 4 * bf16.stepped + 4 * bf16.tensors


def test_plan_prints_galores_optimizer_memory_as_a_user_runs_it(folder):
    """`python -m pipeline plan` of a LLaMA-Factory GaLore recipe on a transformers checkpoint: the optimizer row
    is the stepped GaLoreAdamW's state (KiB, one decimal), where AdamW's would be 8 bytes a weight."""
    from tests.acceptance.harness import pipeline

    (folder / "lf.yaml").write_text(
        f"### model\nmodel_name_or_path: {folder / 'llama'}\n\n### method\nstage: sft\ndo_train: true\n"
        "finetuning_type: full\nuse_galore: true\ngalore_layerwise: true\ngalore_target: all\ngalore_rank: 4\n"
        "galore_update_interval: 200\ngalore_scale: 2.0\n\n### dataset\ndataset: tiny_sft\ndataset_dir: data\n"
        "template: llama3\ncutoff_len: 32\n\n### output\noutput_dir: saves/lf\n\n### train\n"
        "per_device_train_batch_size: 1\ngradient_accumulation_steps: 1\nlearning_rate: 1.0e-5\nnum_train_epochs: 1.0\n",
        encoding="utf-8")
    out = pipeline("plan", "lf.yaml", cwd=folder).stdout
    state, _, stepped, _ = kept_after_a_step(recipe(folder, "llama", {"use_galore": True, "galore_rank": 4}, {}),
                                             torch.float32)
    row = next(line for line in out.splitlines() if line.startswith("optimizer"))
    assert row.split()[1:3] == [f"{state / 1024:.1f}", "KiB"], row
    assert state < 8 * stepped


def test_plan_prints_badams_gradient_memory_as_a_user_runs_it(folder):
    """`python -m pipeline plan` of LLaMA-Factory's BAdam example (layer mode) on a transformers checkpoint: the
    gradients row is the active layer's .grad bytes after a backward (one layer of the tiny model's two), where
    every trained tensor's would also count the embedding, the final norm and the other layer."""
    from tests.acceptance.harness import pipeline

    (folder / "badam.yaml").write_text(
        f"### model\nmodel_name_or_path: {folder / 'llama'}\n\n### method\nstage: sft\ndo_train: true\n"
        "finetuning_type: full\nuse_badam: true\nbadam_mode: layer\nbadam_switch_mode: ascending\n"
        "badam_switch_interval: 50\nbadam_verbose: 2\n\n### dataset\ndataset: tiny_sft\ndataset_dir: data\n"
        "template: llama3\ncutoff_len: 32\n\n### output\noutput_dir: saves/badam\n\n### train\n"
        "per_device_train_batch_size: 1\ngradient_accumulation_steps: 8\nlearning_rate: 1.0e-5\n"
        "num_train_epochs: 3.0\nlr_scheduler_type: cosine\nwarmup_ratio: 0.1\n", encoding="utf-8")
    out = pipeline("plan", "badam.yaml", cwd=folder).stdout
    kept = kept_after_a_step(recipe(folder, "llama", {"use_badam": True}, {}), torch.float32)
    row = next(line for line in out.splitlines() if line.startswith("gradients"))
    assert row.split()[1:3] == [f"{kept.gradients / 1024:.1f}", "KiB"], row
    assert 2 * kept.gradients == 4 * kept.stepped  # one of the two alike decoder layers BAdam steps, in fp32

