"""Resuming on another number of ranks (world_size N -> M) with the same global batch.

A preempted 8-GPU job that gets 4 GPUs back continues when per_device_train_batch_size x
gradient_accumulation_steps x world_size, the examples of one update, stays what the checkpoint was trained with
(8 x GA 1 -> 4 x GA 2). Why that is the same run: the loader's order is a permutation of the examples seeded by
(seed, epoch) alone, and update u takes its contiguous slice [u x B, (u + 1) x B) of it whatever the rank count
(pipeline.data.loaders: rank k takes the k-th share of each global micro-batch, and the accumulation steps take
consecutive global micro-batches), so only which rank holds which example of the update changes. The pt / sft
loss weighs every trained token of the update the same wherever it lies (pipeline.train.loop.step_scale), so the
update is the uninterrupted run's to rounding (the sums are added in another order).

What moves with the ranks: the data position (counted in micro-batches per rank), the optimizer's ZeRO partitions
(deepspeed_compat.resharded_loads), each rank's RNG state and log-window sums. What cannot, and is refused:
another global batch; per_device_train_batch_size changed under objectives that average per micro-batch (dpo,
rm, ASFT) or under group_by_length (its mega-batches count global micro-batches; so those objectives under
group_by_length, the default, keep their rank count); offload_optimizer: nvme
(DeepSpeed swaps that state through files of its own; offload_optimizer: cpu writes the same per-rank partitions
as no offload: deepspeed_compat.offload_problem).

Stages dpo and rm average their loss per micro-batch (a mean over its pairs) and the loop adds them with factor 1
(Trainer.step_scale), so an update is the mean of its micro-batches' means whatever ranks x accumulation hold them.
With per_device_train_batch_size kept the update's micro-batches are the same sets of examples (the loader cuts
each global micro-batch into rank shares of that size, in order), so only the order of the sums changes. Refused:
stage kto (its KL estimate is the mean over every rank's micro-batch of one accumulation step, PreferenceObjective
global_kl: 2 ranks x GA 1 estimate it over 2 micro-batches, 1 rank x GA 2 over one each), pref_bco_weight (its
running mean of the rewards takes all ranks' micro-batch means at once, one accumulation step at a time:
BcoBaseline.update), and ppo (rollouts, value head and PPO epochs not checked against the uninterrupted run).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.data.args import data_form
from pipeline.launched import launch_of
from pipeline.rerun import key_of, run_this
from pipeline.runtime import deepspeed_compat

BATCH_KEYS = ("world_size", "per_device_train_batch_size", "gradient_accumulation_steps")  # REFUSE keys it lifts


@dataclass(frozen=True)
class WorldChange:
    """The checkpoint's batch layout (`before`) and this run's (`after`): (ranks, micro-batch, accumulation);
    `resume`: the command that runs this recipe, as the user named it with their overrides, on the checkpoint's rank
    count (rerun.run_this; None: no recipe at hand, and the fix names the bare command)."""

    before: tuple[int, int, int]
    after: tuple[int, int, int]
    resume: str | None = field(default=None, compare=False)

    @property
    def saved_world(self) -> int:
        return self.before[0]

    @property
    def global_batch(self) -> int:
        ranks, micro, accumulation = self.after
        return ranks * micro * accumulation

    def position(self, batch_in_epoch: int) -> int:
        """The saved data position (micro-batches per rank) in this run's micro-batches: the same examples used."""
        return batch_in_epoch * self.before[0] * self.before[1] // (self.after[0] * self.after[1])

    def refused_ranks(self, path: Path) -> str:
        """The opening of every refusal of this change: which rank counts differ."""
        return f"this job has {self.after[0]} rank(s) but {path} was trained on {self.saved_world}"

    def fixes(self, path: Path) -> str:
        """The closing of every refusal of this change: what a user can do instead. The resume is launched as this
        run was, with the checkpoint's rank count (rerun.run_this, pipeline.launched.launch_of: a run on several
        nodes is told its own nodes' command, `make train NPROC=4 NNODES=2 ...`); a run on one node is told that
        count on one node, or on several (NPROC x NNODES)."""
        was = self.saved_world
        launch = launch_of(was)
        nodes = "" if launch is not None and launch.spans_nodes() else f", or NPROC x NNODES = {was}"
        return (f"resume with {was} rank(s) ({self.resume or run_this('train', None, ranks=was)}{nodes}), or start a "
                f"new run from {path}/adapter or {path}/model")

    def refusal(self, path: Path, why: str) -> str:
        """The message refusing to resume `path` on this change's rank count, for the reason `why`."""
        return f"{self.refused_ranks(path)}: {why}; {self.fixes(path)}"

    def notice(self) -> str:
        return (f"resume: world_size: {self.before[0]} -> {self.after[0]} (global batch {self.global_batch} kept: "
                f"{_layout(self.before)} -> {_layout(self.after)}): resharded")


def _layout(layout: tuple[int, int, int]) -> str:
    return f"{layout[0]} rank(s) x {layout[1]} x GA {layout[2]}"


def world_change(saved: Mapping[str, Any], layout: tuple[int, int, int],
                 r: Mapping[str, Any] | None = None) -> WorldChange | None:
    """The change of rank count between the checkpoint's recipe values `saved` and this run's `layout` (BATCH_KEYS'
    values, in that order), whose fixes name the resume of recipe `r` (WorldChange.resume: on the checkpoint's rank
    count, and with its batch keys where the command line set others, which would change the global batch again);
    None: the same rank count."""
    from pipeline.recipe.typed import run_this_for, typed_overrides

    if "world_size" not in saved or saved["world_size"] == layout[0]:
        return None
    before = tuple(int(saved.get(key, value)) for key, value in zip(BATCH_KEYS, layout))
    resume = None
    if r is not None:
        typed = {key_of(text) for text in typed_overrides(r)}
        kept = {key: str(value) for key, value in zip(BATCH_KEYS[1:], before[1:]) if key in typed}
        resume = run_this_for("train", r, ranks=before[0], **kept)
    return WorldChange(before, tuple(int(v) for v in layout), resume)  # type: ignore[arg-type]


# stages whose update is the uninterrupted run's on another rank count (with a kept micro-batch where it is a mean)
RESHARDED_STAGES = ("pt", "sft", "dpo", "rm")
# the objectives that average per micro-batch: another per_device_train_batch_size is another objective
PER_MICRO_BATCH = {"dpo": "stage dpo's loss is a mean over each micro-batch's pairs",
                   "rm": "stage rm's loss is a mean over each micro-batch's pairs"}
# why the other stages are refused (stage kto: see the module docstring)
REFUSED_STAGES = {
    "kto": "stage kto's KL estimate is the mean over every rank's micro-batch of one accumulation step, so ranks x "
           "gradient_accumulation_steps decide which examples it averages",
    "ppo": "stage ppo's rollouts and PPO epochs are not checked against the uninterrupted run"}


def problems(change: WorldChange, path: Path, batch_in_epoch: int, *, stage: str, asft: bool, group_by_length: bool,
             offload_optimizer: str, accumulation_at: str = "gradient_accumulation_steps",
             bco: bool = False, disable_shuffling: bool = False) -> list[str]:
    """Why this resume cannot continue on the new rank count ([]: it can, resharded); each says what to set.
    `batch_in_epoch`: the checkpoint's data position; the rest: this run's recipe values (`bco`: stage dpo adds
    pref_bco_weight's term), and where the recipe sets gradient_accumulation_steps (`file:line: key`,
    checkpoint.where). group_by_length binds only where the train loader groups (loaders.plan_batches: a shuffled
    split whose items have lengths): not pt's windows (pt_loader gives none), nor under disable_shuffling (the built
    order); a pt run of the default keys was refused on another rank count for it."""
    (was, micro, accumulation), (now, new_micro, _) = change.before, change.after
    group_by_length = group_by_length and not disable_shuffling and data_form(stage) != "pt"
    ranks, same = change.refused_ranks(path), change.fixes(path)
    keep = was * micro * accumulation
    if keep != change.global_batch:
        fits = [f"gradient_accumulation_steps: {keep // (now * new_micro)}"] if keep % (now * new_micro) == 0 else []
        fits += [f"per_device_train_batch_size: {micro} and gradient_accumulation_steps: {keep // (now * micro)}"
                 ] if not fits and keep % (now * micro) == 0 else []
        fix = f"set {fits[0]} to keep it on {now} rank(s)" if fits else f"{now} rank(s) cannot hold it"
        fix += f" ({accumulation_at})" if fits and accumulation_at != BATCH_KEYS[2] else ""
        return [f"{ranks}, and the global batch (per_device_train_batch_size x gradient_accumulation_steps x ranks) "
                f"is now {change.global_batch} ({_layout(change.after)}), not its {keep} ({_layout(change.before)}): "
                f"each update would take other examples. The global batch must stay: {fix}; or {same}"]
    out = []
    if stage not in RESHARDED_STAGES:
        why = REFUSED_STAGES.get(stage, f"stage {stage} is not checked against the uninterrupted run")
        out.append(change.refusal(path, f"resuming on another rank count is supported for stage "
                                        f"{', '.join(RESHARDED_STAGES)} ({why})"))
    if stage == "dpo" and bco:
        out.append(change.refusal(path, "pref_bco_weight's reward baseline is a running mean that takes every "
                                        "rank's micro-batch mean at once, one accumulation step at a time, so another "
                                        "ranks x gradient_accumulation_steps gives the micro-batches other baselines"))
    averaged = "ASFT averages a mean per micro-batch" if asft else PER_MICRO_BATCH.get(stage)
    if averaged and group_by_length:
        # each keeps what the other's fix would change (group_by_length itself is a refused key): say both at once
        out.append(f"{ranks}: {averaged}, so per_device_train_batch_size must stay {micro}, and {_grouped(micro, was)}"
                   f", so that product must stay {micro * was} too: no layout on {now} rank(s) keeps both; {same}")
    elif new_micro != micro and averaged:
        fix = (f"keep per_device_train_batch_size {micro} (gradient_accumulation_steps {keep // (now * micro)}), "
               "or ") if keep % (now * micro) == 0 else ""
        out.append(f"{ranks}, and per_device_train_batch_size is {new_micro}, not {micro}: {averaged}, so other "
                   f"micro-batches are another objective; {fix}{same}")
    elif new_micro * now != micro * was and group_by_length:
        fix = (f"set per_device_train_batch_size {micro * was // now} and gradient_accumulation_steps {accumulation} "
               "to keep them, or ") if (micro * was) % now == 0 else ""
        out.append(f"{ranks}: {_grouped(micro, was)}, which would now be {new_micro * now}, so the updates would "
                   f"hold other examples; {fix}{same}")
    offloaded = deepspeed_compat.offload_problem(offload_optimizer)
    if offloaded:
        out.append(change.refusal(path, offloaded))
    if (batch_in_epoch * was * micro) % (now * new_micro):
        out.append(f"{ranks}, and its data position ({batch_in_epoch} micro-batches of {micro} per rank into the "
                   f"epoch) is not a whole number of this run's global micro-batches of {new_micro} x {now} (nan_policy: "
                   f"skip drew extra ones); {same}")
    return out


def _grouped(micro: int, ranks: int) -> str:
    """Why group_by_length binds the rank count: what its mega-batches count (pipeline.data.loaders.plan_batches)."""
    from pipeline.data.loaders import MEGA_BATCHES

    return (f"group_by_length sorts the examples inside mega-batches of {MEGA_BATCHES} global micro-batches of "
            f"per_device_train_batch_size x ranks = {micro * ranks} examples")
