"""Loaders: the book's pt windows, shifted sft labels, rank sharding, deterministic resumable order."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data_helpers import alpaca_rows, jsonl
from pipeline.recipe.args import data_args
from pipeline.data.build import build
from pipeline.data.loaders import count_examples, plan_batches, pt_loader, sft_loader
from pipeline.data.tokenize import pt_windows, tokenized_split
from pipeline.data.tokenizer import gpt2
from pipeline.errors import UserError


def test_pt_windows_hand_computed():
    # range(0, len(ids) - max_length, stride), the book's GPTDatasetV1
    assert pt_windows(20, 4, 3).tolist() == [0, 3, 6, 9, 12, 15]
    assert pt_windows(20, 4, 4).tolist() == [0, 4, 8, 12]
    assert pt_windows(5, 4, 1).tolist() == [0]
    assert pt_windows(4, 4, 1).tolist() == []


def book_windows(ids, max_length, stride):
    """The book's GPTDatasetV1, verbatim in spirit."""
    inputs, targets = [], []
    for i in range(0, len(ids) - max_length, stride):
        inputs.append(ids[i:i + max_length])
        targets.append(ids[i + 1:i + max_length + 1])
    return inputs, targets


@pytest.fixture
def pt_recipe(make_recipe):
    text = " ".join(f"word{i}" for i in range(300))
    r = make_recipe({"book": {"file_name": "raw/book.txt", "formatting": "text"}}, files={"raw/book.txt": text},
                    stage="pt", cutoff_len=8, pt_stride=5, per_device_train_batch_size=3,
                    per_device_eval_batch_size=4)
    build(data_args(r))
    return r


def test_pt_loader_matches_the_book(pt_recipe):
    from pipeline.data.load import load_split

    ids = gpt2().encode(load_split(data_args(pt_recipe), "train")[0]["text"])
    inputs, targets = book_windows(ids, 8, 5)
    loader = pt_loader(data_args(pt_recipe), "train", shuffle=False)
    assert len(loader) == len(inputs) // 3  # drop_last for train
    batches = list(loader)
    got_in = torch.cat([b["input_ids"] for b in batches]).tolist()
    got_lab = torch.cat([b["labels"] for b in batches]).tolist()
    n = len(loader) * 3
    assert got_in == inputs[:n] and got_lab == targets[:n]
    assert all(b["attention_mask"].eq(1).all() for b in batches)
    val = pt_loader(data_args(pt_recipe), "val", shuffle=False)
    val_ids = gpt2().encode(load_split(data_args(pt_recipe), "val")[0]["text"])
    assert len(val) == -(-len(book_windows(val_ids, 8, 5)[0]) // 4)  # the last batch is kept
    assert count_examples(data_args(pt_recipe)) == {"train": len(inputs), "val": len(book_windows(val_ids, 8, 5)[0])}


def test_pt_stride_defaults_to_cutoff_and_too_short(pt_recipe):
    from pipeline.data.load import load_split

    r = dict(pt_recipe, pt_stride=None)
    ids = gpt2().encode(load_split(data_args(r), "train")[0]["text"])
    assert count_examples(data_args(r))["train"] == len(range(0, len(ids) - 8, 8))
    with pytest.raises(UserError, match=r"the val split has no windows; it has \d+ tokens and one window needs "
                                        r"cutoff_len \+ 1 = 1,001"):
        pt_loader(data_args(dict(pt_recipe, cutoff_len=1000)), "val")


def test_plan_sharding_train_disjoint_and_covering():
    n, b, w = 23, 2, 3
    plans = [plan_batches(n, batch_size=b, world_size=w, rank=k, seed=5, drop_last=True) for k in range(w)]
    assert [len(p) for p in plans] == [3, 3, 3]  # floor(23 / 6) global batches, on every rank
    seen = np.concatenate([x for p in plans for x in p])
    assert len(seen) == 18 and len(set(seen.tolist())) == 18
    one = plan_batches(n, batch_size=b * w, world_size=1, rank=0, seed=5, drop_last=True)
    for k in range(3):  # N ranks see the same global batches as one rank with an N x larger batch
        assert sorted(np.concatenate([p[k] for p in plans]).tolist()) == sorted(one[k].tolist())


def test_plan_sharding_val_pads_like_distributed_sampler():
    n, b, w = 23, 2, 3
    plans = [plan_batches(n, batch_size=b, world_size=w, rank=k, shuffle=False) for k in range(w)]
    assert [len(p) for p in plans] == [4, 4, 4]
    assert [len(x) for x in plans[0]] == [2, 2, 2, 2]
    seen = np.concatenate([x for p in plans for x in p]).tolist()
    # example 0 is repeated once to fill the last rank, marked as 0 + n so that the Loader masks its labels
    assert sorted(seen) == list(range(23)) + [23]
    single = plan_batches(5, batch_size=4, world_size=1, shuffle=False)
    assert [x.tolist() for x in single] == [[0, 1, 2, 3], [4]]  # one rank: no padding, last batch smaller


def test_plan_order_is_a_pure_function_of_seed_epoch_rank():
    kw = dict(batch_size=4, world_size=2, rank=1, drop_last=True)
    a = plan_batches(100, seed=1, epoch=0, **kw)
    assert all((x == y).all() for x, y in zip(a, plan_batches(100, seed=1, epoch=0, **kw)))
    assert any((x != y).any() for x, y in zip(a, plan_batches(100, seed=1, epoch=1, **kw)))
    assert any((x != y).any() for x, y in zip(a, plan_batches(100, seed=2, epoch=0, **kw)))


def test_group_by_length_sorts_within_mega_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 500, size=1000)
    kw = dict(batch_size=4, world_size=1, seed=3, drop_last=True)
    grouped = plan_batches(1000, lengths, group_by_length=True, **kw)
    plain = plan_batches(1000, lengths, group_by_length=False, **kw)

    def padding(plan):
        return sum(int(lengths[b].max()) * len(b) - int(lengths[b].sum()) for b in plan)

    assert sorted(np.concatenate(grouped).tolist()) == list(range(1000))
    assert padding(grouped) < padding(plain) / 10
    again = plan_batches(1000, lengths, group_by_length=True, **kw)
    assert all((x == y).all() for x, y in zip(grouped, again))


@pytest.fixture
def sft_recipe(make_recipe):
    rows = alpaca_rows(40) + [{"instruction": "long", "input": "", "output": "x " * 400}]
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": jsonl(rows)},
                    per_device_train_batch_size=4, per_device_eval_batch_size=3, cutoff_len=128, val_size=0.2)
    build(data_args(r))
    return r


def test_sft_batches_are_padded_and_shifted(sft_recipe):
    data = tokenized_split(data_args(sft_recipe), "train")
    loader = sft_loader(data_args(sft_recipe), "train", epoch=2)
    assert len(loader) == len(data) // 4
    for k in range(len(loader)):
        batch, idx = loader.batch(k), loader.indices(k)
        assert batch["input_ids"].dtype == torch.long and batch["labels"].shape == batch["input_ids"].shape
        width = max(len(data.example(i).input_ids) for i in idx) - 1
        assert batch["input_ids"].shape == (4, width)
        for row, i in enumerate(idx):
            ex = data.example(i)
            n = len(ex.input_ids) - 1
            assert batch["input_ids"][row, :n].tolist() == ex.input_ids[:-1]
            assert batch["labels"][row, :n].tolist() == ex.labels[1:]  # labels[t] is the target of position t
            assert batch["labels"][row, n:].eq(-100).all() and batch["input_ids"][row, n:].eq(50256).all()
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
            assert batch["labels"][row, n - 1] == 50256  # the EOS closing the response is a target


def test_resume_skips_batches_exactly(sft_recipe):
    loader = sft_loader(data_args(sft_recipe), "train", rank=1, world_size=2, epoch=1)
    full = list(loader)
    tail = list(loader.iter_from(3))
    assert len(tail) == len(full) - 3
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(full[3:], tail))
    loader.set_epoch(2)
    assert [loader.indices(k).tolist() for k in range(len(loader))] != \
        [sft_loader(data_args(sft_recipe), "train", rank=1, world_size=2, epoch=1).indices(k).tolist() for k in range(len(loader))]


def test_counts_after_the_length_policy(sft_recipe):
    counts = count_examples(data_args(sft_recipe))
    data = tokenized_split(data_args(sft_recipe), "train"), tokenized_split(data_args(sft_recipe), "val")
    assert counts == {"train": len(data[0]), "val": len(data[1])}
    assert counts["train"] + counts["val"] == 40  # the long row was dropped
    assert sum(d.dropped["over cutoff_len"] for d in data) == 1


def test_train_split_smaller_than_a_global_batch(sft_recipe):
    with pytest.raises(UserError, match=r"the train split has 32 examples, fewer than one global batch of 64 "
                                        r"\(per_device_train_batch_size 16 x 4 ranks\)"):
        sft_loader(data_args(dict(sft_recipe, per_device_train_batch_size=16)), "train", world_size=4)


def test_repeated_padding_examples_are_never_scored():
    import torch
    from pipeline.data.loaders import Loader

    def collate(indices):  # one token per example, its label = the example index
        return {"labels": torch.tensor(indices, dtype=torch.long).reshape(-1, 1)}

    n, w = 5, 2  # 5 val examples on 2 ranks: rank 1 gets example 0 again, which must not count twice
    labels = []
    for rank in range(w):
        loader = Loader(n, None, collate, batch_size=1, world_size=w, rank=rank, seed=0, epoch=0, shuffle=False,
                        drop_last=False, group_by_length=False)
        labels += [int(v) for batch in loader for v in batch["labels"].flatten()]
    assert sorted(labels) == [-100, 0, 1, 2, 3, 4]


def test_disable_shuffling_reads_the_train_split_in_order_every_epoch(sft_recipe):
    """LLaMA-Factory's disable_shuffling (a sequential sampler): the train split in its built order, the same every
    epoch and without grouping by length; the default still shuffles per epoch."""
    from pipeline.data.loaders import make_loader

    plain = dict(sft_recipe, disable_shuffling=True, group_by_length=True)
    for epoch in (0, 1):
        loader = make_loader(data_args(plain), "train", epoch=epoch)
        assert [int(i) for k in range(len(loader)) for i in loader.indices(k)] == list(range(len(loader) * 4))
    shuffled = make_loader(data_args(sft_recipe), "train", epoch=0)
    assert [int(i) for k in range(len(shuffled)) for i in shuffled.indices(k)] != list(range(len(shuffled) * 4))



def _ignores(process, signum: int = 2) -> bool:
    """Whether `process` (alive) ignores `signum` (SIGINT), from the kernel's SigIgn mask in /proc/<pid>/status
    (Linux)."""
    from pathlib import Path

    status = Path(f"/proc/{process.pid}/status").read_text(encoding="ascii")
    mask = next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


def _workers_started(loader) -> tuple[object, list]:
    """A batch iterator of `loader` (2 DataLoader workers) past its first batch, and its workers, each past its
    start-up (worker_init_fn run: the fix, when there is one, in place)."""
    import multiprocessing
    import signal
    import time

    loader.num_workers = 2
    batches = iter(loader)
    next(batches)
    children = multiprocessing.active_children()
    deadline = time.monotonic() + 2
    while not all(_ignores(c, signal.SIGTERM) for c in children) and time.monotonic() < deadline:
        time.sleep(0.01)
    return batches, children


def test_workers_leave_sigterm_to_training_which_ends_them_with_close(sft_recipe):
    """A job-wide SIGTERM (a scheduler's preemption signals the whole process group) reaches the DataLoader workers:
    they ignore it and go on serving batches while training saves; then Loader.close ends them at once (torch's
    shutdown: told to stop, joined), since multiprocessing's exit would wait forever for a worker that ignores
    the SIGTERM it stops workers with. Before, the workers died of it and training failed with torch's "DataLoader
    worker (pid N) is killed by signal: Terminated"."""
    import os
    import signal

    with sft_loader(data_args(sft_recipe), "train") as loader:
        batches, workers = _workers_started(loader)
        assert len(workers) == 2
        for worker in workers:
            os.kill(worker.pid, signal.SIGTERM)
        assert next(batches)["input_ids"].shape[0] == 4  # still served
    assert not any(w.is_alive() for w in workers)  # ended by close(), not left to exit
    assert next(batches, None) is None


def test_a_worker_killed_by_sigkill_still_fails_loudly(sft_recipe):
    """SIGKILL (the scheduler's escalation, the OOM killer) cannot be ignored: the next batches fail (torch's error
    names the worker), and closing the loader after it does not hang on the dead workers."""
    import os
    import signal

    with sft_loader(data_args(sft_recipe), "train") as loader:
        batches, workers = _workers_started(loader)
        # torch's error; or, fetching a batch a dead worker had queued (its tensors shared by a file descriptor that
        # the worker was to hand over), the connection's: refused (ConnectionError) or, killed while it answered,
        # closed mid-handshake (EOFError from multiprocessing.resource_sharer; seen once in CI on 7056407)
        with pytest.raises((RuntimeError, ConnectionError, EOFError)) as failure:
            for worker in workers:
                os.kill(worker.pid, signal.SIGKILL)  # torch's SIGCHLD handler may raise right here
            list(batches)
        assert isinstance(failure.value, (ConnectionError, EOFError)) or "DataLoader worker (pid" in str(failure.value)
    assert not any(w.is_alive() for w in workers)


def test_more_workers_than_cpus_is_one_notice_not_torchs_warning_every_epoch(make_recipe, capfd, monkeypatch):
    """LLaMA-Factory's examples set dataloader_num_workers: 4; on a machine with fewer CPUs torch warns twice an epoch
    (DataLoader's construction and each iterator). Said once instead, and torch's warning (that message from that
    module only) hidden; the batches are the same as without workers. A terminal's Ctrl-C reaches the workers too
    (the process group): they ignore it, leaving the stop to training's handler, which each fork inherited and ran,
    printing its notice once per worker."""
    import multiprocessing
    import os
    import signal
    import time
    import warnings

    from pipeline.train.loop import StopRequest

    import pipeline.data.loaders as loaders

    from pipeline.data.build import usable_cores

    workers = usable_cores() + 1
    rows = alpaca_rows(12)
    r = make_recipe({"d": {"file_name": "raw/d.jsonl"}}, files={"raw/d.jsonl": jsonl(rows)},
                    per_device_train_batch_size=4, cutoff_len=128, dataloader_num_workers=workers)
    build(data_args(r))
    monkeypatch.setattr(loaders, "_said_worker_count", False)
    monkeypatch.setattr("sys.warnoptions", [])
    monkeypatch.delenv("RANK", raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        loader = loaders.make_loader(data_args(r), "train")
        epochs = []
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            with StopRequest() as stop:  # as in training
                batches = iter(loader)
                got = [next(batches)["input_ids"]]
                children = multiprocessing.active_children()  # the DataLoader's workers, mid-epoch
                deadline = time.monotonic() + 2  # each past its start-up (the fix, when there is one, is in place)
                while not all(map(_ignores, children)) and time.monotonic() < deadline:
                    time.sleep(0.01)
                for child in children:
                    os.kill(child.pid, signal.SIGINT)
                epochs.append(got + [b["input_ids"] for b in batches])
            assert stop.signum is None
        warnings.warn("This DataLoader will create 9 worker processes in total. Our suggested max number of worker "
                      "is 2", UserWarning)  # the same text from another module still shows
    assert [str(w.message)[:40] for w in seen] == ["This DataLoader will create 9 worker pro"], seen
    err = capfd.readouterr().err
    assert "SIGINT" not in err, err
    assert err.count("notice: dataloader_num_workers:") == 1, err
    assert f"notice: dataloader_num_workers: {workers} worker processes per DataLoader, more than the " in err
    loader.num_workers = 0
    assert all(torch.equal(a, b) for a, b in zip(epochs[1], [b["input_ids"] for b in loader]))
