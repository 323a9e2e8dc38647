"""Generation: 256 new tokens (greedy, never stopping early) at batch 1 and 8, our generate with the KV cache,
transformers' generate on the same weights (written by our save_hf, loaded by the family's transformers class
through AutoModelForCausalLM.from_pretrained), and our generate without the cache.

On the other model shapes (Qwen3, Llama 3.2 widths, bench.workload.Shape) only the cached comparison with
transformers runs, over 32 new tokens: their 130-150k-wide output head makes every token slow
on 2 cores, and the cache speedup is a property of our generate, measured on the GPT-2 shape.

Without the cache every step re-runs the whole sequence (and the output head over every position), so
256 new tokens at batch 8 would take longer than the whole benchmark budget on this CPU. The no-cache
comparison is measured end to end over the first `short` new tokens, cached and uncached alike: since an
uncached step grows with the sequence while a cached step stays nearly constant, the speedup over 256
tokens is at least the speedup measured over `short`. The uncached time of all 256 tokens is also
estimated: uncached `generate` is timed for one step at four sequence widths spanning the 256 steps, and
the per-step times, interpolated, are summed over every step. Batch 8 prompts have different lengths (left
padding, as a batched chat would). fp32, as `generate` runs by default.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bench import common
from bench.workload import Shape

PAD = 50256


def prompts(batch: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = [32] if batch == 1 else rng.integers(20, 49, size=batch).tolist()
    return [rng.integers(0, 50000, size=int(n)).tolist() for n in lengths]


def left_padded(batch: list[list[int]]) -> tuple[Any, Any]:
    import torch

    width = max(map(len, batch))
    ids = torch.full((len(batch), width), PAD, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, p in enumerate(batch):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def uncached_estimate(model: Any, batch: list[list[int]], new: int, points: int = 4) -> dict[str, Any]:
    """Seconds of `new` uncached steps, from the measured time per step at `points` widths (each: the batch's
    prompts extended by the same filler to that width, then one uncached step of our generate)."""
    from pipeline.model.generate import generate

    start = max(map(len, batch))
    widths = np.linspace(start, start + new - 2, points).round().astype(int)
    per_step = []
    for w in widths:
        filler = list(range(1000, 1000 + int(w) - start))
        seconds, _ = timed(lambda: generate(model, [p + filler for p in batch], max_new_tokens=1, eos_id=None,
                                            use_cache=False))
        per_step.append(seconds)
    total = float(np.interp(np.arange(start, start + new), widths, per_step).sum())
    return {"seconds": total, "widths": widths.tolist(), "per_step_seconds": per_step}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def result_name(shape: Shape) -> str:
    """'generation' for the GPT-2 shape (the original benchmark), 'generation-<preset>' for the others."""
    return "generation" if shape.family == "gpt2" else f"generation-{shape.preset}"


def run(workdir: Path, *, quick: bool, budget_s: float, log_file: Path, shape: Shape) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.model.generate import generate
    from pipeline.model.weights import load_model, save_hf

    started = common.loadavg()
    full = shape.family == "gpt2"  # the no-cache and one-thread measurements: GPT-2 shape only
    new, short = (32, 8) if quick else (256, 32) if full else (32, 0)
    ours = load_model(shape.save(workdir / f"model-{shape.slug}")).eval()  # fp32, as generate runs by default
    hf_dir = workdir / f"hf-{shape.slug}"
    if not (hf_dir / "config.json").exists():
        save_hf(ours, hf_dir)
    theirs = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()

    def ours_run(batch: list[list[int]], tokens: int, cache: bool) -> Callable[[int], dict]:
        def go(k: int) -> dict:
            seconds, out = timed(lambda: generate(ours, batch, max_new_tokens=tokens, eos_id=None, use_cache=cache))
            assert all(len(o) == tokens for o in out)
            return {"seconds": seconds, "first": out[0][:16]}
        return go

    def hf_run(batch: list[list[int]], tokens: int) -> Callable[[int], dict]:
        ids, mask = left_padded(batch)

        def go(k: int) -> dict:
            with torch.inference_mode():
                seconds, out = timed(lambda: theirs.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=tokens, min_new_tokens=tokens,
                    do_sample=False, pad_token_id=PAD))
            return {"seconds": seconds, "first": out[0, ids.shape[1]:ids.shape[1] + 16].tolist()}
        return go

    def one_thread(run: Callable[[int], dict]) -> Callable[[int], dict]:
        """The same run with torch on one thread: on a shared machine every parallel op of a decoding step
        waits for a second core, and a step is hundreds of small ops."""
        def go(k: int) -> dict:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return run(k)
            finally:
                torch.set_num_threads(threads)
        return go

    contenders: dict[str, Callable[[int], dict]] = {}
    for b in (1, 8):
        batch = prompts(b)
        contenders[f"ours cache b{b}"] = ours_run(batch, new, True)
        contenders[f"transformers b{b}"] = hf_run(batch, new)
        if full:
            contenders[f"ours cache b{b} short"] = ours_run(batch, short, True)
            contenders[f"ours no-cache b{b} short"] = ours_run(batch, short, False)
    if full:
        contenders["ours cache b1, 1 thread"] = one_thread(ours_run(prompts(1), new, True))
        contenders["transformers b1, 1 thread"] = one_thread(hf_run(prompts(1), new))
    with torch.inference_mode():  # warm-up: first calls allocate and pick kernels
        generate(ours, prompts(8), max_new_tokens=4, eos_id=None)
        ids, mask = left_padded(prompts(8))
        theirs.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    print(f"generation: {new} new tokens, {shape.describe()}, fp32"
          + (f"; no-cache over {short} tokens" if full else ""))
    results = common.rounds(contenders, min_rounds=1, max_rounds=1 if quick else 3, budget_s=budget_s)
    med = {name: common.median(r["seconds"] for r in runs) for name, runs in results.items()}
    estimates = {b: uncached_estimate(ours, prompts(b), new) for b in (1, 8)} if full else {}
    summary: dict[str, Any] = {}
    rows = []
    for b in (1, 8):
        cache, hf = med[f"ours cache b{b}"], med[f"transformers b{b}"]
        same = results[f"ours cache b{b}"][0]["first"] == results[f"transformers b{b}"][0]["first"]
        summary[f"b{b}"] = {"ours_cache_tokens_per_s": b * new / cache, "transformers_tokens_per_s": b * new / hf,
                            "vs_transformers": hf / cache, "same_first_tokens_as_transformers": same}
        row: tuple = (b, b * new / cache, b * new / hf, hf / cache)
        if full:
            speedup = med[f"ours no-cache b{b} short"] / med[f"ours cache b{b} short"]
            estimated = estimates[b]["seconds"] / cache
            summary[f"b{b}"].update({"cache_speedup_lower_bound": speedup,
                                     "no_cache_short_tokens_per_s": b * short / med[f"ours no-cache b{b} short"],
                                     "no_cache_estimated_seconds": estimates[b]["seconds"],
                                     "cache_speedup_estimated": estimated})
            row += (b * short / med[f"ours no-cache b{b} short"], f"{speedup:.1f}x", f"{estimated:.1f}x")
        rows.append(row + ("yes" if same else "no",))
    headers = ["batch", "ours+cache tok/s", "transformers tok/s", "ours vs transformers"]
    if full:
        headers += [f"ours no-cache tok/s ({short} new)", f"cache speedup, {short} new (measured)",
                    f"cache speedup, {new} new (estimated)"]
    text = common.table(headers + ["same tokens"], rows)
    if full:
        one = {"ours_cache_tokens_per_s": new / med["ours cache b1, 1 thread"],
               "transformers_tokens_per_s": new / med["transformers b1, 1 thread"]}
        summary["b1_one_thread"] = one
        text += (f"\n\nThe same batch-1 runs with torch on 1 thread instead of {torch.get_num_threads()}: ours+cache "
                 f"{one['ours_cache_tokens_per_s']:.1f} tok/s, transformers {one['transformers_tokens_per_s']:.1f} "
                 "tok/s.")
    print(text)
    on = "" if full else f" ({shape.preset} shape)"
    targets = []
    for b in (1, 8):
        s = summary[f"b{b}"]
        if full:
            targets.append(common.check(s["cache_speedup_estimated"], ">=", 5.0,
                                        f"KV cache vs no cache, batch {b}, {new} new (estimated)"))
        targets.append(common.check(s["vs_transformers"], ">=", 1.0, f"generation vs transformers, batch {b}{on}"))
    payload = {"config": {"model": shape.describe(), "new_tokens": new,
                          **({"no_cache_new_tokens": short} if full else {}), "precision": "fp32",
                          "decoding": "greedy, no early stop"},
               "summary": summary, "targets": targets, "table": text, "median_seconds": med,
               "uncached_estimates": {f"b{b}": e for b, e in estimates.items()},
               "runs": {n: [r["seconds"] for r in runs] for n, runs in results.items()}}
    common.save(result_name(shape), payload, started)
    return payload
