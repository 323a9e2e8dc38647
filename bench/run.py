"""`python -m bench.run` (`make bench`): every benchmark side by side, results in bench/results/, figures in
bench/README.md.

    python -m bench.run                  # all: ~20 minutes on 2 cores for the GPT-2 set, ~1 h with every benchmark
    python -m bench.run --quick          # tiny sizes, one round: checks that everything runs (~30 minutes)
    python -m bench.run --only sft,dense # some of them (names: BENCHMARKS below)

Each benchmark gets a share of the time budget; it runs at least one round of all its contenders and more
rounds (up to 3, medians reported) while they fit.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import common
from bench.workload import FAMILY_LAYERS, Shape

BENCHMARKS = ("sft", "dense", "generation", "data", "startup",
              *(f"{kind}-{preset}" for kind in ("sft", "generation") for preset in FAMILY_LAYERS),
              "dpo", "packing", "checkpointing")
BUDGET_S = {"sft": 330, "dense": 220, "generation": 240, "data": 100, "startup": 80,  # generation always overruns
            **{f"sft-{p}": 300 for p in FAMILY_LAYERS}, **{f"generation-{p}": 330 for p in FAMILY_LAYERS},
            "dpo": 300, "packing": 420, "checkpointing": 240}
N_LAYERS = {False: 4, True: 2}  # gpt2-small widths; depth cut to fit the budget on 2 cores


def family_shape(name: str, quick: bool) -> Shape:
    """'sft-qwen3-0.6b' -> the qwen3-0.6b shape with its benchmark depth."""
    preset = name.split("-", 1)[1]
    return Shape(preset, FAMILY_LAYERS[preset][quick])


def ensure_no_deps_requirements() -> None:
    """llms-from-scratch declares tensorflow, jupyterlab and numpy<2.1 (which would replace the project's
    numpy); the benchmark needs only its torch code, so it is installed without its dependencies."""
    if importlib.util.find_spec("llms_from_scratch") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "-r", str(common.BENCH_DIR / "requirements-nodeps.txt")], check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, one round each; results go to the work folder, README untouched")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks to run")
    parser.add_argument("--workdir", type=Path, default=None, help="keep generated data and models here")
    parser.add_argument("--no-readme", action="store_true", help="do not rewrite bench/README.md")
    args = parser.parse_args(argv)
    wanted = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(wanted) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    ensure_no_deps_requirements()
    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="bench-")
    workdir = args.workdir or Path(tmp.name)  # type: ignore[union-attr]
    workdir.mkdir(parents=True, exist_ok=True)
    log_file = workdir / "children.log"
    if args.quick:  # a smoke run: keep the real figures
        os.environ["BENCH_RESULTS"] = str(workdir / "results")
    n_layers = N_LAYERS[args.quick]
    scale = 0.25 if args.quick else 1.0
    started = time.monotonic()
    info = common.machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['versions']['torch']}, "
          f"load {common.loadavg()}; work in {workdir} (child output: {log_file})")
    try:
        sft_recipe = None
        from bench import sft

        from bench.workload import Shape

        gpt2 = Shape("gpt2-small", n_layers)
        if {"sft", "dense", "startup"} & set(wanted):
            prep = sft.prepare(workdir / "sft", shape=gpt2, n_rows=400 if args.quick else 900,
                               cutoff_len=512, batch_size=8)
            sft_recipe = prep["recipe"]
        for name in wanted:
            t = time.monotonic()
            print(f"\n== {name} ==")
            budget = BUDGET_S[name] * scale
            if name == "sft":
                sft.run(workdir, quick=args.quick, budget_s=budget, log_file=log_file, shape=gpt2)
            elif name.startswith("sft-"):
                sft.run(workdir, quick=args.quick, budget_s=budget, log_file=log_file,
                        shape=family_shape(name, args.quick))
            elif name.startswith("generation-"):
                from bench import generation

                generation.run(workdir, quick=args.quick, budget_s=budget, log_file=log_file,
                               shape=family_shape(name, args.quick))
            elif name in ("packing", "checkpointing"):
                from bench import packing

                getattr(packing, f"run_{name}")(workdir / name, quick=args.quick, budget_s=budget, log_file=log_file)
            elif name == "dense":
                from bench import dense

                dense.run(workdir, quick=args.quick, budget_s=budget, log_file=log_file, recipe=sft_recipe,
                          n_layers=n_layers)
            elif name == "generation":
                from bench import generation

                generation.run(workdir, quick=args.quick, budget_s=budget, log_file=log_file, shape=gpt2)
            elif name == "dpo":
                from bench import dpo

                dpo.run(workdir, quick=args.quick, budget_s=budget, log_file=log_file, n_layers=n_layers)
            elif name == "data":
                from bench import data

                data.run(workdir / "data", quick=args.quick, budget_s=budget, log_file=log_file)
            else:
                from bench import startup

                startup.run(workdir, quick=args.quick, budget_s=budget, log_file=log_file, recipe=sft_recipe)
            print(f"({name}: {time.monotonic() - t:.0f} s)")
    finally:
        if tmp is not None:
            tmp.cleanup()
    total = time.monotonic() - started
    print(f"\nall done in {total / 60:.1f} minutes")
    if not args.quick and set(wanted) == set(BENCHMARKS):
        from pipeline.io import write_json

        write_json(common.RESULTS / "run.json", {"total_s": round(total, 1), "benchmarks": wanted,
                                                 "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                 "load_after": common.loadavg()})
    if not args.no_readme and not args.quick:
        from bench import report

        path = report.write_readme()
        print(f"figures written to {path.relative_to(common.ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
