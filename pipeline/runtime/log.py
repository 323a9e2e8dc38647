"""What a run leaves for people to read: trainer_log.jsonl, console lines, training_loss.png, all_results.json.

Only rank 0 writes (the caller passes `enabled=False` elsewhere). trainer_log.jsonl gets one JSON object
per logging step, appended and flushed as training goes, so `tail -f` works and a crash loses nothing; a
resumed run first drops the lines past its checkpoint's step so that the file reads as one run.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.io import write_json, write_text
from pipeline.names import wanted_reporters
from pipeline.recipe.started import RESULTS_FILE  # a finished run's mark: recipe.started reads it too

LOG_FILE = "trainer_log.jsonl"
PLOT_FILE = "training_loss.png"
ACCURACY_PLOT_FILE = "training_rewards_accuracies.png"  # stage dpo (LLaMA-Factory plots it under this name)
EVAL_ACCURACY_PLOT_FILE = "training_eval_accuracy.png"  # compute_accuracy (LLaMA-Factory's name for it too)
REWARDS_PLOT_FILE = "training_rewards_chosen.png"  # stage kto (LLaMA-Factory's kto workflow plots rewards/chosen)
REWARD_PLOT_FILE = "training_reward.png"  # stage ppo (LLaMA-Factory's ppo workflow plots reward)


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a trainer_log.jsonl (a torn last line from a killed run is ignored)."""
    records = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so that the line stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


RUNS_DIR = "runs"


class Reporters:
    """The records of trainer_log.jsonl also sent to tensorboard (output_dir/runs/) and/or wandb (rank 0 only).

    Names follow transformers' Trainer: eval_loss -> eval/loss, loss -> train/loss. Each write is flushed,
    so a killed run keeps what it logged. wandb reads WANDB_MODE (offline), WANDB_PROJECT and its login itself.
    """

    def __init__(self, report_to: Any, config: Mapping[str, Any], output_dir: str | Path, *, enabled: bool,
                 resume_step: int | None = None, run_name: str | None = None):
        """report_to: the recipe's key (a name, a list, "all" or "none"); config: what wandb records as the
        run's configuration (the resolved recipe as a plain dict); run_name: the wandb run's name (None:
        output_dir's folder name, as transformers names it after output_dir); resume_step: the checkpoint's step of a
        resumed run, after which tensorboard hides the interrupted run's events (purge_step), as TrainLog cuts
        trainer_log.jsonl back: otherwise the curve showed both versions of the steps after it."""
        self.tb = self.wandb_run = None
        if not enabled:
            return
        wanted = wanted_reporters(report_to)
        if "tensorboard" in wanted:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(output_dir) / RUNS_DIR),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if "wandb" in wanted:
            import os

            import wandb

            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "pipeline"),
                                        name=run_name or Path(str(output_dir)).name, dir=str(output_dir), config=config)

    def write(self, record: Mapping[str, Any]) -> None:
        step = record.get("step")
        values = {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): float(v)
                  for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                  and math.isfinite(v)}
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
            self.tb.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


class TrainLog:
    """Appends records to output_dir/trainer_log.jsonl and prints a short line per record to stderr."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, resume_step: int | None = None,
                 reporters: Reporters | None = None):
        self.path = Path(output_dir) / LOG_FILE
        self.enabled = enabled
        self.reporters = reporters
        if enabled and resume_step is not None:
            kept = [rec for rec in read_log(self.path) if rec.get("step", 0) <= resume_step]
            write_text(self.path, "".join(json.dumps(rec) + "\n" for rec in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        line = json.dumps({k: _finite(v) for k, v in record.items()}, allow_nan=False)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        self.echo(record)
        if self.reporters is not None:
            self.reporters.write(record)

    def close(self) -> None:
        if self.reporters is not None:
            self.reporters.close()

    def echo(self, record: Mapping[str, Any]) -> None:
        from tqdm import tqdm

        tqdm.write(format_record(record), file=sys.stderr)


def progress_eta(bar: Any) -> float | None:
    """The seconds left as the progress bar shows them, or None where it shows none (a disabled bar: ranks past 0;
    no rate yet; no total).

    The one ETA estimator of a run: the log line's `eta` (trainer_log.jsonl, console) is this, so the two never
    disagree. tqdm's rate is an exponential moving average of the recent steps/s (smoothing 0.3), which follows a
    change of load; the log's mean over the whole run did not (0:03:05 beside the bar's 10:12 at one step). Asked of
    tqdm itself (format_meter's `remaining_s`; `remaining` is '?' where it has no rate), not re-typed from it."""
    info = bar.format_dict
    if not info.get("total"):
        return None
    # ncols None: the bar's width (dynamic_ncols: the terminal's) would cut the line short
    asked = {**info, "bar_format": "{remaining}\t{remaining_s}", "ncols": None}
    shown, seconds = bar.format_meter(**asked).split("\t")
    return None if shown == "?" else float(seconds)


def _hms(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def format_record(record: Mapping[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    if "epoch" in record:
        parts.append(f"epoch {record['epoch']:.2f}")
    for key, fmt in (("loss", "{:.4f}"), ("l1", "{:.4g}"), ("eval_loss", "{:.4f}"), ("eval_perplexity", "{:.2f}"),
                     ("eval_accuracy", "{:.4f}"), ("lr", "{:.3e}"), ("grad_norm", "{:.3f}"), ("loss_scale", "{:g}"),
                     ("tokens_per_s", "{:.0f}")):
        if record.get(key) is not None:
            parts.append(f"{key} {fmt.format(record[key])}")
    if "eta" in record:
        parts.append(f"eta {_hms(record['eta'])}")
    return " | ".join(parts)


def running_mean(values: Iterable[float], window: int) -> list[float]:
    """Mean of the last `window` values at each point (fewer at the start)."""
    out, total, kept = [], 0.0, []
    for value in values:
        kept.append(value)
        total += value
        if len(kept) > window:
            total -= kept.pop(0)
        out.append(total / len(kept))
    return out


def plot_loss(records: Iterable[Mapping[str, Any]], path: str | Path, title: str = "") -> Path | None:
    """Train (and eval) loss against the optimizer step; None when there is nothing to plot."""
    return plot_curve(records, "loss", path, title=title or "training loss")


def plot_curve(records: Iterable[Mapping[str, Any]], key: str, path: str | Path, *, title: str) -> Path | None:
    """The log's `key` (train) and `eval_<key>` against the optimizer step; None when there is nothing to plot."""
    records = list(records)
    train = [(rec["step"], rec[key]) for rec in records if isinstance(rec.get(key), (int, float))]
    evals = [(rec["step"], rec[f"eval_{key}"]) for rec in records
             if isinstance(rec.get(f"eval_{key}"), (int, float))]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    if len(train) >= 20:  # long runs: the raw curve faint, a running mean over ~5% of it on top
        ax.plot(*zip(*train), color="tab:blue", alpha=0.3, linewidth=0.8)
        steps, values = zip(*train)
        ax.plot(steps, running_mean(values, max(2, len(values) // 20)), label=f"train {key} (running mean)",
                color="tab:blue", linewidth=1.5)
    elif train:
        ax.plot(*zip(*train), label=f"train {key}", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), label=f"eval {key}", color="tab:orange", marker="o", linewidth=1.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_results(output_dir: str | Path, results: Mapping[str, Any]) -> None:
    write_json(Path(output_dir) / RESULTS_FILE, {k: _finite(v) for k, v in results.items()})
