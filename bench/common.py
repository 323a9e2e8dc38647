"""What every benchmark shares: the machine description, interleaved rounds, child processes, results files.

The machine is shared and noisy, so absolute times drift while ratios measured side by side hold: every
benchmark runs its contenders one after another in each round, rotating the order between rounds, and
reports medians over rounds. Work that must be isolated (peak RSS, imports) runs in a child process.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from pipeline.io import write_json

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
PACKAGES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "tiktoken", "numpy", "llms-from-scratch")


# ---------------------------------------------------------------------------------------------- the machine

def cpu_model() -> str:
    """lscpu's model name, with family/model numbers (a hypervisor may show only "AMD EPYC")."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        out = ""
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name = fields.get("Model name", platform.processor() or "unknown").strip()
    family, model = fields.get("CPU family", "").strip(), fields.get("Model", "").strip()
    return f"{name} (family {family}, model {model})" if family and model else name


def cpu_flags() -> list[str]:
    """The flags that decide bf16 matmul speed."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512_bf16", "amx", "avx512f", "avx2")))


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict[str, Any]:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": memory_gib(), "cpu_flags": cpu_flags(), "platform": platform.platform(),
            "versions": versions()}


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_mb() -> float:
    """This process's peak resident set size since it started: VmHWM on Linux.

    Not ru_maxrss: Linux carries the parent's high-water mark into a child across fork and exec (the
    forked copy of the parent's memory counts until exec replaces it), so a child started by a large
    benchmark process would report at least the parent's peak. ru_maxrss (KiB) elsewhere."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---------------------------------------------------------------------------------------------- measuring

def median(values: Iterable[float]) -> float:
    values = list(values)
    return statistics.median(values) if values else float("nan")


def throughput_summary(runs: list[dict], epoch_padding_share: float) -> dict[str, Any]:
    """One contender's rounds -> medians of speed and memory, and the padding of its timed and whole-epoch
    batches (the sft and dpo benchmarks report the same figures)."""
    return {"tokens_per_s": median(r["tokens_per_s"] for r in runs),
            "tokens_per_cpu_s": median(r["tokens_per_cpu_s"] for r in runs),
            "peak_rss_mb": median(r["peak_rss_mb"] for r in runs),
            "padding_share": 1 - runs[0]["useful_tokens"] / runs[0]["computed_tokens"],
            "epoch_padding_share": epoch_padding_share,
            "useful_tokens": runs[0]["useful_tokens"], "computed_tokens": runs[0]["computed_tokens"],
            "rounds": len(runs)}


def rounds(contenders: Mapping[str, Callable[[int], dict]], *, min_rounds: int, max_rounds: int,
           budget_s: float, log: Callable[[str], None] = print) -> dict[str, list[dict]]:
    """Every contender once per round, the order rotated each round; stops after max_rounds, or once
    min_rounds are done and the next round would not fit in budget_s. Returns the results per contender."""
    names = list(contenders)
    out: dict[str, list[dict]] = {n: [] for n in names}
    started = time.monotonic()
    for k in range(max_rounds):
        elapsed = time.monotonic() - started
        if k >= min_rounds and elapsed / k * (k + 1) > budget_s:
            log(f"  stopping after {k} rounds ({elapsed:.0f} s of a {budget_s:.0f} s budget)")
            break
        order = names[k % len(names):] + names[:k % len(names)]
        for name in order:
            t0 = time.monotonic()
            result = contenders[name](k)
            out[name].append(result)
            log(f"  round {k + 1} {name}: {short(result)} ({time.monotonic() - t0:.0f} s, load {loadavg()[0]})")
    return out


def short(result: Mapping[str, Any]) -> str:
    keys = [k for k in ("tokens_per_s", "seconds", "peak_rss_mb") if k in result]
    return ", ".join(f"{k} {result[k]:,.1f}" if isinstance(result[k], float) else f"{k} {result[k]}" for k in keys)


def run_child(target: str, kwargs: Mapping[str, Any], *, timeout: float, log_file: Path | None = None) -> dict:
    """`python -m bench.child module:function` in a fresh process; returns the function's dict (+ peak RSS)."""
    with tempfile.TemporaryDirectory(prefix="bench-child-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "bench.child", target, json.dumps(dict(kwargs)), str(out)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        if log_file is not None:
            with open(log_file, "a", encoding="utf-8") as handle:
                handle.write(f"$ {' '.join(cmd[:4])} ...\n{proc.stdout}{proc.stderr}\n")
        if proc.returncode != 0 or not out.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
            raise RuntimeError(f"{target} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- reporting

def check(value: float, op: str, target: float, what: str) -> dict[str, Any]:
    """A target and where we stand: `by` is value / target (how far above or below the line)."""
    met = value >= target if op == ">=" else value <= target if op == "<=" else value < target
    return {"what": what, "value": round(value, 4), "op": op, "target": target, "met": bool(met),
            "by": round(value / target, 3) if target else None}


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown pipe table (readable in a terminal too)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:,.3g}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:,.1f}"
        return str(v)

    body = [[cell(v) for v in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def targets_table(targets: Iterable[Mapping[str, Any]]) -> str:
    def num(v: float) -> str:
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"

    rows = [(t["what"], f"{t['op']} {num(t['target'])}", num(t["value"]), "yes" if t["met"] else
             f"**no** ({t['by']:.2f} of the target)" if t["op"] == ">=" else f"**no** ({t['by']:.2f}x the limit)")
            for t in targets]
    return table(["target", "wanted", "measured", "met"], rows)


def save(name: str, payload: Mapping[str, Any], started_load: list[float]) -> Path:
    """<results>/<name>.json: the machine, versions, load before/after, and the benchmark's figures.
    The results folder is bench/results, or $BENCH_RESULTS (quick runs write elsewhere)."""
    path = Path(os.environ.get("BENCH_RESULTS", RESULTS)) / f"{name}.json"
    record = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(),
              "load_before": started_load, "load_after": loadavg(), **payload}
    write_json(path, record)
    return path
