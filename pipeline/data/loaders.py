"""Batches for training and evaluation, sharded across ranks, resumable at any batch.

Batch contract (INTERNALS.md): input_ids (B, T) long, labels (B, T) long with -100 where not
trained, already shifted (labels[:, t] is the target of position t), attention_mask (B, T); padded with the tokenizer's pad id (masked out).

Order: a permutation seeded by (seed, epoch); with group_by_length, examples are sorted by length
inside mega-batches of 50 global batches and the global batches are shuffled. A global batch is
per_device_batch_size x world_size examples; rank k takes the k-th slice of every global batch, so
a run on N ranks sees the same global batches as a run on 1 rank with an N times larger micro-batch.
train drops the last incomplete global batch (the book's drop_last=True); val keeps it, padded to a
multiple of world_size by repeating the first examples (like torch's DistributedSampler) so every
rank has the same number of batches. The whole plan is a pure function of (seed, epoch, rank,
world_size), so resuming skips k batches without touching their data (`iter_from(k)`).

sft: examples are prompt + response + EOS, at most cutoff_len tokens; T = longest - 1 per batch.
With packing (pipeline.data.packing) the loader's items are packed rows instead of examples: batches,
shards, epochs and the resume position all count packs; T = the fullest row of the batch.
dpo: a batch of B pairs is (2B, T): the chosen sequences, then the rejected ones (pipeline.data.pairs).
kto: the same (2B, T) layout, the B examples then their KL sequences, plus kto_tags (pipeline.data.feedback).
pt: the book's sliding windows (create_dataloader_v1): for i in range(0, len(ids) - L, stride),
input ids[i:i+L], target ids[i+1:i+L+1], with L = cutoff_len and stride = pt_stride (null = L).
"""
from __future__ import annotations

import atexit
import contextlib
import signal
import sys
import weakref
from typing import Any, Callable, Generator, Iterator

import numpy as np

from pipeline.data.args import DataArgs
from pipeline.data.packing import Packs, collate_packs, pack_examples
from pipeline.data.tokenize import IGNORE, dropped_words, pt_stream, pt_windows, tokenized_split
from pipeline.data.model_tokenizer import recipe_tokenizer
from pipeline.errors import UserError
from pipeline.launched import first_rank
from pipeline.library_warnings import hide_library_warning

MEGA_BATCHES = 50


def plan_batches(n: int, lengths: np.ndarray | None = None, *, batch_size: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, epoch: int = 0, shuffle: bool = True, drop_last: bool = False,
                 group_by_length: bool = False) -> list[np.ndarray]:
    """Example indices of each batch of `rank`; every rank gets the same number of batches."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n) if shuffle else np.arange(n)
    size = batch_size * world_size
    if drop_last:
        order = order[: (n // size) * size]
    elif n and n % world_size:
        # Every rank needs the same number of batches: repeat examples from the start, as index + n so the
        # Loader can mask their labels (a repeated example must not count twice in an eval loss).
        pad = world_size - n % world_size
        order = np.concatenate([order, np.resize(order, pad) + n])
    grouped = group_by_length and shuffle and lengths is not None
    if grouped and len(order):
        mega = size * MEGA_BATCHES
        order = np.concatenate([chunk[np.argsort(-lengths[chunk], kind="stable")]
                                for chunk in np.split(order, range(mega, len(order), mega))])
    batches = [order[i:i + size] for i in range(0, len(order), size)]
    if grouped and len(batches) > 1:
        full = [b for b in batches if len(b) == size]
        rest = [b for b in batches if len(b) != size]
        batches = [full[i] for i in rng.permutation(len(full))] + rest
    out = []
    for b in batches:
        share = len(b) // world_size
        out.append(b[rank * share:(rank + 1) * share])
    return out


STOPS = {signal.SIGINT, signal.SIGTERM}  # the signals that ask training to save and stop (pipeline.train.loop)


def _leave_stops_to_training(worker_id: int) -> None:
    """A DataLoader worker ignores Ctrl-C and SIGTERM: the training process stops after its step and saves
    (pipeline.train.loop.StopRequest), then ends its workers itself (Loader.close). A terminal's Ctrl-C reaches the
    whole process group, and so does a scheduler's SIGTERM (SLURM preemption, a Kubernetes stop, `kill -TERM --
    -PGID`): a worker that died of it failed the run with torch's "DataLoader worker (pid N) is killed by signal:
    Terminated" instead of the save; one that kept the handler it was forked with printed the stop notice again.
    SIGKILL (the scheduler's escalation, the OOM killer) still ends a worker, and torch fails the run loudly."""
    for signum in STOPS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # a stop held since the fork (_stops_held) is now discarded


@contextlib.contextmanager
def _stops_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while the DataLoader workers are forked. A worker is forked with the training process's
    handlers and runs _leave_stops_to_training only once it has started: a job-wide stop landing in between (a busy
    machine widens that gap: a CI run hit it) killed the worker, and the run failed with "DataLoader worker exited
    unexpectedly" instead of saving. Forked with the stops blocked, the worker holds such a stop pending until its
    SIG_IGN discards it; the training process gets its own as soon as the workers are started."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


# The batch generators of this process whose DataLoader workers may be running, each with its Loader: Loader.close
# ends a loader's, and an exit hook whatever the code that opened them left open (a worker ignores SIGTERM, and
# multiprocessing's exit stops workers with it and waits for them: forever).
_open_batches: "weakref.WeakKeyDictionary[Generator[dict, None, None], Loader]" = weakref.WeakKeyDictionary()
_exit_hook = False


def _close_open_batches(owner: "Loader | None" = None) -> None:
    """Close the open batch generators of `owner` (all of them when None): each ends its workers (_from_workers)."""
    for batches, loader in list(_open_batches.items()):
        if owner is None or loader is owner:
            batches.close()


class Loader:
    """Re-iterable batches of one split for one rank and epoch; len() = batches per rank per epoch."""

    def __init__(self, n: int, lengths: np.ndarray | None, collate: Callable[[np.ndarray], dict], *,
                 batch_size: int, world_size: int, rank: int, seed: int, epoch: int, shuffle: bool,
                 drop_last: bool, group_by_length: bool):
        self.num_examples = n
        self._lengths = lengths
        self._collate = collate
        self._options = dict(batch_size=batch_size, world_size=world_size, rank=rank, seed=seed, shuffle=shuffle,
                             drop_last=drop_last, group_by_length=group_by_length)
        self.batch_size, self.world_size, self.rank = batch_size, world_size, rank
        self.num_workers = 0  # dataloader_num_workers: batches built in torch DataLoader worker processes
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._plan = plan_batches(self.num_examples, self._lengths, epoch=epoch, **self._options)

    def __len__(self) -> int:
        return len(self._plan)

    def __iter__(self) -> Iterator[dict]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[dict]:
        """Batches from index `start` on (resume): the skipped ones are never built. With workers, closing the
        generator (Loader.close, or dropping it) ends them at once."""
        if self.num_workers > 0:
            batches = self._from_workers(start)
            _open_batches[batches] = self
            return batches
        return (self.batch(k) for k in range(start, len(self._plan)))

    def _from_workers(self, start: int) -> Generator[dict, None, None]:
        """torch's DataLoader over the same batches; its workers are shut down when the generator ends, however it
        ends (exhausted, closed, an error), registered meanwhile so that close() and the exit hook can end it."""
        global _exit_hook
        import torch.utils.data

        if not _exit_hook:  # after torch's own atexit hooks: run before them (LIFO), while shutting down still works
            atexit.register(_close_open_batches)
            _exit_hook = True
        with _stops_held():  # iter() forks the workers
            batches = iter(torch.utils.data.DataLoader(_Batches(self, start), batch_size=None, shuffle=False,
                                                       num_workers=self.num_workers,
                                                       worker_init_fn=_leave_stops_to_training))
        try:
            yield from batches
        finally:  # GeneratorExit from close(), an exception, or the end: the workers are told to stop and joined
            batches._shutdown_workers()  # torch's own shutdown, which its __del__ runs (at some later time)

    def close(self) -> None:
        """End the DataLoader workers of every batch generator of this loader still open (a stop or an error left
        one suspended mid-epoch). The training process must do this itself: its workers ignore SIGTERM."""
        _close_open_batches(self)

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def batch(self, k: int) -> dict:
        indices = self._plan[k]
        repeated = indices >= self.num_examples  # padding repeats (see plan_batches): never trained or scored
        batch = self._collate(indices % self.num_examples if repeated.any() else indices)
        if repeated.any():  # pairs: rows are all chosen, then all rejected, so the mask repeats per side
            batch["labels"][torch_index(np.tile(repeated, len(batch["labels"]) // len(indices)))] = IGNORE
        return batch

    def indices(self, k: int) -> np.ndarray:
        """Example indices of batch k (for tests and audits)."""
        return self._plan[k]


class _Batches:
    """Map-style view of a Loader's batches from `start` on, for torch's DataLoader workers (same order)."""

    def __init__(self, loader: Loader, start: int):
        self.loader, self.start = loader, start

    def __len__(self) -> int:
        return len(self.loader) - self.start

    def __getitem__(self, i: int) -> dict:
        return self.loader.batch(self.start + i)


def torch_index(mask: np.ndarray) -> Any:
    import torch

    return torch.from_numpy(mask)


def _batch_size(data: DataArgs, split: str, batch_size: int | None) -> int:
    if batch_size is not None:
        return batch_size
    return data.per_device_train_batch_size if split == "train" else data.per_device_eval_batch_size


class EmptySplit(UserError):
    """A split that gives no item once the length policy ran (no_items says why: `key` cutoff_len), or a train split
    of fewer items than one global batch (`key` per_device_train_batch_size). The data layer knows no recipe file, so
    the caller that does names the key at its line (pipeline.recipe.evaluation.train_loader)."""

    def __init__(self, message: str, key: str = "cutoff_len") -> None:
        super().__init__(message)
        self.key = key


def _check_size(n: int, data: DataArgs, split: str, size: int, world_size: int, what: str) -> None:
    if n == 0:
        reason, fix = no_items(data, split)
        raise EmptySplit(f"the {split} split has {reason}; {fix}")
    if split == "train" and n < size * world_size:
        raise EmptySplit(f"the train split has {n:,} {what}, fewer than one global batch of {size * world_size:,} "
                         f"(per_device_train_batch_size {size} x {world_size} ranks); lower the batch size or add "
                         "data", "per_device_train_batch_size")


def sft_loader(data: DataArgs, split: str, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
               shuffle: bool = True, batch_size: int | None = None) -> Loader:
    """Padded batches of templated, masked examples (the length policy already applied)."""
    examples = tokenized_split(data, split)
    size = _batch_size(data, split, batch_size)
    _check_size(len(examples), data, split, size, world_size, "examples")
    offsets, ids, trainable, targets = examples.offsets, examples.ids, examples.trainable, examples.label_ids
    pad = recipe_tokenizer(data).pad_id
    order = dict(batch_size=size, world_size=world_size, rank=rank, seed=data.seed, epoch=epoch, shuffle=shuffle,
                 drop_last=split == "train", group_by_length=bool(data.group_by_length))
    if packing_enabled(data):
        packs = sft_packs(data, split)
        _check_size(len(packs), data, split, size, world_size, "packed rows")  # none only where no example is
        neat, examples = bool(data.neat_packing), split != "train"
        return Loader(len(packs), packs.fill, lambda indices: collate_packs(packs, indices, ids, trainable, offsets, pad,
                                                                           targets=targets,
                                                                           neat=neat, examples=examples), **order)
    return Loader(len(examples), examples.example_lengths(), lambda indices: pad_examples([(examples, indices)], pad),
                  **order)


def pad_examples(parts: list[tuple[Any, np.ndarray]], pad: int, whole: bool = False) -> dict:
    """One right-padded batch of the given examples of each TokenizedSplit, in order; labels shifted. The inputs
    leave out each example's last token (nothing follows it to predict), but with `whole`: stage rm scores a
    sequence at its last token, and transformers' XForSequenceClassification (and LLaMA-Factory's pairwise
    collator) see the whole sequence, so a template ending after its EOS (qwen's `<|im_end|>\n`) is scored at that
    `\n`, not at the token before it; the labels are the same either way."""
    import torch

    cut = 0 if whole else 1
    spans = [(data, int(data.offsets[i]), int(data.offsets[i + 1])) for data, indices in parts for i in indices]
    width = max(e - a for _, a, e in spans) - cut
    input_ids = np.full((len(spans), width), pad, dtype=np.int64)
    labels = np.full((len(spans), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(spans), width), dtype=np.int64)
    for b, (data, a, e) in enumerate(spans):
        n = e - a - cut
        input_ids[b, :n] = data.ids[a:a + n]
        labels[b, :e - a - 1] = np.where(data.trainable[a + 1:e], data.label_ids[a + 1:e], IGNORE)
        mask[b, :n] = 1
    return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
            "attention_mask": torch.from_numpy(mask)}


def pair_loader(data: DataArgs, split: str, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
                shuffle: bool = True, batch_size: int | None = None) -> Loader:
    """Batches of B preference pairs as one (2B, T) batch: the B chosen sequences, then the B rejected ones
    (one forward scores both sides); batch_size counts pairs. Stage kto: B rows, their examples then their KL
    sequences (pipeline.data.feedback), plus "kto_tags" (B,) bool; batch_size counts rows."""
    import torch

    pairs = tokenized_pair_split(data, split)
    pad = recipe_tokenizer(data).pad_id
    size = _batch_size(data, split, batch_size)
    _check_size(len(pairs), data, split, size, world_size, item_name(data))
    tags = pairs.tags

    def collate(indices: np.ndarray) -> dict:
        batch = pad_examples([(pairs.chosen, indices), (pairs.rejected, indices)], pad, whole=data.stage == "rm")
        if tags is not None:
            batch["kto_tags"] = torch.from_numpy(tags[indices])
        return batch

    return Loader(len(pairs), pairs.example_lengths(), collate,
                  batch_size=size, world_size=world_size, rank=rank, seed=data.seed, epoch=epoch, shuffle=shuffle,
                  drop_last=split == "train", group_by_length=bool(data.group_by_length))


def tokenized_pair_split(data: DataArgs, split: str) -> Any:
    """The split as TokenizedPairs: dpo's chosen/rejected pairs, or kto's examples with their KL sequences."""
    if data.form == "kto":
        from pipeline.data.feedback import tokenized_feedback

        return tokenized_feedback(data, split)
    from pipeline.data.pairs import tokenized_pairs

    return tokenized_pairs(data, split)


def no_items(data: DataArgs, split: str) -> tuple[str, str]:
    """Why `split` gives no item once the length policy ran, and the fix in the data: ("no windows; it has 521
    tokens and one window needs cutoff_len + 1 = 2,049", "lower cutoff_len or add text"). The loaders' refusal of an
    empty split says it, and so does train's (and validate's) of held-out rows an evaluation would find nothing in
    (pipeline.recipe.evaluation.val_split_used), which adds the recipe's keys."""
    if data.form == "pt":
        return (f"no windows; it has {len(pt_stream(data, split)):,} tokens and one window needs cutoff_len + 1 = "
                f"{data.cutoff_len + 1:,}", "lower cutoff_len or add text")
    kept = tokenized_pair_split(data, split) if data.paired else tokenized_split(data, split)
    dropped = ", ".join(f"{v:,} {k}" for k, v in kept.dropped.items() if v)
    what = item_name(data) if data.paired else "examples"
    return f"no {what}; {kept.rows:,} rows, dropped: {dropped or 'none'}", "raise cutoff_len or add data"


def packing_enabled(data: DataArgs) -> bool:
    """sft rows hold several examples (neat_packing implies packing); pt always concatenates documents; dpo
    pairs are never packed (each side is its own sequence)."""
    return data.stage == "sft" and bool(data.packing or data.neat_packing)


def item_name(data: DataArgs) -> str:
    """What the train loader's items (num_train_examples, the batch size) count, in the words train prints."""
    if data.stage == "pt":
        return f"windows of cutoff_len {data.cutoff_len}"
    if data.form == "dpo":
        return "pairs"
    if data.form == "kto":
        return "rows"
    return f"packed rows of cutoff_len {data.cutoff_len}" if packing_enabled(data) else "examples"


def sft_packs(data: DataArgs, split: str) -> Packs:
    """The split's examples packed into rows of cutoff_len positions (once per process and split)."""
    examples = tokenized_split(data, split)
    cache = examples.__dict__.setdefault("_packs", {})  # lives as long as the cached split it was made from
    if data.cutoff_len not in cache:
        cache[data.cutoff_len] = pack_examples(examples.example_lengths() - 1, data.cutoff_len)
    return cache[data.cutoff_len]


def pt_stride(data: DataArgs) -> int:
    """The step between pt windows: pt_stride, or cutoff_len (no overlap) when null."""
    return data.pt_stride or data.cutoff_len


def pt_loader(data: DataArgs, split: str, *, rank: int = 0, world_size: int = 1, epoch: int = 0,
              shuffle: bool = True, batch_size: int | None = None) -> Loader:
    """The book's sliding windows over the split's token stream (documents joined by EOS)."""
    stream = pt_stream(data, split)
    length, stride = data.cutoff_len, pt_stride(data)
    starts = pt_windows(len(stream), length, stride)
    size = _batch_size(data, split, batch_size)
    _check_size(len(starts), data, split, size, world_size, "windows")
    span = np.arange(length)

    def collate(indices: np.ndarray) -> dict:
        import torch

        at = starts[indices][:, None] + span
        return {"input_ids": torch.from_numpy(stream[at].astype(np.int64)),
                "labels": torch.from_numpy(stream[at + 1].astype(np.int64)),
                "attention_mask": torch.ones((len(indices), length), dtype=torch.long)}

    return Loader(len(starts), None, collate, batch_size=size, world_size=world_size, rank=rank, seed=data.seed,
                  epoch=epoch, shuffle=shuffle, drop_last=split == "train", group_by_length=False)


def make_loader(data: DataArgs, split: str, *, say_workers: bool = True, **kwargs: Any) -> Loader:
    """sft_loader, pt_loader or pair_loader, by the recipe's stage. disable_shuffling: the train split in its built
    order every epoch (LLaMA-Factory's sequential sampler), whatever the caller asked. say_workers: False for a
    loader never iterated (validate's length pass) or one whose workers' notice train said already (eval in make's
    chain): say_worker_count."""
    from pipeline.data.counts import keep_tally, key_before_reading

    if split == "train" and data.disable_shuffling:
        kwargs["shuffle"] = False
    key = key_before_reading(data, split) if first_rank() else None  # rank 0 alone keeps it
    loader = (pair_loader if data.paired else pt_loader if data.form == "pt" else sft_loader)(data, split, **kwargs)
    keep_tally(data, split, tokenized_tally(data, split), key)  # what plan and validate count next (pipeline.data.counts)
    loader.num_workers = int(data.dataloader_num_workers or 0)
    if say_workers:
        say_worker_count(loader.num_workers)
    return loader


# torch's DataLoader warns when num_workers exceeds the CPUs this process may use, twice an epoch (at its
# construction and at each iterator): (message regex, category, emitting-module regex), warnings.filterwarnings's
# fields, matched together.
WORKER_COUNT_WARNING = (r"This DataLoader will create \d+ worker processes in total\. Our suggested max number of "
                        r"worker", UserWarning, r"torch\.utils\.data\.dataloader\Z")
_said_worker_count = False


def say_worker_count(workers: int) -> None:
    """dataloader_num_workers above the CPUs this process may use (LLaMA-Factory's examples set 4) is said once, as
    a notice on rank 0, instead of torch's warning twice every epoch of the run: its message, category and module
    only are hidden, and nothing when the user chose warning filters (PYTHONWARNINGS or python -W)."""
    global _said_worker_count
    if workers == 0 or _said_worker_count:
        return
    from pipeline.data.build import usable_cores  # the CPUs torch's DataLoader counts too (its suggested maximum)

    cpus = usable_cores()
    if workers <= cpus:
        return
    _said_worker_count = True
    if first_rank():
        print(f"notice: dataloader_num_workers: {workers} worker processes per DataLoader, more than the {cpus} "
              f"CPUs this process may use: they share them with training (batches may come slower); set "
              f"dataloader_num_workers: {cpus} or less here", file=sys.stderr)
    hide_library_warning(WORKER_COUNT_WARNING)  # not under the user's own PYTHONWARNINGS / -W


def dropped_note(data: DataArgs) -> str:
    """tokenize.dropped_words for the train split as the trainer tokenizes it (exact counts; tokenized once per
    process, which validate's length pass and train do anyway); "" for pt, whose documents are cut into windows."""
    if data.form == "pt":
        return ""
    counted = tally(data, "train")  # kept beside the build by an earlier count: validate tokenizes nothing then
    return dropped_words(counted["dropped"], counted["rows"], data.cutoff_len)


def holds_out(data: DataArgs) -> bool:
    """Whether the val split holds any rows (documents) before the length policy: when it does and still gives
    no example (pt: fewer tokens than one window; sft: every example over cutoff_len), an evaluation the user
    asked for would silently not happen."""
    from pipeline.data.load import read_rows, split_files

    return any(read_rows(path, data) for path in split_files(data, "val"))


def count_examples(data: DataArgs) -> dict[str, int]:
    """Examples per split after the length policy (pt: windows), for exact step counts."""
    return {s: count_items(data, s) for s in ("train", "val")}


def count_items(data: DataArgs, split: str) -> int:
    """The items of `split` once the length policy ran (pt: windows; sft with packing: packs; dpo: pairs)."""
    return tally(data, split)["items"]


def tally(data: DataArgs, split: str) -> dict[str, Any]:
    """count_items and, but for pt, the rows the split held and those the length policy dropped, by reason
    (dropped_note's words): kept next to the build when these settings were counted before (pipeline.data.counts),
    else counted by tokenizing the split, and kept."""
    from pipeline.data.counts import cached_tally, keep_tally, key_before_reading

    key = key_before_reading(data, split)
    kept = cached_tally(data, split, key) if key is not None else None
    if kept is not None:
        return kept
    counted = tokenized_tally(data, split)
    keep_tally(data, split, counted, key)
    return counted


def tokenized_tally(data: DataArgs, split: str) -> dict[str, Any]:
    """tally of the split as tokenized in this process (once: the per-process caches of tokenize and sft_packs)."""
    if data.stage == "pt":
        return {"items": len(pt_windows(len(pt_stream(data, split)), data.cutoff_len, pt_stride(data)))}
    tokenized = tokenized_pair_split(data, split) if data.paired else tokenized_split(data, split)
    items = len(sft_packs(data, split)) if packing_enabled(data) else len(tokenized)
    return {"items": items, "rows": tokenized.rows, "dropped": dict(tokenized.dropped)}
