"""Packing: the assignment of examples to rows, packed batches, and their loss/gradient equivalence.

The golden reference for every packed example is the unpacked loader's own row for that example (the
existing padded collate) run through the model alone; packing must not change a single target.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_helpers import alpaca_rows, jsonl
from pipeline.recipe.args import data_args
from pipeline.data.build import build
from pipeline.data.loaders import count_examples, sft_loader, sft_packs
from pipeline.data.packing import PAD_SEGMENT, pack_examples
from pipeline.data.tokenize import tokenized_split
from pipeline.errors import UserError


def test_best_fit_decreasing_by_hand():
    # sizes 6 5 4 3 2 2 1 into rows of 8: 6+2, 5+3, 4+2+1 (longest first, each into the fullest row that fits)
    packs = pack_examples(np.array([2, 6, 4, 5, 1, 3, 2]), 8)
    rows = sorted(sorted(packs.pack(p).tolist()) for p in range(len(packs)))
    assert rows == [[0, 1], [2, 4, 6], [3, 5]]
    assert sorted(packs.fill.tolist()) == [7, 8, 8]


def test_packs_cover_every_example_once_within_capacity():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 100, size=500)
    packs = pack_examples(sizes, 128)
    assert sorted(packs.members.tolist()) == list(range(500))
    for p in range(len(packs)):
        assert sizes[packs.pack(p)].sum() == packs.fill[p] <= 128
        assert packs.pack(p).tolist() == sorted(packs.pack(p).tolist())  # dataset order inside a row
    assert len(packs) <= int(np.ceil(sizes.sum() / 128 * 1.05))  # near the lower bound
    again = pack_examples(sizes, 128)
    assert np.array_equal(packs.members, again.members) and np.array_equal(packs.offsets, again.offsets)
    with pytest.raises(ValueError, match="more than a row's 50"):
        pack_examples(np.array([51]), 50)


@pytest.fixture
def packed_recipe(make_recipe):
    rows = alpaca_rows(60)
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": jsonl(rows)},
                    per_device_train_batch_size=2, per_device_eval_batch_size=2, cutoff_len=128, val_size=0.2,
                    packing=True, neat_packing=True)
    build(data_args(r))
    return r


def _unpacked(r):
    return sft_loader(data_args(dict(r, packing=False, neat_packing=False)), "train", shuffle=False, batch_size=1)


def test_packed_rows_hold_the_unpacked_rows_exactly(packed_recipe):
    data = tokenized_split(data_args(packed_recipe), "train")
    packs = sft_packs(data_args(packed_recipe), "train")
    assert len(packs) < len(data) / 2  # short examples: several per row
    unpacked = _unpacked(packed_recipe)
    loader = sft_loader(data_args(packed_recipe), "train", epoch=1)
    seen = []
    for k in range(len(loader)):
        batch = loader.batch(k)
        assert batch["input_ids"].shape[1] <= 128
        for row, p in enumerate(loader.indices(k)):
            at = 0
            for seg, example in enumerate(packs.pack(int(p))):
                ref = unpacked._collate(np.array([example]))
                n = ref["input_ids"].shape[1]
                assert torch.equal(batch["input_ids"][row, at:at + n], ref["input_ids"][0])
                assert torch.equal(batch["labels"][row, at:at + n], ref["labels"][0])
                assert batch["segment_ids"][row, at:at + n].eq(seg).all()
                assert batch["position_ids"][row, at:at + n].tolist() == list(range(n))
                at += n
                seen.append(int(example))
            assert batch["attention_mask"][row].tolist() == [1] * at + [0] * (batch["input_ids"].shape[1] - at)
            assert batch["segment_ids"][row, at:].eq(PAD_SEGMENT).all() and batch["labels"][row, at:].eq(-100).all()
    assert len(seen) == len(set(seen))


def test_plain_packing_carries_no_segments(packed_recipe):
    batch = sft_loader(data_args(dict(packed_recipe, neat_packing=False)), "train").batch(0)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}


def test_counts_sharding_and_resume_count_packs(packed_recipe):
    n_packs = len(sft_packs(data_args(packed_recipe), "train"))
    assert count_examples(data_args(packed_recipe))["train"] == n_packs
    assert count_examples(data_args(packed_recipe))["val"] == len(sft_packs(data_args(packed_recipe), "val"))
    one = sft_loader(data_args(dict(packed_recipe, per_device_train_batch_size=4)), "train", epoch=3)
    ranks = [sft_loader(data_args(packed_recipe), "train", rank=k, world_size=2, epoch=3) for k in range(2)]
    assert one.num_examples == ranks[0].num_examples == n_packs and len(one) == len(ranks[0]) == n_packs // 4
    for k in range(len(one)):  # two ranks see the global batches of one rank with twice the batch
        assert sorted(np.concatenate([r.indices(k) for r in ranks]).tolist()) == sorted(one.indices(k).tolist())
    full = list(ranks[1])
    tail = list(ranks[1].iter_from(2))
    assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["segment_ids"], b["segment_ids"])
               for a, b in zip(full[2:], tail))


def test_group_by_length_without_packing_still_groups(packed_recipe):
    r = dict(packed_recipe, packing=False, neat_packing=False, group_by_length=True)
    loader = sft_loader(data_args(r), "train")
    assert loader.num_examples == len(tokenized_split(data_args(r), "train"))


def test_packing_with_examples_over_cutoff_and_policy_error(make_recipe):
    rows = alpaca_rows(20) + [{"instruction": "long", "input": "", "output": "x " * 100}]
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": jsonl(rows)}, cutoff_len=48,
                    val_size=0.1, packing=True, overlength_policy="error")
    build(data_args(r))
    with pytest.raises(UserError) as err:
        sft_loader(data_args(r), "train")
    text = "\n".join(err.value.messages)
    assert "raw/d.jsonl:" in text and "over cutoff_len 48" in text and "raise cutoff_len" in text
    assert "packing never splits an example" in text


def test_each_packed_example_has_the_unpacked_loss_and_gradient(packed_recipe):
    """neat_packing's promise, through the real loaders: per example, loss and gradient as unpacked (fp32)."""
    from pipeline.model.config import PRESETS
    from pipeline.model.gpt import GPTModel

    model = GPTModel(PRESETS["tiny"].replace(context_length=128, drop_rate=0.0), seed=1).train()
    packs = sft_packs(data_args(packed_recipe), "train")
    batch = sft_loader(data_args(packed_recipe), "train", shuffle=False).batch(0)
    unpacked = _unpacked(packed_recipe)

    def loss_and_grads(ids, labels, **kw):
        loss, _ = model(ids, labels=labels, reduction="sum", **kw)
        loss.backward()
        grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    checked = 0
    for row in range(batch["input_ids"].shape[0]):
        for seg, example in enumerate(packs.pack(row)):
            ref = unpacked._collate(np.array([example]))
            want_loss, want = loss_and_grads(ref["input_ids"], ref["labels"])
            only = torch.where(batch["segment_ids"][row:row + 1] == seg, batch["labels"][row:row + 1], -100)
            got_loss, got = loss_and_grads(batch["input_ids"][row:row + 1], only,
                                           segment_ids=batch["segment_ids"][row:row + 1],
                                           position_ids=batch["position_ids"][row:row + 1])
            assert torch.allclose(got_loss, want_loss, rtol=1e-6, atol=1e-5)
            for g, w in zip(got, want):
                assert torch.allclose(g, w, rtol=1e-5, atol=1e-6)
            checked += 1
    assert checked >= 4
