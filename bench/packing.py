"""Packing and gradient checkpointing, side by side: useful tokens/s and peak RSS of our LoRA sft step.

Contenders (each in its own process per round, all our real Trainer step on the same generated
Alpaca-like split, gpt2-small widths with `n_layers` blocks, bf16, LoRA r16 on every block Linear):

- unpacked: one example per row, group_by_length (our default loader);
- neat: neat_packing (rows of cutoff_len, block-diagonal attention, restarting positions);
- plain: packing without neat (one causal attention over each row);
- unpacked+ckpt: unpacked with disable_gradient_checkpointing: false (same batches as unpacked), for
  peak RSS and step time with and without recomputation at the same batch.

Peak RSS is the peak during the training steps (Linux: the high-water mark is reset after the model
is built, so loading does not mask it), reported whole and above the RSS before the first step.
Each contender times `steps` of its own epoch's batches taken at evenly spaced positions of its plan after
one warm-up batch; useful tokens = real input positions (attention_mask.sum(), never padding), so packed
and unpacked runs are compared on the same work done. Ratios are taken per round, then the median.

`.venv/bin/python -m bench.packing [--quick] [--workdir DIR]` (not part of `make bench`'s default set: it
runs on its own, about 5-10 minutes on 2 cores); results in bench/results/packing.json.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, workload

CONTENDERS = {
    "unpacked": [],
    "neat": ["packing=true", "neat_packing=true"],
    "plain": ["packing=true", "neat_packing=false"],
    "unpacked+ckpt": ["disable_gradient_checkpointing=false"],
}


def child(name: str, recipe: str, steps: int) -> dict[str, Any]:
    """One contender in this process: a warm-up batch, then `steps` timed optimizer steps."""
    from bench.contenders import Ours

    ours = Ours(recipe, CONTENDERS[name])
    n = len(ours.loader)
    at = sorted({int(i) for i in np.linspace(0, n - 1, steps + 1)})
    batches = [ours.sft_batch(k) for k in at]
    step = ours.trainer(batches)
    baseline = _status_mb("VmRSS")
    _reset_peak_rss()  # the training steps' own peak, not model loading's
    step()  # warm-up
    times = []
    for _ in batches[1:]:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    steps_peak = _status_mb("VmHWM")
    useful = sum(int(b["attention_mask"].sum()) for b in batches[1:])
    computed = sum(int(b["input_ids"].numel()) for b in batches[1:])
    return {"contender": name, "rows_per_epoch": ours.loader.num_examples, "batches_per_epoch": n,
            "useful_tokens": useful, "computed_tokens": computed, "seconds": sum(times),
            "step_seconds": [round(x, 3) for x in times], "tokens_per_s": useful / sum(times),
            "gradient_checkpointing": bool(getattr(ours.engine.module, "gradient_checkpointing", False)),
            "loss": ours.last_loss, "rss_before_steps_mb": baseline, "steps_peak_rss_mb": steps_peak,
            "steps_extra_rss_mb": steps_peak - baseline, "peak_rss_mb": common.peak_rss_mb()}


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    raise KeyError(field)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.packing")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke test)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--n-layers", type=int, default=4)
    args = p.parse_args(argv)
    started_load = common.loadavg()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-packing-"))
    rows, batch, cutoff, steps = (300, 4, 256, 2) if args.quick else (3000, 8, 512, 3)
    workload.write_dataset(workdir / "data", workload.alpaca_rows(rows, seed=0))
    model = workload.save_gpt2_small_widths(workdir / f"model-{args.n_layers}l", args.n_layers)
    keys = workload.sft_recipe_keys(workdir, model=str(model), cutoff_len=cutoff, batch_size=batch,
                                    val_size=max(0.005, 2 * batch / rows))
    recipe = workload.write_recipe(workdir / "sft.yaml", keys)
    from pipeline.data.build import build
    from pipeline.recipe.args import data_args

    build(data_args(workload.resolve_recipe(recipe)))
    log = workdir / "packing.log"
    results = common.rounds(
        {name: (lambda k, name=name: common.run_child("bench.packing:child", {"name": name, "recipe": str(recipe),
                                                                              "steps": steps}, timeout=1800,
                                                      log_file=log))
         for name in CONTENDERS},
        min_rounds=1, max_rounds=1 if args.quick else args.rounds, budget_s=1500)

    def ratio(a: str, b: str, key: str) -> float:
        return common.median(x[key] / y[key] for x, y in zip(results[a], results[b]))

    summary = {
        "neat_vs_unpacked_tokens_per_s": ratio("neat", "unpacked", "tokens_per_s"),
        "plain_vs_unpacked_tokens_per_s": ratio("plain", "unpacked", "tokens_per_s"),
        "neat_vs_plain_tokens_per_s": ratio("neat", "plain", "tokens_per_s"),
        "ckpt_vs_plain_peak_rss": ratio("unpacked+ckpt", "unpacked", "steps_peak_rss_mb"),
        "ckpt_vs_plain_step_extra_rss": ratio("unpacked+ckpt", "unpacked", "steps_extra_rss_mb"),
        "ckpt_vs_plain_step_time": ratio("unpacked+ckpt", "unpacked", "seconds"),
    }
    targets = [common.check(summary["neat_vs_unpacked_tokens_per_s"], ">=", 1.3,
                            "neat_packing useful tokens/s vs our unpacked run"),
               common.check(summary["ckpt_vs_plain_peak_rss"], "<=", 0.6,
                            "peak RSS with gradient checkpointing vs without (same batch)")]
    config = {"rows": rows, "batch": batch, "cutoff_len": cutoff, "timed_steps": steps, "n_layers": args.n_layers}
    path = common.save("packing", {"config": config, "results": results, "summary": summary, "targets": targets},
                       started_load)
    print(common.table(["contender", "rows/epoch", "useful tokens/s", "peak RSS in steps MB", "of which above "
                        "the pre-step RSS MB"],
                       [(n, r[0]["rows_per_epoch"], common.median(x["tokens_per_s"] for x in r),
                         common.median(x["steps_peak_rss_mb"] for x in r),
                         common.median(x["steps_extra_rss_mb"] for x in r)) for n, r in results.items()]))
    print(common.targets_table(targets))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
