"""Startup: wall seconds of `python -m pipeline validate RECIPE` (what `make validate` runs) to its result,
and of `python -m pipeline train RECIPE` from launch to its first optimizer step (the moment the first
record lands in trainer_log.jsonl, logging_steps=1; the run is then killed). The train figure is split
into the time before the loop and the first step itself (the record's `elapsed`). Bare interpreter
start (`python -c pass`) is given for scale.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import common

TRAIN_OVERRIDES = ("model_name_or_path=gpt2-small", "per_device_train_batch_size=2")  # the real 124M shapes


def _env() -> dict[str, str]:
    from bench.workload import one_rank_env

    return {**one_rank_env(), "PYTHONPATH": str(common.ROOT)}


def wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=common.ROOT, env=_env(), capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return seconds


def first_step(recipe: str, output_dir: Path, log_file: Path, timeout: float = 900) -> dict[str, float]:
    """Launch training, wait for the first trainer_log.jsonl record, kill the run."""
    log = output_dir / "trainer_log.jsonl"
    cmd = [sys.executable, "-m", "pipeline", "train", recipe, f"output_dir={output_dir}", "overwrite_output_dir=true",
           "logging_steps=1", "max_steps=5", *TRAIN_OVERRIDES]
    with open(log_file, "a", encoding="utf-8") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=common.ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            while time.perf_counter() - t0 < timeout:
                if log.exists() and log.read_text(encoding="utf-8").strip():
                    seconds = time.perf_counter() - t0
                    record = json.loads(log.read_text(encoding="utf-8").splitlines()[0])
                    return {"seconds": seconds, "first_step_seconds": float(record["elapsed"]),
                            "before_loop_seconds": seconds - float(record["elapsed"])}
                if proc.poll() is not None:
                    raise RuntimeError(f"train exited with {proc.returncode} before its first step (see {log_file})")
                time.sleep(0.05)
            raise RuntimeError(f"no first step within {timeout} s")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def import_profile(recipe: str) -> list[dict[str, Any]]:
    """`python -X importtime` of validate: the slowest imports (cumulative, with what they pulled in)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "pipeline", "validate", recipe], cwd=common.ROOT,
                          env=_env(), capture_output=True, text=True, check=False)
    rows = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = (p.strip() for p in line.split(":", 1)[1].split("|"))
            if not name.startswith(" ") and name.strip():
                rows.append({"module": name.strip(), "cumulative_s": int(cumulative) / 1e6})
    top = sorted((r for r in rows if "." not in r["module"]), key=lambda r: r["cumulative_s"], reverse=True)
    return top[:10]


def function_profile(recipe: str, workdir: Path) -> list[dict[str, Any]]:
    """cProfile of validate (imports included): the functions with the most cumulative time (the command's
    entry frames left out), outermost first."""
    import pstats

    out = workdir / "validate.prof"
    subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "pipeline", "validate", recipe],
                   cwd=common.ROOT, env=_env(), capture_output=True, text=True, check=False)
    stats = pstats.Stats(str(out))
    rows = []
    for (path, line, name), (cc, nc, tt, ct, callers) in stats.stats.items():  # type: ignore[attr-defined]
        if "runpy" not in path and "builtins.exec" not in name and not path.endswith("__main__.py"):
            rows.append({"function": f"{Path(path).name}:{line}({name})", "cumulative_s": round(ct, 3),
                         "self_s": round(tt, 3)})
    return sorted(rows, key=lambda r: r["cumulative_s"], reverse=True)[:15]


def run(workdir: Path, *, quick: bool, budget_s: float, log_file: Path, recipe: str) -> dict[str, Any]:
    """`recipe` is the sft benchmark's (its data is built); train runs it on the gpt2-small preset."""
    started = common.loadavg()
    py = sys.executable
    contenders = {
        "python -c pass": lambda k: {"seconds": wall([py, "-c", "pass"])},
        "validate": lambda k: {"seconds": wall([py, "-m", "pipeline", "validate", recipe])},
        "train to first step": lambda k: first_step(recipe, workdir / "saves" / f"startup-{k}", log_file),
    }
    print("startup: validate and train (first optimizer step)")
    results = common.rounds(contenders, min_rounds=1, max_rounds=1 if quick else 2, budget_s=budget_s)
    summary = {name: {key: common.median(r[key] for r in runs) for key in runs[0]} for name, runs in results.items()}
    rows = [(name, s["seconds"], s.get("before_loop_seconds", ""), s.get("first_step_seconds", ""), len(results[name]))
            for name, s in summary.items()]
    text = common.table(["command", "seconds", "before the loop", "first step", "rounds"], rows)
    print(text)
    targets = [common.check(summary["validate"]["seconds"], "<", 1.0, "validate seconds")]
    profile = None if targets[0]["met"] else {"imports": import_profile(recipe),
                                              "functions": function_profile(recipe, workdir)}
    payload = {"config": {"recipe": os.path.relpath(recipe, common.ROOT) if recipe.startswith(str(common.ROOT)) else
                          recipe, "train_overrides": " ".join(TRAIN_OVERRIDES) +
                          " logging_steps=1 max_steps=5 (killed after the first record)"},
               "summary": summary, "targets": targets, "table": text, "validate_import_profile": profile,
               "runs": results}
    common.save("startup", payload, started)
    return payload
