"""Where a run's outputs live, and which tuned weights are current: one answer for train, merge, eval, chat.

    output_dir/                 RunLayout(output_dir)
      resolved.yaml             .resolved_yaml     every value with its provenance (train)
      ds_config.json            .ds_config         the DeepSpeed config used (train)
      trainer_log.jsonl         .trainer_log       one record per logging step (train)
      training_loss.png         .loss_plot
      training_rewards_accuracies.png              stage dpo (.accuracy_plot): how often chosen out-scores rejected
      training_eval_accuracy.png                   compute_accuracy (.eval_accuracy_plot): eval token accuracy
      training_rewards_chosen.png                  stage kto (.rewards_plot): the desirable responses' reward
      training_reward.png                          stage ppo (.reward_plot): the reward model's mean score
      all_results.json          .all_results       final numbers of the run
      checkpoint-<step>/                           resumable state (pipeline.train.checkpoint owns its inside)
      adapter/                  .adapter           lora: the trained adapter (PEFT layout)
      model/                    .model             full/freeze: the trained weights (our format)
      merged/                   .merged            merge: Hugging Face layout, verified (export_dir when set)
      eval/                     .eval              eval: metrics.json, predictions.jsonl, report.md

Which tuned weights are current (`current_weights`): merged/ when it is complete and at least as new as
what it was made from; otherwise what training produced (`trained_weights`): for lora the adapter this
recipe trained (output_dir/adapter), else the one it started from (adapter_name_or_path); for full/freeze
output_dir/model. A merged/ older than the training it came from is stale: it is passed over with a
note, by eval and chat alike. Importing this module does not import torch.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from pipeline.names import trains_adapter
from pipeline.recipe.started import RESOLVED_FILE, RESULTS_FILE
from pipeline.runtime.log import ACCURACY_PLOT_FILE, EVAL_ACCURACY_PLOT_FILE, LOG_FILE, PLOT_FILE, REWARD_PLOT_FILE, \
    REWARDS_PLOT_FILE

if TYPE_CHECKING:
    from pipeline.recipe.started import Started

CONFIG = "config.json"  # marks a complete model folder (ours and Hugging Face's): written with the weights


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run's outputs under its output_dir."""

    root: Path
    export_dir: Path | None = None  # the recipe's export_dir: where merge puts the merged model instead of merged/

    @classmethod
    def of(cls, output_dir: str | Path, export_dir: str | Path | None = None) -> "RunLayout":
        """The layout under a recipe's output_dir (its merged model in export_dir when the recipe sets one)."""
        return cls(Path(output_dir), Path(export_dir) if export_dir else None)

    @property
    def resolved_yaml(self) -> Path:
        return self.root / RESOLVED_FILE

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def trainer_log(self) -> Path:
        return self.root / LOG_FILE

    @property
    def loss_plot(self) -> Path:
        return self.root / PLOT_FILE

    @property
    def accuracy_plot(self) -> Path:
        return self.root / ACCURACY_PLOT_FILE

    @property
    def eval_accuracy_plot(self) -> Path:
        return self.root / EVAL_ACCURACY_PLOT_FILE

    @property
    def rewards_plot(self) -> Path:
        return self.root / REWARDS_PLOT_FILE

    @property
    def reward_plot(self) -> Path:
        return self.root / REWARD_PLOT_FILE

    @property
    def all_results(self) -> Path:
        return self.root / RESULTS_FILE

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def merged(self) -> Path:
        return self.export_dir or self.root / "merged"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    def entries(self) -> list[str]:
        """The names in output_dir, sorted ([]: no folder there). Read once per decision and handed to
        unfinished_start and start_refusal, so every answer about the folder is about the same listing."""
        return sorted(p.name for p in self.root.iterdir()) if self.root.is_dir() else []

    def unfinished_start(self, entries: list[str] | None = None) -> list[str]:
        """The entries of a run that stopped before it saved anything (a mistake found after the start, a crash):
        only the files a run writes as it starts and logs. Empty when the folder holds anything else. `entries`:
        the folder's listing when already read (self.entries())."""
        start = {p.name for p in (self.resolved_yaml, self.ds_config, self.trainer_log, self.loss_plot)} | {"runs"}
        entries = self.entries() if entries is None else entries
        return entries if entries and set(entries) <= start else []

    def start_refusal(self, at: str, kept: bool, entries: list[str] | None = None,
                      recipe: str | Path | None = None, overrides: Sequence[str] = (),
                      ranks: int = 1) -> str | None:
        """Why a run may not start here, or None: a file in output_dir's place, or a folder holding another run
        (beyond an unfinished_start) that the run neither resumes nor overwrites (`kept`: resume_from_checkpoint or
        overwrite_output_dir; `at`: where output_dir was set). train's check_output_dir stops on it; `train
        --dry-run`, which writes elsewhere, warns with it (pipeline.train.dryrun.real_run_problem). A finished run
        is named as one, with what each key would do to it and, when it is `recipe`'s own, the command that trains it
        again without an edit: train --retrain-finished with the `overrides` typed on the run's `ranks`
        (rerun.run_this), and where make reads the pipeline's Makefile (rerun.make_runs_here) that `make train` does
        so itself once the recipe or its ARGS change (not before: make retrains only a stale run)."""
        if self.root.exists() and not self.root.is_dir():
            return f"{at}: {self.root} is a file, not a directory; choose another output_dir"
        entries = self.entries() if entries is None else entries  # the caller's listing (self.entries()), if read
        if not entries or kept or self.unfinished_start(entries):
            return None
        if self.all_results.name in entries:  # the same listing as every answer above
            writer = self.finished_recipe()
            of = f" of {writer}" if writer else ""
            again = (self._train_again(recipe, overrides, ranks) if recipe is not None and self.finished_by(recipe)
                     else "")
            return (f"{at}: {self.root} is not empty: it holds a finished run{of} (all_results.json), which a new run "
                    "neither continues nor replaces unless told: resume_from_checkpoint: latest continues it (with "
                    "more steps: raise max_steps or num_train_epochs, it trained all it was asked), "
                    f"overwrite_output_dir: true trains again from scratch (its contents are removed){again}; or "
                    "choose another output_dir")
        shown = ", ".join(entries[:6]) + (", ..." if len(entries) > 6 else "")
        return (f"{at}: {self.root} is not empty (it holds {shown}); set resume_from_checkpoint: latest to continue "
                "that run, overwrite_output_dir: true to start over (its contents are removed), or choose another "
                "output_dir")

    @staticmethod
    def _train_again(recipe: str | Path, overrides: Sequence[str], ranks: int) -> str:
        """start_refusal's aside on the command that trains a finished run of `recipe` again from scratch."""
        from pipeline.rerun import make_runs_here, train_again

        command = train_again(str(recipe), overrides, ranks=ranks)
        if make_runs_here():  # make retrains only a stale run; this run is finished and may be current
            return (f" (`make train` does so itself once the recipe or its ARGS change; {command} does so now, without "
                    "an edit)")
        return f" ({command} does so without an edit)"

    def finished_start(self) -> Started | None:
        """How the finished run here (all_results.json) was started, as its resolved.yaml records it (the recipe
        and the folder it was named in: pipeline.recipe.started, the one reader of those lines); None when no
        finished run or no record."""
        from pipeline.recipe.started import finished_start

        return finished_start(self.root)

    def finished_recipe(self) -> str | None:
        """The recipe a finished run here was trained from, as a command typed in this folder names it (a run
        trained in recipes/ as x.yaml is recipes/x.yaml from the root); None when no finished run or no name."""
        started = self.finished_start()
        return (started.named_here() or None) if started is not None else None

    def finished_by(self, recipe: str | Path) -> bool:
        """Whether this folder holds a finished run (all_results.json) of `recipe` (a path from this process's
        folder): the recipe resolved.yaml names, from the folder the run was started in. A recipe that extends
        another inherits its output_dir, so a finished run there may be the other recipe's."""
        from pipeline.recipe.started import finished_by

        return finished_by(self.root, recipe)

    def trained_dir(self, finetuning_type: str) -> Path:
        """Where training writes its final weights: adapter/ for lora and oft, model/ otherwise."""
        return self.adapter if trains_adapter(finetuning_type) else self.model


@dataclass(frozen=True)
class Weights:
    """Tuned weights: kind 'adapter' (base + LoRA adapter at path), 'model' (full/freeze weights at path) or
    'merged' (a merged model at path)."""

    kind: str
    path: Path


def is_adapter(path: Path) -> bool:
    from pipeline.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    return (path / ADAPTER_CONFIG).is_file() and (path / ADAPTER_WEIGHTS).is_file()


def is_model(path: Path) -> bool:
    return (path / CONFIG).is_file()


def trained_weights(out: RunLayout, finetuning_type: str, adapter_name_or_path: str | None) -> Weights | None:
    """What training produced: the adapter this recipe trained, else the one it started from (lora), or
    output_dir/model (full/freeze); None when there is none. The trained adapter comes first: a recipe that
    continues training from adapter_name_or_path must merge and evaluate what it trained."""
    if not trains_adapter(finetuning_type):
        return Weights("model", out.model) if is_model(out.model) else None
    if is_adapter(out.adapter):
        return Weights("adapter", out.adapter)
    if not adapter_name_or_path:
        return None
    from pipeline.model.hub import resolve_model_path  # a hub id becomes its snapshot in the HF cache

    start = resolve_model_path(adapter_name_or_path, key="adapter_name_or_path")
    # a folder the user named is used even when incomplete: loading it says precisely what is wrong (a missing
    # adapter_model.safetensors, a pickled adapter_model.bin), instead of "nothing at output_dir/adapter"
    return Weights("adapter", start) if is_adapter(start) or Path(start).is_dir() else None


def merged_weights(out: RunLayout) -> Weights | None:
    """output_dir/merged when it holds a complete model (fresh or not)."""
    return Weights("merged", out.merged) if is_model(out.merged) else None


def current_weights(out: RunLayout, finetuning_type: str, adapter_name_or_path: str | None,
                    merge: str | None = None) -> Weights | None:
    """merged/ when complete and not older than the trained weights, else the trained weights; None when
    neither exists. Passing over a stale merged/ is said on stderr, with `merge`: the command that refreshes it
    (rerun.run_this: the recipe's merge and its overrides; None: none at hand)."""
    from pipeline.rerun import run_this

    trained = trained_weights(out, finetuning_type, adapter_name_or_path)
    merged = merged_weights(out)
    if merged is None:
        return trained
    if not stale(merged, trained):
        return merged
    print(f"note: {merged.path} is older than {trained.path}; using {trained.path} instead "
          f"({merge or run_this('merge', None)} refreshes it)", file=sys.stderr)
    return trained


def stale(merged: Weights, trained: Weights | None) -> bool:
    """merged/ is older than the trained weights it would have been made from (trained again since the merge)."""
    return trained is not None and _newest(trained.path) > (merged.path / CONFIG).stat().st_mtime


def describe(weights: Weights, base: str, finetuning_type: str) -> str:
    """How reports and status lines name these weights."""
    if weights.kind == "merged":
        return f"{weights.path} (merged, Hugging Face {_architecture(weights.path)} layout)"
    if weights.kind == "adapter":
        return f"{base} + LoRA adapter {weights.path}"
    return f"{weights.path} ({finetuning_type} fine-tuning)"


def _architecture(directory: Path) -> str:
    """The transformers class config.json names (GPT2LMHeadModel, LlamaForCausalLM, ...), for the reports."""
    try:
        return str(json.loads((directory / CONFIG).read_text(encoding="utf-8"))["architectures"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return "model"


def _newest(directory: Path) -> float:
    return max((p.stat().st_mtime for p in directory.rglob("*") if p.is_file()), default=0.0)
