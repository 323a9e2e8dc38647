"""sft throughput: useful tokens/s and peak RSS of LoRA sft, ours vs transformers+PEFT vs the book's code, on
one model shape (bench.workload.Shape: gpt2-small widths, or a Qwen3 / Llama 3.2 preset's widths with the
depth cut; the book's code is GPT-2 only, so it runs on the GPT-2 shape alone).

Each contender runs its own epoch plan over the same generated training split: ours is our sft loader
(group_by_length: sorted within mega-batches of 50 batches, batches shuffled), the peers' is a random order
(what the HF Trainer's sampler and the book's DataLoader(shuffle=True) do) with every batch padded to its
longest example, as LLaMA-Factory's default collator and the book's collate do. Timing a whole epoch is
too slow here, so each contender times `steps` batches of its plan taken at evenly spaced quantiles of
padded batch size (a systematic sample that mirrors the epoch's mix of short and long steps) after one
warm-up batch; throughput = useful tokens / seconds over them. Useful tokens are real input positions (an
example of n tokens feeds n - 1), never padding. Every contender runs in its own process per round (peak
RSS = that process's ru_maxrss after the timed steps).
"""
from __future__ import annotations

from pipeline.recipe.args import data_args
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import common, workload
from bench.contenders import Book, Examples, HF, Ours
from bench.workload import Shape


def contenders(shape: Shape) -> tuple[str, ...]:
    return ("ours", "hf", "book") if shape.family == "gpt2" else ("ours", "hf")


def result_name(shape: Shape) -> str:
    """'sft' for the GPT-2 shape (the original benchmark), 'sft-<preset>' for the others."""
    return "sft" if shape.family == "gpt2" else f"sft-{shape.preset}"


def prepare(workdir: Path, *, shape: Shape, n_rows: int, cutoff_len: int, batch_size: int,
            rows: list[dict[str, str]] | None = None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Dataset (built by our build stage; generated Alpaca-like rows unless `rows` are given), model checkpoint,
    recipe (the shape's template; `overrides` added), the shared examples and the batch pick."""
    from pipeline.data.build import build
    from pipeline.data.loaders import sft_loader
    from pipeline.data.model_tokenizer import recipe_tokenizer
    from pipeline.data.tokenize import tokenized_split

    workload.write_dataset(workdir / "data", rows if rows is not None else workload.alpaca_rows(n_rows, seed=0))
    model = shape.save(workdir.parent / f"model-{shape.slug}")
    keys = workload.sft_recipe_keys(workdir, model=str(model), cutoff_len=cutoff_len, batch_size=batch_size,
                                    val_size=max(0.005, 2 * batch_size / n_rows), template=shape.template)
    recipe = workload.write_recipe(workdir / "sft.yaml", {**keys, **(overrides or {})})
    build(data_args(workload.resolve_recipe(recipe)))
    r = workload.resolve_recipe(recipe)
    data = tokenized_split(data_args(r), "train")
    examples = workdir / "examples.npz"
    np.savez(examples, ids=data.ids, trainable=data.trainable, offsets=data.offsets,
             pad=recipe_tokenizer(data_args(r)).pad_id)
    loader = sft_loader(data_args(r), "train")
    lengths = data.example_lengths()
    return {"recipe": str(recipe), "examples": str(examples), "loader": loader, "lengths": lengths,
            "n_train": len(data)}


def padding_share(plan: list[np.ndarray], lengths: np.ndarray) -> float:
    """Share of computed positions that are padding when every batch is padded to its longest example."""
    useful = sum(int((lengths[b] - 1).sum()) for b in plan)
    computed = sum(int(lengths[b].max() - 1) * len(b) for b in plan)
    return 1 - useful / computed


def pick_batches(plan: list[np.ndarray], lengths: np.ndarray, steps: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A warm-up batch and `steps` timed batches at evenly spaced quantiles of padded size (B x longest)."""
    size = np.array([len(b) * int(lengths[b].max()) for b in plan])
    order = np.argsort(size, kind="stable")
    at = ((np.arange(steps) + 0.5) / steps * len(order)).astype(int)
    warm = next(i for i in (len(order) // 2 + 1, 0, len(order) - 1) if i not in at)
    return plan[order[warm]], [plan[order[i]] for i in at]


def plans(loader: Any, n: int, lengths: np.ndarray, batch_size: int, seed: int) -> dict[str, list[np.ndarray]]:
    """Each contender's epoch: ours = our loader's plan; the peers' = a seeded random order, same batch size."""
    from pipeline.data.loaders import plan_batches

    ours = [loader.indices(k) for k in range(len(loader))]
    peers = plan_batches(n, lengths, batch_size=batch_size, seed=seed, drop_last=True, group_by_length=False)
    return {"ours": ours, "hf": peers, "book": peers}


def child(contender: str, preset: str, n_layers: int, recipe: str, examples: str, batches: list[list[int]],
          cutoff_len: int, profile: bool = False) -> dict[str, Any]:
    """One contender in this process: warm up on batches[0], then time one optimizer step per later batch."""
    import torch

    t0 = time.perf_counter()
    ex = Examples.load(examples)
    groups = [np.array(b) for b in batches]
    if contender == "ours":
        ours = Ours(recipe, [])
        where = {tuple(ours.loader.indices(k)): k for k in range(len(ours.loader))}
        built = [ours.sft_batch(where[tuple(g)]) for g in groups]  # KeyError: not a batch of our plan
        step_fn = ours.trainer(built)
        steps = [step_fn] * len(built)
        loss = lambda: ours.last_loss  # noqa: E731
        computed = sum(int(b["input_ids"].numel()) for b in built[1:])
    else:
        model: Any = HF(Shape(preset, n_layers)) if contender == "hf" else Book(n_layers)
        if contender == "hf":
            built = [HF.sft_batch(ex, g) for g in groups]
            computed = sum(int(b["input_ids"].numel()) for b in built[1:]) - sum(len(g) for g in groups[1:])
        else:
            built = [Book.sft_batch(ex, g, cutoff_len) for g in groups]
            computed = sum(int(b[0].numel()) for b in built[1:])
        last = {"loss": float("nan")}

        def make(batch: Any):
            def step() -> None:
                last["loss"] = model.step(batch)
            return step

        steps = [make(b) for b in built]
        loss = lambda: last["loss"]  # noqa: E731
    setup = time.perf_counter() - t0
    steps[0]()  # warm-up: allocations, kernel selection
    times = []
    cpu0 = time.process_time()
    for step in steps[1:]:
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    useful = ex.useful_tokens(np.concatenate(groups[1:]))
    result = {"contender": contender, "useful_tokens": useful, "computed_tokens": computed,
              "step_seconds": [round(x, 4) for x in times], "seconds": sum(times),
              "tokens_per_s": useful / sum(times), "cpu_seconds": cpu, "tokens_per_cpu_s": useful / cpu,
              "loss": loss(), "setup_seconds": round(setup, 2),
              "peak_rss_mb": common.peak_rss_mb(), "torch_threads": torch.get_num_threads()}
    if profile:
        from bench.profiling import profile_step

        result["profile"] = profile_step(steps[1])
    return result


def run(workdir: Path, *, quick: bool, budget_s: float, log_file: Path, shape: Shape) -> dict[str, Any]:
    steps = 2 if quick else 4 if shape.family == "gpt2" else 3  # the larger shapes: 3, to fit the time budget
    batch_size, cutoff_len = 8, 512
    started = common.loadavg()
    name = result_name(shape)
    prep = prepare(workdir / name, shape=shape, n_rows=400 if quick else 900, cutoff_len=cutoff_len,
                   batch_size=batch_size)
    lengths = prep["lengths"]
    epoch = plans(prep["loader"], prep["n_train"], lengths, batch_size, seed=42)
    picked = {who: pick_batches(plan, lengths, steps) for who, plan in epoch.items()}
    base = {"preset": shape.preset, "n_layers": shape.n_layers, "recipe": prep["recipe"],
            "examples": prep["examples"], "cutoff_len": cutoff_len}

    def contender(who: str):
        def go(k: int) -> dict:
            warm, timed = picked[who]
            batches = [[int(i) for i in b] for b in [warm, *timed]]
            return common.run_child("bench.sft:child", {**base, "contender": who, "batches": batches,
                                                        "profile": who == "ours" and k == 0},
                                    timeout=1800, log_file=log_file)
        return go

    print(f"sft: {steps} timed steps (+1 warm-up) of {batch_size} examples per contender, {shape.describe()}")
    results = common.rounds({n: contender(n) for n in contenders(shape)}, min_rounds=1 if quick else 2,
                            max_rounds=1 if quick else 3, budget_s=budget_s)
    summary = {who: common.throughput_summary(runs, padding_share(epoch[who], lengths)) for who, runs in results.items()}
    ours, hf = summary["ours"], summary["hf"]
    ratios = {"tokens_per_s_vs_hf": ours["tokens_per_s"] / hf["tokens_per_s"],
              "tokens_per_cpu_s_vs_hf": ours["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"],
              "tokens_per_s_vs_hf_by_round": [o["tokens_per_s"] / h["tokens_per_s"]
                                              for o, h in zip(results["ours"], results["hf"])],
              "peak_rss_vs_hf": ours["peak_rss_mb"] / hf["peak_rss_mb"]}
    if "book" in summary:
        ratios["tokens_per_s_vs_book"] = ours["tokens_per_s"] / summary["book"]["tokens_per_s"]
        ratios["peak_rss_vs_book"] = ours["peak_rss_mb"] / summary["book"]["peak_rss_mb"]
    on = "" if shape.family == "gpt2" else f" ({shape.preset} shape)"
    targets = [common.check(ratios["tokens_per_s_vs_hf"], ">=", 2.0, f"sft useful tokens/s vs transformers+PEFT{on}"),
               common.check(ratios["peak_rss_vs_hf"], "<=", 0.7, f"sft peak RSS vs transformers+PEFT{on}")]
    rows = [(n, s["tokens_per_s"], s["tokens_per_s"] / hf["tokens_per_s"],
             s["tokens_per_cpu_s"] / hf["tokens_per_cpu_s"],
             f"{s['padding_share']:.0%} ({s['epoch_padding_share']:.0%})", s["peak_rss_mb"],
             s["peak_rss_mb"] / hf["peak_rss_mb"], s["rounds"]) for n, s in summary.items()]
    text = common.table(["contender", "useful tokens/s", "vs hf", "vs hf (CPU time)", "padding: timed (epoch)",
                         "peak RSS MB", "RSS vs hf", "rounds"], rows)
    print(text)
    profile = next((r.get("profile") for r in results["ours"] if r.get("profile")), None)
    payload = {"config": {"model": shape.describe(), "template": shape.template,
                          "lora": "r=16, alpha 32, attention + MLP", "precision": "bf16", "batch_size": batch_size,
                          "cutoff_len": cutoff_len, "timed_steps": steps,
                          "dataset_rows_train": prep["n_train"],
                          "example_tokens_p50_p90_max": [float(np.percentile(lengths, 50)),
                                                         float(np.percentile(lengths, 90)), int(lengths.max())]},
               "summary": summary, "ratios": ratios, "targets": targets, "table": text, "profile_ours": profile,
               "runs": {n: [{k: v for k, v in r.items() if k != "profile"} for r in runs]
                        for n, runs in results.items()}}
    common.save(name, payload, started)
    return payload
