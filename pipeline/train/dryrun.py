"""`python -m pipeline train RECIPE --dry-run` (`make dry-run`): the whole start of a run, one step, nothing kept.

A user checks a recipe on the real model in seconds before a long run: model load, LoRA injection,
DeepSpeed initialisation, one forward/backward/optimizer step and a checkpoint write all happen exactly
as in `train`, but every file goes to a temporary folder that is removed at the end, so output_dir is
left untouched (a checkpoint to resume from is read from it, never written). The report says how long
the first step and the checkpoint write took and the peak memory, and extrapolates the run's duration.
"""
from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.recipe.args import TrainArgs, train_args
from pipeline.recipe.typed import typed_overrides
from pipeline.runtime import dist


def scratch_dir() -> Path:
    """The same temporary folder on every rank of a node (the ranks share their launcher as parent)."""
    owner = os.getppid() if dist.world_size() > 1 else os.getpid()
    return Path(tempfile.gettempdir()) / f"pipeline-dry-run-{owner}"


def redirect(r: Any) -> tuple[Any, Path]:
    """The recipe with output_dir moved to a fresh scratch folder (rank 0 empties a stale one first)."""
    scratch = scratch_dir()
    if dist.is_main() and scratch.exists():
        shutil.rmtree(scratch)
    dist.barrier()
    return r.replace(output_dir=str(scratch / "output_dir"), overwrite_output_dir=False), scratch


@dataclass
class OneStep:
    """Stands in for the loop's StopRequest: asks to stop (and save) right after the first optimizer step.

    The loop then writes a checkpoint as it does after Ctrl-C, so the save path is exercised too.
    """

    started: float = field(default_factory=time.monotonic)
    stepped: float | None = None
    exit_code: int = 0
    recipe: Any = None  # the recipe with exact step counts, set by train()

    def __enter__(self) -> "OneStep":
        self.started = time.monotonic()
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def requested(self) -> bool:
        if self.stepped is None:
            self.stepped = time.monotonic()
        return True


def peak_rss_mib() -> float:
    """This process's peak resident memory (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def folder_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / (1024 * 1024)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def report(train: TrainArgs, real_output_dir: str, one: OneStep, finished: float, scratch: Path,
           record: Mapping[str, Any]) -> str:
    """The lines printed at the end of a dry run (rank 0)."""
    import torch

    step_s = (one.stepped or finished) - one.started
    save_s = finished - (one.stepped or finished)
    checkpoints = sorted((scratch / "output_dir").glob("checkpoint-*"))
    size = f", {folder_mib(checkpoints[-1]):.1f} MiB" if checkpoints else ""
    loss = f" (loss {record['loss']:.4f})" if isinstance(record.get("loss"), float) else ""
    # stage ppo's step draws ppo_buffer_size x the accumulation (pipeline.recipe.batches_per_step)
    per_step = train.batches_per_step
    lines = [
        "dry run: ok - model load, fine-tuning setup, DeepSpeed initialisation, one optimizer step and a checkpoint"
        " write all worked",
        f"  first optimizer step: {step_s:.2f} s{loss} ({train.per_device_train_batch_size} x "
        f"{per_step} micro-batches per rank; includes one-time warm-up)",
        f"  checkpoint write: {save_s:.2f} s{size}",
        f"  peak memory: {peak_rss_mib():,.0f} MiB resident (rank 0 process)"
        + (f", {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB GPU" if torch.cuda.is_available() else ""),
        f"  whole run: {train.total_steps:,} steps x {step_s:.2f} s = about {_duration(train.total_steps * step_s)}"
        " at this step time (an upper bound: later steps skip the warm-up; evaluation and checkpoints add to it)",
        f"  output_dir {real_output_dir} was not touched; the temporary files are removed",
    ]
    return "\n".join(lines)


def cleanup(scratch: Path) -> None:
    dist.barrier()
    if dist.is_main():
        shutil.rmtree(scratch, ignore_errors=True)


def real_run_problem(output_dir: str, at: str, occupied: str | None = None) -> str | None:
    """Warning lines for what the real run would meet in its output_dir (`at`: where the recipe set it): a folder it
    could not write, or one another run holds the lock on (pipeline.lock refuses both, before the model loads), and
    then one it would not start in (`occupied`: RunLayout.start_refusal, a folder holding another run or a finished
    one). The dry run writes only to its temporary folder and takes no lock, so it goes on (it still reports what it
    checks) and says what the real run would meet. None when nothing. Nothing is left on disk, and the lock is not
    taken (pipeline.lock.unwritable, in_use)."""
    from pipeline.lock import in_use, unwritable

    refusal = unwritable(output_dir, at)
    problems = [refusal.messages[0] if refusal is not None else in_use(output_dir, at), occupied]
    said = [f"warning: {problem}. The real run would stop there; this dry run writes only to a temporary folder, so "
            "it goes on" for problem in problems if problem]
    return "\n".join(said) or None


def run(r: Any, train: Any) -> int:
    """`train --dry-run`: train(r) redirected to a scratch folder, stopped after one step, then the report."""
    from pipeline.data.kept import nothing_kept
    from pipeline.runtime.log import LOG_FILE, read_log
    from pipeline.train import checkpoint

    dist.init(r.get("ddp_timeout"))
    from pipeline.runtime.layout import RunLayout

    real_output_dir = str(r["output_dir"])
    # 'latest' is looked up in the real output_dir, which is only read
    resume = checkpoint.find_resume(r["resume_from_checkpoint"], real_output_dir,
                                    checkpoint.where(r, "resume_from_checkpoint"))
    at = checkpoint.where(r, "output_dir")
    occupied = RunLayout(Path(real_output_dir)).start_refusal(at, kept=resume is not None or r["overwrite_output_dir"],
                                                              recipe=getattr(r, "recipe_path", None),
                                                              overrides=typed_overrides(r), ranks=r["world_size"])
    if dist.is_main() and (problem := real_run_problem(real_output_dir, at, occupied)):
        print(problem, file=sys.stderr, flush=True)
    if resume is not None:
        r = r.replace(resume_from_checkpoint=str(resume))
    r, scratch = redirect(r.replace(logging_steps=1, logging_strategy="steps"))
    try:
        one = OneStep()
        with nothing_kept():  # the build's saved counts (pipeline.data.counts) too: the dry run touches nothing
            result = train(r, one_step=one)
        finished = time.monotonic()
        if dist.is_main():
            records = read_log(scratch / "output_dir" / LOG_FILE)
            print(report(train_args(one.recipe or r), real_output_dir, one, finished, scratch, records[-1] if records else {}), flush=True)
        return result.exit_code
    finally:
        cleanup(scratch)
