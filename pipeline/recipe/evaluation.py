"""When a training run evaluates, and whether it reads its val split: one source for train (its loop evaluates at these
steps, and it builds the val loader when this says so) and validate (which refuses what train would refuse, in train's
words), and the train loader both build, whose empty split they refuse at the recipe key alike. Below the stages,
which may not import each other; torch-free."""
from __future__ import annotations

from typing import Any

from pipeline.errors import UserError
from pipeline.recipe.args import TrainArgs, data_args, key_at, train_args


def periodic_due(strategy: str, every: int, step: int, steps_per_epoch: int | None) -> bool:
    """transformers' IntervalStrategy for logging_strategy and save_strategy after optimizer step `step`: steps
    (every `every`), epoch (each epoch's last step), no (never; the caller adds the end of training)."""
    if strategy == "epoch":
        return bool(steps_per_epoch) and step % steps_per_epoch == 0
    if strategy == "no":
        return False
    return step % every == 0


def eval_due(train: TrainArgs, step: int, last: bool) -> bool:
    """Whether to evaluate after optimizer step `step`: eval_strategy (LLaMA-Factory's), then do_eval at the end.

    eval_strategy null: every eval_steps when set; no: never during training; steps: every eval_steps (else
    every logging_steps, as transformers does); epoch: at each epoch end. The last step evaluates unless
    do_eval is false.
    """
    strategy, every = train.eval_strategy, train.eval_steps
    if strategy in ("steps", "epoch", "no"):
        due = periodic_due(strategy, every or train.logging_steps, step, train.steps_per_epoch)
    else:
        due = bool(every) and step % every == 0
    return due or (last and train.do_eval is not False)


def evaluates(train: TrainArgs) -> bool:
    """Whether eval_due holds at some step of the run: the last one, or the first of a period (train asks for the
    val split only then)."""
    total = train.total_steps
    periods = (train.eval_steps, train.logging_steps, train.steps_per_epoch)
    return any(eval_due(train, step, step == total) for step in {total, *(p for p in periods if p and p <= total)})


def train_loader(r: Any, **options: Any) -> Any:
    """pipeline.data.loaders.make_loader of `r`'s train split (`options`: rank, world_size, ...), its refusal of a
    split the length policy left empty at cutoff_len's file:line, the key the rows do not fit (as the val split's,
    held_out_gives_nothing), and of one short of a global batch at per_device_train_batch_size's: the loader knows
    no recipe file, and said the same words without a key."""
    from pipeline.data.loaders import EmptySplit, make_loader

    try:
        return make_loader(data_args(r), "train", **options)
    except EmptySplit as err:
        raise UserError(f"{key_at(r, err.key)}: {err}") from None


def val_split_used(r: Any) -> bool:
    """Whether training reads the val split: it gives examples (pt: windows) once the length policy ran, or the run
    evaluates (`r` with its exact step counts: derive_steps) and held-out rows give none. That last case is refused:
    an evaluation the user asked for, or the one at the end that train runs by default, would silently not happen."""
    from pipeline.data.loaders import count_examples, holds_out

    data = data_args(r)
    if count_examples(data)["val"] > 0:
        return True
    if not (evaluates(train_args(r)) and holds_out(data)):
        return False
    raise held_out_gives_nothing(r)


def held_out_gives_nothing(r: Any) -> UserError:
    """The val split's rows give no example: why (pipeline.data.loaders.no_items), at cutoff_len, the key the split
    does not fit. Where the split is held out of `dataset` (val_size) and no key asks for an evaluation, the run
    evaluates only because it holds rows out, which LLaMA-Factory does not by default (val_size 0, while ours is the
    book's 0.1): holding out nothing is a fix too. Where a key asks for one, val_size 0 would be refused
    (rules.data.val_size_zero_evaluates_nothing), so the fix is to hold out more."""
    from pipeline.data.loaders import no_items
    from pipeline.recipe.rules.data import asked_evaluation, evaluates_other_datasets
    from pipeline.recipe.typed import run_after_build_for

    reason, fix = no_items(data_args(r), "val")
    held = f"{key_at(r, 'val_size')} is {r['val_size']}" if r.origin("val_size").kind in ("file", "cli") else \
        f"val_size {r['val_size']} is the default here"
    if evaluates_other_datasets(r):
        other = ""
    elif asked_evaluation(r, {key: r.origin(key) for key in r}):
        other = f", or hold out more rows ({held})"
    else:
        again = run_after_build_for("train", r, val_size="0")
        other = (f", or hold out nothing with val_size: 0 (LLaMA-Factory's default; {held}), which evaluates "
                 f"nothing: {again}")
    return UserError(f"{key_at(r, 'cutoff_len')}: the val split has {reason}; {fix}{other}")
