"""The optimisations the benchmarks credit do not change results.

Already proven elsewhere (not repeated here): the loss with the head only at labelled positions equals the
full-head cross-entropy, value and gradients, in fp32 (tests/model/test_gpt.py); KV-cache greedy decoding
equals uncached decoding for one prompt (tests/model/test_generate.py). Added here: length-grouped batching
gives every example the same loss and the epoch the same total; the head-only loss also holds in bf16, the
precision the sft benchmark runs in; cached and uncached decoding agree on a left-padded batch of prompts
of different lengths (the generation benchmark's batch-8 case).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.workload import alpaca_rows, resolve_recipe, write_dataset, write_recipe
from pipeline.recipe.args import data_args
from pipeline.model.config import PRESETS
from pipeline.model.generate import generate
from pipeline.model.gpt import GPTModel

TINY = PRESETS["tiny"]


@pytest.fixture(scope="module")
def model() -> GPTModel:
    return GPTModel(TINY, seed=11).eval()


@pytest.fixture
def recipes(tmp_path):
    """The same dataset and model, with and without group_by_length."""
    from pipeline.data.build import build

    write_dataset(tmp_path / "data", alpaca_rows(60, seed=3))
    keys = {"model_name_or_path": "tiny", "stage": "sft", "dataset": "bench_alpaca", "template": "alpaca",
            "dataset_dir": str(tmp_path / "data"), "cutoff_len": 128, "val_size": 0.05,
            "per_device_train_batch_size": 4, "num_train_epochs": 1, "output_dir": str(tmp_path / "saves"),
            "seed": 5}
    out = {}
    for grouped in (True, False):
        path = write_recipe(tmp_path / f"g{int(grouped)}.yaml", {**keys, "group_by_length": grouped})
        build(data_args(resolve_recipe(path)))
        out[grouped] = resolve_recipe(path)
    return out


def per_example_losses(model: GPTModel, loader) -> tuple[dict[int, float], float, int]:
    """Each example's summed loss as computed inside its (padded) batch row, and the epoch's sum and count as
    the trainer computes it (head only at labels, reduction='sum')."""
    losses: dict[int, float] = {}
    total, count = 0.0, 0
    with torch.no_grad():
        for k in range(len(loader)):
            batch, indices = loader.batch(k), loader.indices(k)
            s, n = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                         reduction="sum")
            total, count = total + float(s), count + n
            for row, i in enumerate(indices):
                s_row, _ = model(batch["input_ids"][row:row + 1], labels=batch["labels"][row:row + 1], reduction="sum")
                losses[int(i)] = float(s_row)
    return losses, total, count


def test_length_grouping_keeps_every_examples_loss_and_the_epoch_total(recipes, model):
    from pipeline.data.loaders import sft_loader

    grouped, plain = sft_loader(data_args(recipes[True]), "train"), sft_loader(data_args(recipes[False]), "train")
    def padding(loader) -> int:
        return sum(int((loader.batch(k)["attention_mask"] == 0).sum()) for k in range(len(loader)))

    assert padding(grouped) < 0.5 * padding(plain)  # grouping really removes padding on this data
    a, total_a, count_a = per_example_losses(model, grouped)
    b, total_b, count_b = per_example_losses(model, plain)
    assert a.keys() == b.keys() and len(a) == len(grouped) * 4
    assert count_a == count_b
    assert total_a == pytest.approx(total_b, rel=1e-5)
    assert max(abs(a[i] - b[i]) / max(abs(b[i]), 1.0) for i in a) < 1e-5
    # and the same values as the example alone, without any padding
    with torch.no_grad():
        for k in (0, len(plain) - 1):
            batch = plain.batch(k)
            for row, i in enumerate(plain.indices(k)):
                n = int(batch["attention_mask"][row].sum())
                alone, _ = model(batch["input_ids"][row:row + 1, :n], labels=batch["labels"][row:row + 1, :n],
                                 reduction="sum")
                assert float(alone) == pytest.approx(b[int(i)], rel=1e-5)


def test_head_only_at_labels_matches_full_head_in_bf16():
    m = GPTModel(TINY, seed=4).to(torch.bfloat16)
    torch.manual_seed(1)
    ids = torch.randint(0, TINY.vocab_size, (3, 40))
    labels = ids.roll(-1, 1)
    labels[0, :25] = -100
    labels[1, 10:] = -100
    labels[2, ::3] = -100
    fast = m(ids, labels=labels)
    full = F.cross_entropy(m(ids).float().flatten(0, 1), labels.flatten(), ignore_index=-100)
    assert fast.dtype == torch.float32
    assert float(fast.detach()) == pytest.approx(float(full.detach()), rel=2e-3)  # bf16 rounding only
    m.zero_grad()
    fast.backward()
    fast_grad = m.layers[0].self_attn.qkv_proj.weight.grad.float().clone()
    m.zero_grad()
    F.cross_entropy(m(ids).float().flatten(0, 1), labels.flatten(), ignore_index=-100).backward()
    full_grad = m.layers[0].self_attn.qkv_proj.weight.grad.float()
    assert torch.linalg.vector_norm(fast_grad - full_grad) <= 0.02 * torch.linalg.vector_norm(full_grad)


def test_kv_cache_equals_no_cache_on_a_left_padded_batch(model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, TINY.vocab_size, size=n).tolist() for n in (3, 9, 5, 14)]
    cached = generate(model, prompts, max_new_tokens=16, eos_id=None)
    uncached = generate(model, prompts, max_new_tokens=16, eos_id=None, use_cache=False)
    assert cached == uncached
    assert all(len(c) == 16 for c in cached)
