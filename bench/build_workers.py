"""preprocessing_num_workers: `build` of 200k generated Alpaca rows (one 60 MB JSON Lines file, read in
blocks, plus the same rows split over 8 files) with 1 worker and with 2, each round in a fresh process; wall
seconds and CPU seconds (the build process, and its worker processes), which a loaded machine does not change.

    .venv/bin/python -m bench.build_workers [--rows N] [--rounds K]

Writes bench/results/build_workers.json (or $BENCH_RESULTS). Not part of `make bench`'s default set.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import common, workload


def child(recipe_path: str, workers: int) -> dict[str, Any]:
    from pipeline.data.build import build
    from pipeline.recipe.args import data_args

    r = workload.resolve_recipe(Path(recipe_path), command="build")
    r = r.replace(preprocessing_num_workers=workers)
    t0, c0 = time.perf_counter(), time.process_time()
    build(data_args(r))
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds do not depend on how loaded the machine is: on an idle machine with 2 cores the wall time is
    # about max(parent CPU, (parent CPU + workers' CPU) / 2)
    return {"seconds": time.perf_counter() - t0, "cpu_parent": time.process_time() - c0,
            "cpu_workers": children.ru_utime + children.ru_stime}


def write_sources(data: Path, rows: list[dict], files: int) -> None:
    raw = data / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    per = -(-len(rows) // files)
    for k in range(files):
        with open(raw / f"part{k}.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows[k * per:(k + 1) * per])
    (data / "dataset_info.json").write_text(json.dumps({workload.NAME: {"file_name": "raw"}}), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.build_workers")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    started = common.loadavg()
    rows = workload.alpaca_rows(args.rows, seed=1)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        for layout, files in (("one file", 1), ("8 files", 8)):
            work = Path(tmp) / layout.replace(" ", "_")
            write_sources(work / "data", rows, files)
            recipe = workload.write_recipe(work / "r.yaml", {
                "model_name_or_path": "gpt2-small", "stage": "sft", "dataset": workload.NAME,
                "dataset_dir": str(work / "data"), "template": "alpaca", "val_size": 0.01, "seed": 42})

            def fresh(workers: int):
                def go(k: int) -> dict:
                    shutil.rmtree(work / "data" / "build", ignore_errors=True)
                    return common.run_child("bench.build_workers:child",
                                            {"recipe_path": str(recipe), "workers": workers}, timeout=1800)
                return go

            runs = common.rounds({"1 worker": fresh(1), "2 workers": fresh(2)}, min_rounds=args.rounds,
                                 max_rounds=args.rounds, budget_s=1e9)
            one, two = (common.median(r["seconds"] for r in runs[k]) for k in ("1 worker", "2 workers"))
            cpu = {f"{key}_{n}": common.median(r[key] for r in runs[k])
                   for key in ("cpu_parent", "cpu_workers") for n, k in (("1", "1 worker"), ("2", "2 workers"))}
            results[layout] = {"seconds_1": one, "seconds_2": two, "speedup": one / two, **cpu, "runs": runs}
    text = common.table(["sources", "1 worker s", "2 workers s", "speed-up", "CPU s: 1 worker", "CPU s: parent + workers"],
                        [(k, v["seconds_1"], v["seconds_2"], v["speedup"], v["cpu_parent_1"],
                          f"{v['cpu_parent_2']:.2f} + {v['cpu_workers_2']:.2f}") for k, v in results.items()])
    print(text)
    common.save("build_workers", {"config": {"rows": args.rows, "rounds": args.rounds, "cores": common.machine()["cores"]},
                                  "summary": {k: {kk: vv for kk, vv in v.items() if kk != "runs"}
                                              for k, v in results.items()},
                                  "table": text, "runs": {k: v["runs"] for k, v in results.items()}}, started)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
