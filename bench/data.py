"""Data stage throughput on 200k generated Alpaca rows, through pipeline.data's real functions:
build (raw JSONL -> cleaned, split train/val JSON + manifest) + validate (check_built: schema and rules on
every row), in rows/s; tokenization of the train split (tokenized_split: read, template, tiktoken BPE,
loss masks, length policy), in tokens/s. Each round runs in a fresh process, so no cache helps.
"""
from __future__ import annotations

from pipeline.recipe.args import data_args
import shutil
import time
from pathlib import Path
from typing import Any

from bench import common, workload


def recipe(workdir: Path) -> Path:
    return workload.write_recipe(workdir / "data.yaml", {
        "model_name_or_path": "gpt2-small", "stage": "sft", "dataset": workload.NAME,
        "dataset_dir": str(workdir / "data"), "template": "alpaca", "cutoff_len": 1024, "val_size": 0.01,
        "output_dir": str(workdir / "saves"), "seed": 42})


def child(recipe_path: str, profile: bool = False) -> dict[str, Any]:
    from pipeline.data.build import build
    from pipeline.data.check import check_built
    from pipeline.data.tokenize import tokenized_split

    r = workload.resolve_recipe(Path(recipe_path), command="build")
    if profile:
        from bench.profiling import profile_python

        return {"build": profile_python(lambda: build(data_args(r))), "validate": profile_python(lambda: check_built(data_args(r))),
                "tokenize": profile_python(lambda: tokenized_split(data_args(r), "train"))}
    t0 = time.perf_counter()
    build(data_args(r))
    t1 = time.perf_counter()
    summary = check_built(data_args(r)).summary
    t2 = time.perf_counter()
    split = tokenized_split(data_args(r), "train")
    t3 = time.perf_counter()
    rows = sum(s["rows"] for s in summary)
    return {"rows": rows, "build_seconds": t1 - t0, "validate_seconds": t2 - t1, "tokenize_seconds": t3 - t2,
            "rows_per_s": rows / (t2 - t0), "tokens": int(len(split.ids)), "tokens_per_s": len(split.ids) / (t3 - t2),
            "examples": len(split), "seconds": t3 - t0}


def run(workdir: Path, *, quick: bool, budget_s: float, log_file: Path) -> dict[str, Any]:
    n = 20_000 if quick else 200_000
    started = common.loadavg()
    workload.write_dataset(workdir / "data", workload.alpaca_rows(n, seed=1))
    path = recipe(workdir)

    def fresh(k: int) -> dict:
        shutil.rmtree(workdir / "data" / "build", ignore_errors=True)
        return common.run_child("bench.data:child", {"recipe_path": str(path)}, timeout=1800, log_file=log_file)

    print(f"data: {n:,} generated Alpaca rows")
    runs = common.rounds({"ours": fresh}, min_rounds=1, max_rounds=1 if quick else 2, budget_s=budget_s)["ours"]
    keys = ("rows_per_s", "tokens_per_s", "build_seconds", "validate_seconds", "tokenize_seconds")
    summary = {k: common.median(r[k] for r in runs) for k in keys}
    summary.update(rows=runs[0]["rows"], tokens=runs[0]["tokens"], rounds=len(runs))
    targets = [common.check(summary["rows_per_s"], ">=", 100_000, "build + validate rows/s"),
               common.check(summary["tokens_per_s"], ">=", 1_000_000, "tokenize tokens/s")]
    text = common.table(["rows", "build s", "validate s", "build+validate rows/s", "tokens", "tokenize s",
                         "tokens/s", "rounds"],
                        [(f"{summary['rows']:,}", summary["build_seconds"], summary["validate_seconds"],
                          summary["rows_per_s"], f"{summary['tokens']:,}", summary["tokenize_seconds"],
                          summary["tokens_per_s"], len(runs))])
    print(text)
    profile = None
    if not all(t["met"] for t in targets):  # where does the time go (a smaller set, cProfile slows everything)
        workload.write_dataset(workdir / "profile" / "data", workload.alpaca_rows(min(n, 20_000), seed=1))
        shutil.rmtree(workdir / "profile" / "data" / "build", ignore_errors=True)
        profile = common.run_child("bench.data:child", {"recipe_path": str(recipe(workdir / "profile")),
                                                        "profile": True}, timeout=1800, log_file=log_file)
        profile.pop("peak_rss_mb", None)
    payload = {"config": {"rows": n, "generator": "bench.workload.alpaca_rows(seed=1)", "template": "alpaca"},
               "summary": summary, "targets": targets, "table": text, "profile": profile, "runs": runs}
    common.save("data", payload, started)
    return payload
