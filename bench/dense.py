"""Dense step: tokens/s of one fully packed LoRA batch (no padding, every position labelled), all three
contenders, and our achieved FLOP/s against this machine's bf16 matmul peak measured in the same run.

Nothing here can be saved by skipping padding or masked positions, so this isolates the raw speed of the
forward + backward + optimizer step. FLOPs are counted by `contenders.lora_step_flops` (formula there).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.contenders import Book, HF, Ours, lora_step_flops
from bench.workload import Shape

CONTENDERS = ("ours", "hf", "book")


def matmul_peak(n: int = 4096, repeats: int = 3, fp32: bool = False) -> dict[str, float]:
    """Best-of-`repeats` FLOP/s of an n x n x n torch.matmul in bf16 (and fp32) on this CPU."""
    import torch

    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))[:2 if fp32 else 1]:
        best = _best_matmul_seconds(torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype), repeats)
        out[f"{name}_flops"] = 2 * n**3 / best
    return out


def _best_matmul_seconds(a, b, repeats: int) -> float:
    """Fastest of `repeats` timed a @ b, after one untimed warm-up."""
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return best


def step_matmuls(n_layers: int, tokens: int, d: int = 768, vocab: int = 50257) -> list[tuple[int, int, int]]:
    """(m, k, n) of the base model's matmuls in one LoRA step: forward and input-gradient of every Linear."""
    per_layer = [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    shapes = [(tokens, i, o) for i, o in per_layer] * n_layers + [(tokens, d, vocab)]
    return shapes + [(m, n, k) for m, k, n in shapes]


def matmul_ceiling(n_layers: int, tokens: int, repeats: int = 2) -> float:
    """FLOP/s of the step's own base matmul shapes run alone in bf16 (best of `repeats`): what the step could
    reach if everything but these matmuls were free."""
    import torch

    flops, seconds = 0.0, 0.0
    for m, k, n in step_matmuls(n_layers, tokens):
        a, b = torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)
        flops, seconds = flops + 2 * m * k * n, seconds + _best_matmul_seconds(a, b, repeats)
    return flops / seconds


def child(contender: str, n_layers: int, batch: int, seq: int, steps: int, recipe: str,
          profile: bool = False) -> dict[str, Any]:
    tokens = np.random.default_rng(0).integers(0, 50257, size=(batch, seq + 1), dtype=np.int64)
    machine: dict[str, Any] = {}
    if contender == "ours":  # this machine's ceilings, measured next to our steps (the load drifts)
        machine = {"peak": [matmul_peak(4096, 2)["bf16_flops"]], "ceiling": []}
        ours = Ours(recipe, [])
        step = ours.trainer([Ours.dense_batch(tokens)] * (steps + 2))
    else:
        model: Any = HF(Shape("gpt2-small", n_layers)) if contender == "hf" else Book(n_layers)
        data = (HF if contender == "hf" else Book).dense_batch(tokens)

        def step() -> None:
            model.step(data)
    step()  # warm-up
    times = []
    cpu0 = time.process_time()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu0) / steps
    seconds = common.median(times)
    if machine:
        machine["peak"].append(matmul_peak(4096, 2)["bf16_flops"])
        machine["ceiling"].append(matmul_ceiling(n_layers, batch * seq))
    result = {"contender": contender, "tokens": batch * seq, "step_seconds": [round(x, 4) for x in times],
              "seconds": seconds, "tokens_per_s": batch * seq / seconds, "cpu_seconds": cpu,
              "tokens_per_cpu_s": batch * seq / cpu, **({"bf16_peak_flops": max(machine["peak"]),
                                                           "shape_ceiling_flops": max(machine["ceiling"])}
                                                          if machine else {})}
    if profile:
        from bench.profiling import profile_step

        result["profile"] = profile_step(step)
    return result


def run(workdir: Path, *, quick: bool, budget_s: float, log_file: Path, recipe: str, n_layers: int) -> dict[str, Any]:
    """`recipe` is the sft benchmark's (ours needs a recipe; its data is not used here)."""
    batch, seq, steps = (4, 64, 1) if quick else (8, 128, 2)
    started = common.loadavg()
    peaks = [matmul_peak(2048 if quick else 4096, fp32=True)]
    args = {"n_layers": n_layers, "batch": batch, "seq": seq, "steps": steps, "recipe": recipe}

    def contender(name: str):
        return lambda k: common.run_child("bench.dense:child", {**args, "contender": name,
                                                                 "profile": name == "ours" and k == 0},
                                          timeout=1800, log_file=log_file)

    print(f"dense: packed batch {batch} x {seq}, gpt2-small widths, {n_layers} layers, LoRA r=16, bf16")
    results = common.rounds({n: contender(n) for n in CONTENDERS}, min_rounds=1 if quick else 2,
                            max_rounds=1 if quick else 3, budget_s=budget_s)
    peaks.append(matmul_peak(2048 if quick else 4096, fp32=True))
    peak = max([p["bf16_flops"] for p in peaks] + [r["bf16_peak_flops"] for r in results["ours"]])
    flops = lora_step_flops(n_layers, batch, seq)
    ours_share = common.median(flops["total"] / r["seconds"] / r["bf16_peak_flops"] for r in results["ours"])
    ceiling = common.median(r["shape_ceiling_flops"] / r["bf16_peak_flops"] for r in results["ours"])
    summary = {n: {"tokens_per_s": common.median(r["tokens_per_s"] for r in runs),
                   "tokens_per_cpu_s": common.median(r["tokens_per_cpu_s"] for r in runs),
                   "step_seconds": common.median(r["seconds"] for r in runs), "rounds": len(runs)}
               for n, runs in results.items()}
    for s in summary.values():
        s["flops_per_s"] = flops["total"] / s["step_seconds"]
        s["share_of_peak"] = s["flops_per_s"] / peak
    ours, hf, book = summary["ours"], summary["hf"], summary["book"]
    ratios = {"tokens_per_s_vs_hf": ours["tokens_per_s"] / hf["tokens_per_s"],
              "tokens_per_cpu_s_vs_hf": ours["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"],
              "tokens_per_s_vs_book": ours["tokens_per_s"] / book["tokens_per_s"],
              "share_of_bf16_peak": ours_share, "shape_ceiling_share_of_peak": ceiling}
    targets = [common.check(ratios["tokens_per_s_vs_hf"], ">=", 1.2, "dense step tokens/s vs transformers+PEFT"),
               common.check(ratios["share_of_bf16_peak"], ">=", 0.6, "dense step FLOP/s / measured bf16 peak")]
    rows = [(n, s["tokens_per_s"], s["tokens_per_s"] / hf["tokens_per_s"],
             s["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"], s["flops_per_s"] / 1e9,
             f"{s['share_of_peak']:.0%}", s["rounds"]) for n, s in summary.items()]
    text = common.table(["contender", "tokens/s", "vs hf", "vs hf (CPU time)", "GFLOP/s", "of run-wide peak", "rounds"],
                        rows)
    text += (f"\n\nbf16 matmul peak (best 4096^3 torch.matmul, run-wide max): {peak / 1e9:,.0f} GFLOP/s; fp32: "
             f"{max(p['fp32_flops'] for p in peaks) / 1e9:,.0f} GFLOP/s; one step = {flops['total'] / 1e9:,.0f} GFLOP. "
             f"Ours against the peak measured in its own process just before and after its steps: "
             f"{ours_share:.0%}; the step's own base matmul shapes run alone reach {ceiling:.0%} of that peak.")
    print(text)
    payload = {"config": {"model": f"gpt2-small widths, {n_layers} layers", "batch": batch, "seq": seq,
                          "timed_steps": steps, "lora": "r=16, alpha 32, attention + MLP", "precision": "bf16",
                          "flop_formula": lora_step_flops.__doc__.strip()},
               "matmul_peaks": peaks, "bf16_peak_flops": peak, "step_flops": flops, "summary": summary,
               "ratios": ratios, "targets": targets, "table": text,
               "profile_ours": next((r["profile"] for r in results["ours"] if r.get("profile")), None),
               "runs": {n: [{k: v for k, v in r.items() if k != "profile"} for r in runs]
                        for n, runs in results.items()}}
    common.save("dense", payload, started)
    return payload
