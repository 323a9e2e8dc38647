"""Packing and gradient checkpointing, side by side: useful tokens/s and peak RSS of LoRA sft.

`packing` (one table per dataset: the Alpaca-like workload, and rows with the length distribution of the
book's 1,100 instructions, bench.workload.BOOK), contenders on gpt2-small widths with `n_layers` blocks,
bf16, LoRA r16 on every block Linear, the same tokenized examples:

- ours unpacked: one example per row, group_by_length (our default loader), batch 8;
- ours neat: our `neat_packing` (rows of cutoff_len, block-diagonal attention, restarting positions);
- hf padded: transformers + PEFT as LLaMA-Factory runs it by default (random order, each batch of 8 padded
  to its longest example; bench.contenders.HF);
- hf neat: transformers + PEFT with LLaMA-Factory's own neat_packing, rewritten here
  (`contenders.greedy_knapsack` + `HF.neat_packed_batch`: rows of cutoff_len + 1, position_ids restarting,
  a (B, 1, T, T) float mask built from per-token example numbers, as its SFTDataCollatorWith4DAttentionMask
  does on every path but FlashAttention-2, which a CPU has not).

Where torch finds a GPU, every contender trains on it (ours through DeepSpeed's CUDA accelerator, HF moved
there and autocast on CUDA) and the CPU attention-kernel table is left out: `bench/gpu_check.py --only peers`
runs this benchmark on a lent GPU with the CPU run's shapes, so the two machines compare.

Packed contenders take `PACKED_BATCH` rows of cutoff_len per step (about the tokens of the unpacked batch
of 8 Alpaca-like examples), the unpacked ones 8 examples. Unpacked contenders time batches at evenly spaced
quantiles of padded size (bench.sft.pick_batches), packed ones rows at evenly spaced places of their epoch;
one warm-up batch first. Useful tokens are real input positions (an example of n tokens feeds n - 1), never
padding, so packed and unpacked runs are compared on the same work done. Ratios are taken per round, then
the median.

`checkpointing`: our neat-packed run with and without `disable_gradient_checkpointing: false` at the same
batch (`CKPT_BATCH` full rows of cutoff_len) on gpt2-small's real 12 blocks, where activations rather than
the weights and the output head dominate the memory. Peak RSS is the peak during the training steps
(Linux: the high-water mark is reset after the model is built), reported whole and above the RSS before
the first step, with the step time.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench import common, workload
from bench.workload import Shape

NEAT = ["packing=true", "neat_packing=true"]
CKPT = ["disable_gradient_checkpointing=false"]
BATCH, PACKED_BATCH, CKPT_BATCH, CUTOFF = 8, 2, 4, 512
DATASETS: dict[str, Callable[[bool], list[dict[str, str]]]] = {
    "alpaca-like": lambda quick: workload.alpaca_rows(300 if quick else 900, seed=0),
    "book-like": lambda quick: workload.book_rows(300 if quick else 1100, seed=0),
}


def child(contender: str, recipe: str, steps: int, overrides: list[str], preset: str = "gpt2-small",
          n_layers: int = 4, examples: str | None = None, rows: list[list[list[int]]] | None = None,
          cutoff_len: int = CUTOFF, profile: bool = False) -> dict[str, Any]:
    """One packed contender in this process: a warm-up batch, then `steps` timed optimizer steps (and one
    more under torch.profiler with `profile`).

    ours: our Trainer step with `overrides` on our loader's batches at evenly spaced places of its plan;
    hf: transformers + PEFT on `rows` (a warm-up batch then timed batches, each a list of knapsacks)."""
    if contender == "hf":
        from bench.contenders import HF, Examples

        ex = Examples.load(str(examples))
        model = HF(Shape(preset, n_layers))
        batches = [HF.neat_packed_batch(ex, batch, cutoff_len) for batch in rows or []]
        batches += batches[1:2] if profile else []
        last = {"loss": float("nan")}
        queue = iter(batches)

        def step() -> None:
            last["loss"] = model.step(next(queue))

        useful = sum(ex.length(i) - 1 for batch in (rows or [])[1:] for row in batch for i in row)
        computed = sum(int(b["input_ids"].numel()) for b in batches[1:])
        loss: Callable[[], float] = lambda: last["loss"]  # noqa: E731
        checkpointing, rows_per_epoch = False, None
    else:
        from bench.contenders import Ours

        ours = Ours(recipe, overrides)
        n = len(ours.loader)
        at = sorted({int(i) for i in np.linspace(0, n - 1, steps + 1)})
        built = [ours.sft_batch(k) for k in at]
        step = ours.trainer(built + built[1:2] if profile else built)
        useful = sum(int(b["attention_mask"].sum()) for b in built[1:])
        computed = sum(int(b["input_ids"].numel()) for b in built[1:])
        loss = lambda: ours.last_loss  # noqa: E731
        checkpointing = bool(getattr(ours.engine.module, "gradient_checkpointing", False))
        rows_per_epoch = ours.loader.num_examples
    baseline = _status_mb("VmRSS")
    _reset_peak_rss()  # the training steps' own peak, not model loading's
    step()  # warm-up
    times, cpu0 = [], time.process_time()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0  # CPU time of all threads: less at the mercy of other processes than wall time
    steps_peak = _status_mb("VmHWM")
    extra: dict[str, Any] = {}
    if profile:
        from bench.profiling import profile_step

        extra["profile"] = profile_step(step)
    return {**extra, "contender": contender, "rows_per_epoch": rows_per_epoch, "useful_tokens": useful,
            "computed_tokens": computed, "seconds": sum(times), "step_seconds": [round(x, 3) for x in times],
            "tokens_per_s": useful / sum(times), "cpu_seconds": cpu, "tokens_per_cpu_s": useful / cpu,
            "gradient_checkpointing": checkpointing, "loss": loss(),
            "rss_before_steps_mb": baseline, "steps_peak_rss_mb": steps_peak,
            "steps_extra_rss_mb": round(steps_peak - baseline, 1), "peak_rss_mb": common.peak_rss_mb()}


KERNEL_LENGTHS = (64, 128, 256, 512, 1024, 2048)


def attention_child(lengths: list[int], repeats: int, tokens: int = 1024) -> dict[str, Any]:
    """Causal self-attention forward + backward per call, our explicit-matmul kernel against torch's SDPA
    (what runs on CPU otherwise), bf16, gpt2-small's 12 heads of 64, `tokens // L` sequences of L per call
    (a packing bucket or an unpacked batch); the two alternate, median wall and CPU seconds of `repeats`."""
    import torch
    import torch.nn.functional as F

    from pipeline.model.causal_attention import DENSE_MAX_LEN, causal_attention

    kernels = {"ours": causal_attention,
               "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)}
    out = []
    for length in lengths:
        shape = (max(1, tokens // length), 12, length, 64)
        q, k, v = (torch.randn(*shape, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        grad = torch.randn(*shape, dtype=torch.bfloat16)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in kernels}
        for r in range(repeats + 1):  # the first round warms up
            for name, kernel in kernels.items():
                t, c = time.perf_counter(), time.process_time()
                kernel(q, k, v).backward(grad)
                if r:
                    times[name].append((time.perf_counter() - t, time.process_time() - c))
        row: dict[str, Any] = {"length": length, "sequences": shape[0]}
        for name, runs in times.items():
            row[f"{name}_ms"] = 1000 * common.median(w for w, _ in runs)
            row[f"{name}_cpu_ms"] = 1000 * common.median(c for _, c in runs)
        out.append(row)
    return {"rows": out, "threads": torch.get_num_threads(), "max_len": DENSE_MAX_LEN}


def attention_text(rows: list[dict[str, Any]]) -> str:
    return common.table(["length", "sequences", "ours ms", "SDPA ms", "SDPA / ours", "CPU: SDPA / ours"],
                        [(r["length"], r["sequences"], r["ours_ms"], r["sdpa_ms"], r["sdpa_ms"] / r["ours_ms"],
                          r["sdpa_cpu_ms"] / r["ours_cpu_ms"]) for r in rows])


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


def hf_neat_rows(examples: Any, cutoff_len: int, rows_per_batch: int, steps: int, seed: int) -> list[list[list[int]]]:
    """LLaMA-Factory's packed epoch (greedy knapsacks, shuffled by the Trainer's sampler), cut into batches;
    a warm-up batch and `steps` batches at evenly spaced places."""
    from bench.contenders import greedy_knapsack

    packs = greedy_knapsack({i: examples.length(i) for i in range(len(examples))}, cutoff_len)
    order = np.random.default_rng(seed).permutation(len(packs))
    batches = [[packs[j] for j in order[k:k + rows_per_batch]]
               for k in range(0, len(order) - rows_per_batch + 1, rows_per_batch)]
    return [batches[int(i)] for i in np.linspace(0, len(batches) - 1, steps + 1).round()]  # the first: warm-up


def median_ratio(results: dict[str, list[dict]], a: str, b: str, key: str) -> float:
    return common.median(x[key] / y[key] for x, y in zip(results[a], results[b]))


def dataset_text(dataset: str, info: dict[str, Any]) -> str:
    """One dataset's line of ratios and its table (from packing.json's `datasets` entry)."""
    results, summary = info["results"], info["summary"]
    table = common.table(
        ["contender", "useful tokens/s", "vs ours neat", "padding computed", "rounds"],
        [(who, common.median(r["tokens_per_s"] for r in runs), median_ratio(results, who, "ours neat", "tokens_per_s"),
          f"{1 - runs[0]['useful_tokens'] / runs[0]['computed_tokens']:.0%}", len(runs))
         for who, runs in results.items()])
    return (f"**{dataset}** ({info['rows']} rows; example tokens p50/p90/max "
            f"{'/'.join(str(int(x)) for x in info['example_tokens_p50_p90_max'])}): ours neat vs ours unpacked "
            f"{summary['neat_vs_unpacked']:.2f}x, vs hf padded {summary['neat_vs_hf_padded']:.2f}x, vs hf neat "
            f"{summary['neat_vs_hf_neat']:.2f}x\n\n{table}")


def run_packing(workdir: Path, *, quick: bool, budget_s: float, log_file: Path,
                shape: Shape = Shape("gpt2-small", 4)) -> dict[str, Any]:
    """Ours unpacked / ours neat / hf padded / hf neat on each dataset; results in packing.json."""
    from bench import sft

    started = common.loadavg()
    steps = 2 if quick else 6  # ~1 s a step on an idle machine: 3 steps left a round's ratio at the mercy of one batch
    cutoff = 256 if quick else CUTOFF
    per_dataset: dict[str, Any] = {}
    profile = None
    targets: list[dict] = []
    texts = []
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # the children train there too (DeepSpeed, HF alike)
    kernels = None
    if device == "cpu":  # our CPU attention kernel against SDPA; on a GPU the varlen kernel runs instead
        kernels = common.run_child("bench.packing:attention_child",
                                   {"lengths": list(KERNEL_LENGTHS[:3] if quick else KERNEL_LENGTHS),
                                    "repeats": 3 if quick else 9}, timeout=600, log_file=log_file)
        print(f"attention kernel, forward + backward, bf16, 12 heads of 64, {kernels['threads']} threads:\n"
              f"{attention_text(kernels['rows'])}")
    for d, (dataset, make_rows) in enumerate(DATASETS.items()):
        rows = make_rows(quick)
        prep = sft.prepare(workdir / dataset, shape=shape, n_rows=len(rows), cutoff_len=cutoff, batch_size=BATCH,
                           rows=rows)
        from bench.contenders import Examples

        ex = Examples.load(prep["examples"])
        epoch = sft.plans(prep["loader"], prep["n_train"], prep["lengths"], BATCH, seed=42)
        picked = {who: sft.pick_batches(epoch[who], prep["lengths"], steps) for who in ("ours", "hf")}
        hf_rows = hf_neat_rows(ex, cutoff, PACKED_BATCH, steps, seed=42)
        base = {"recipe": prep["recipe"], "preset": shape.preset, "n_layers": shape.n_layers,
                "examples": prep["examples"], "cutoff_len": cutoff}

        def unpacked(who: str) -> Callable[[int], dict]:
            warm, timed = picked[who]
            batches = [[int(i) for i in b] for b in [warm, *timed]]
            return lambda k: common.run_child("bench.sft:child", {**base, "contender": who, "batches": batches},
                                              timeout=1800, log_file=log_file)

        def packed(who: str) -> Callable[[int], dict]:
            args = {**base, "contender": who, "steps": steps,
                    "overrides": NEAT + [f"per_device_train_batch_size={PACKED_BATCH}"],
                    "rows": hf_rows if who == "hf" else None}
            return lambda k: common.run_child("bench.packing:child",
                                              {**args, "profile": who == "ours" and k == 0 and d == 0},
                                              timeout=1800, log_file=log_file)

        print(f"packing, {dataset} rows ({len(rows)}): {shape.describe()}; cutoff_len {cutoff}; unpacked batch "
              f"{BATCH}, packed batch {PACKED_BATCH} rows")
        results = common.rounds({"ours unpacked": unpacked("ours"), "ours neat": packed("ours"),
                                 "hf padded": unpacked("hf"), "hf neat": packed("hf")},
                                min_rounds=1 if quick else 2, max_rounds=1 if quick else 3,
                                budget_s=budget_s / len(DATASETS))
        summary = {"neat_vs_unpacked": median_ratio(results, "ours neat", "ours unpacked", "tokens_per_s"),
                   "neat_vs_hf_padded": median_ratio(results, "ours neat", "hf padded", "tokens_per_s"),
                   "neat_vs_hf_neat": median_ratio(results, "ours neat", "hf neat", "tokens_per_s"),
                   "hf_neat_vs_hf_padded": median_ratio(results, "hf neat", "hf padded", "tokens_per_s")}
        lengths = prep["lengths"]
        profile = profile or next((r.pop("profile") for r in results["ours neat"] if r.get("profile")), None)
        per_dataset[dataset] = {"rows": len(rows), "examples_train": prep["n_train"],
                                "example_tokens_p50_p90_max": [float(np.percentile(lengths, 50)),
                                                               float(np.percentile(lengths, 90)), int(lengths.max())],
                                "summary": summary, "results": results}
        targets += [common.check(summary["neat_vs_unpacked"], ">=", 1.3,
                                 f"neat_packing tokens/s vs our unpacked run ({dataset})"),
                    common.check(summary["neat_vs_hf_padded"], ">=", 3.0,
                                 f"neat_packing tokens/s vs transformers+PEFT padded ({dataset})")]
        texts.append(dataset_text(dataset, per_dataset[dataset]))
        print(texts[-1])
    head = [] if kernels is None else [
        f"**attention kernel** (forward + backward per call, bf16, 12 heads of 64, about 1,024 tokens "
        f"a call, {kernels['threads']} threads; median of the rounds): ours is "
        f"pipeline/model/causal_attention.py, the path up to "
        f"{kernels['max_len']} tokens\n\n{attention_text(kernels['rows'])}"]
    text = "\n\n".join([*head, *texts])
    config = {"model": shape.describe(), "cutoff_len": cutoff, "unpacked_batch": BATCH, "packed_batch_rows": PACKED_BATCH,
              "timed_steps": steps, "precision": "bf16", "lora": "r=16, alpha 32, attention + MLP", "device": device}
    payload = {"config": config, "datasets": per_dataset, "targets": targets, "table": text,
               "profile_ours": profile, "profile_of": "one step of ours neat, alpaca-like rows",
               "attention_kernel": kernels}
    common.save("packing", payload, started)
    return payload


def run_checkpointing(workdir: Path, *, quick: bool, budget_s: float, log_file: Path) -> dict[str, Any]:
    """Our neat-packed step with and without gradient checkpointing at the same batch; checkpointing.json."""
    from bench import sft

    started = common.loadavg()
    shape = Shape("gpt2-small", 2 if quick else 12)
    steps, cutoff = (1, 256) if quick else (2, CUTOFF)
    rows = workload.alpaca_rows(300 if quick else 900, seed=0)
    prep = sft.prepare(workdir / "data", shape=shape, n_rows=len(rows), cutoff_len=cutoff, batch_size=CKPT_BATCH,
                       rows=rows, overrides={"packing": True, "neat_packing": True})
    args = {"recipe": prep["recipe"], "steps": steps, "contender": "ours"}
    print(f"checkpointing: {shape.describe()}; neat-packed batches of {CKPT_BATCH} rows of {cutoff}")
    results = common.rounds(
        {name: (lambda k, o=o: common.run_child("bench.packing:child", {**args, "overrides": o}, timeout=1800,
                                                log_file=log_file))
         for name, o in (("without", []), ("with checkpointing", CKPT))},
        min_rounds=1 if quick else 2, max_rounds=1 if quick else 3, budget_s=budget_s)
    a, b = "with checkpointing", "without"
    summary = {"peak_rss_ratio": median_ratio(results, a, b, "steps_peak_rss_mb"),
               "extra_rss_ratio": median_ratio(results, a, b, "steps_extra_rss_mb"),
               "step_time_ratio": median_ratio(results, a, b, "seconds"),
               "checkpointing_on": [r["gradient_checkpointing"] for r in results[a]]}
    targets = [common.check(summary["peak_rss_ratio"], "<=", 0.6,
                            "peak RSS with gradient checkpointing vs without (same batch)")]
    text = common.table(["run", "step s", "peak RSS in steps MB", "RSS before steps MB", "above it MB",
                         "useful tokens/s", "rounds"],
                        [(n, common.median(r["seconds"] / steps for r in runs),
                          common.median(r["steps_peak_rss_mb"] for r in runs),
                          common.median(r["rss_before_steps_mb"] for r in runs),
                          common.median(r["steps_extra_rss_mb"] for r in runs),
                          common.median(r["tokens_per_s"] for r in runs), len(runs)) for n, runs in results.items()])
    text += (f"\n\nWith / without: peak RSS in the steps {summary['peak_rss_ratio']:.2f}x, RSS added by the steps "
             f"{summary['extra_rss_ratio']:.2f}x, step time {summary['step_time_ratio']:.2f}x.")
    print(text)
    config = {"model": shape.describe(), "batch": f"{CKPT_BATCH} neat-packed rows of {cutoff}", "timed_steps": steps,
              "precision": "bf16", "lora": "r=16, alpha 32, attention + MLP"}
    payload = {"config": config, "summary": summary, "targets": targets, "table": text, "results": results}
    common.save("checkpointing", payload, started)
    return payload


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.packing", description="packing and checkpointing benchmarks")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round (a smoke test)")
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--only", default="packing,checkpointing")
    p.add_argument("--budget-s", type=float, default=600.0,
                   help="per benchmark, split over its datasets: after the minimum rounds (2; 1 with --quick), no "
                        "round starts that would not fit")
    args = p.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-packing-"))
    for name in args.only.split(","):
        globals()[f"run_{name}"](workdir / name, quick=args.quick, budget_s=args.budget_s,
                                 log_file=workdir / "packing.log")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
