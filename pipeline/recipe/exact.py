"""The step counts a run makes, from the train loader's real example count (after the length policy; sft with
packing: packs; pt: windows), and the refusal when no optimizer step fits. One source for train (on its own rank's
loader), validate's length pass and plan (pipeline.recipe.plan), so that all three say the steps train runs: plan
counted the built rows, before the length policy dropped those over cutoff_len (LLaMA-Factory's dpo example at
max_samples 48 on a tiny Qwen3: plan said 5 steps, train ran 2)."""
from __future__ import annotations

from typing import Any, Mapping

from pipeline.data.args import DataArgs
from pipeline.errors import UserError
from pipeline.recipe.args import key_at
from pipeline.recipe.steps import batches_per_step


def exact_steps(r: Any, loader: Any, data: DataArgs | None = None) -> Any:
    """`r` with its step counts from `loader`'s example count; `data`: the loader's DataArgs, whose rows the length
    policy left out the refusal names (None: not said).

    derive_steps rounds down like the loader's drop_last, so steps_per_epoch == len(loader) // batches_per_step
    (gradient_accumulation_steps; x ppo_buffer_size under stage ppo). A run that trains needs one step an epoch,
    max_steps or not (rules.training.enough_batches asks the same of the built rows): with max_steps and no step in
    an epoch, train ran max_steps steps that each drew their micro-batches from several epochs (3 rows kept, batch 2
    x accumulation 4: 'epoch 4.00' at step 1, one step's global batch of 8 the same rows again), against the epoch
    arithmetic the loop keeps (pipeline.train.loop: an epoch is floor(batches / batches_per_step) steps, the
    micro-batches left over are not used) and what gradient_accumulation_steps says."""
    from pipeline.recipe import derive_steps

    r = derive_steps(r, loader.num_examples)
    assert r["steps_per_epoch"] == len(loader) // batches_per_step(r), "derive_steps disagrees with the loader"
    if r["do_train"] and not r["steps_per_epoch"]:
        raise no_step_fits(r, len(loader), data)
    return r


def counted_steps(r: Any, data: DataArgs) -> Any | None:
    """`r` with exact_steps' counts of the train loader of one rank on the recipe's world size (WORLD_SIZE, 1 unless
    launched), as validate and plan count them; None when the tokenizer is not on this machine yet (train reports it
    then, and the counts stay the built rows').

    The train split's item count is read back where it was counted before under the same settings (pipeline.data
    .counts: by an earlier plan, validate, train or eval), so that a second plan of a large corpus does not
    tokenize it again. A kept count that leaves no global batch or no step is counted again through the loader: its
    refusals (an empty split at cutoff_len, one short of a global batch, no_step_fits) say what the length policy
    dropped, which only the tokenized split knows."""
    from pipeline.data.counts import cached_count
    from pipeline.data.model_tokenizer import available_tokenizer
    from pipeline.recipe import derive_steps
    from pipeline.recipe.evaluation import train_loader

    if available_tokenizer(data) is None:
        return None
    kept = cached_count(data, "train")
    if kept is not None and kept >= r["per_device_train_batch_size"] * r["world_size"]:
        counted = derive_steps(r, kept)
        if counted["steps_per_epoch"] or not counted["do_train"]:
            return counted
    # an empty split: train's refusal, at cutoff_len's file:line
    loader = train_loader(r, world_size=r["world_size"], say_workers=False)
    return exact_steps(r, loader, data)


def no_step_fits(r: Mapping[str, Any], micro_batches: int, data: DataArgs | None = None) -> UserError:
    """The message for a train split whose `micro_batches` per rank (the loader's, after the length policy) fill no
    optimizer step, at the key that does not fit, as rules.training.enough_batches (which catches it first on the
    built rows). With `data`: pipeline.data.loaders.dropped_note, the rows the length policy left out and how to keep
    them (LLaMA-Factory's dpo example at max_samples 16 loses 7 of 14 pairs at cutoff_len 2048, and "add data" alone
    hid it); under packing, how many rows went into how many packs, at the packing key: the packs are what is too
    few (a step that 8 rows fill takes 8 packs), and the fixes are packing's own."""
    from pipeline.data.loaders import dropped_note, packing_enabled

    left_out = "".join(f"; {line.removeprefix('note: ')}" for line in (dropped_note(data) if data else "").splitlines())
    if data is not None and packing_enabled(data):
        return packed_no_step_fits(r, micro_batches, data, left_out)
    per_step, accumulation = batches_per_step(r), r["gradient_accumulation_steps"]
    what, keys = (f"gradient_accumulation_steps is {accumulation}", "gradient_accumulation_steps")
    if per_step != accumulation:
        what = f"{what} and ppo_buffer_size {r['ppo_buffer_size']} ({per_step} micro-batches a PPO step)"
        keys = "gradient_accumulation_steps, ppo_buffer_size"
    key = "ppo_buffer_size" if per_step != accumulation and micro_batches >= accumulation else \
        "gradient_accumulation_steps"
    return UserError(f"{key_at(r, key)}: no optimizer step fits: the train split gives {micro_batches} micro-batches "
                     f"per rank per epoch and {what}; lower {keys} or per_device_train_batch_size, or add data"
                     f"{left_out}")


def packed_no_step_fits(r: Mapping[str, Any], micro_batches: int, data: DataArgs, left_out: str) -> UserError:
    """no_step_fits under packing (stage sft): the train split's rows packed into rows of cutoff_len, fewer than the
    rows; cited at packing (neat_packing where only it is set), and setting off every key that packs."""
    from pipeline.data.loaders import sft_packs

    packs = sft_packs(data, "train")
    keys = [key for key in ("packing", "neat_packing") if r[key]]
    micro, accumulation = r["per_device_train_batch_size"], r["gradient_accumulation_steps"]
    return UserError(
        f"{key_at(r, keys[0])}: no optimizer step fits: packing put the train split's {len(packs.members)} rows into "
        f"{len(packs)} packs of cutoff_len {r['cutoff_len']}, {micro_batches} micro-batches per rank per epoch, and a "
        f"step takes per_device_train_batch_size {micro} x gradient_accumulation_steps {accumulation} packs per rank; "
        "lower per_device_train_batch_size x gradient_accumulation_steps, lower cutoff_len (more, smaller packs), "
        f"add data, or set {' and '.join(keys)}: false{left_out}")
