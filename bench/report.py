"""bench/README.md's figures: rebuilt from bench/results/*.json between the figure markers; the prose around
them (method, analysis of missed targets) is kept as written."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, RESULTS, table, targets_table
from bench.profiling import top_table
from bench.workload import FAMILY_LAYERS
from pipeline.io import write_text

README = BENCH_DIR / "README.md"
START, END = "<!-- figures:start (written by python -m bench.run) -->", "<!-- figures:end -->"
FAMILY_PRESETS = tuple(FAMILY_LAYERS)
ORDER = ("sft", "dense", "generation", "data", "startup", "dpo", *(f"sft-{p}" for p in FAMILY_PRESETS),
         *(f"generation-{p}" for p in FAMILY_PRESETS), "packing", "checkpointing")
TITLES = {"sft": "sft throughput (LoRA, useful tokens/s) and peak RSS",
          "dpo": "dpo throughput (LoRA, sigmoid, useful tokens/s) and peak RSS vs TRL",
          "dense": "dense step (fully packed batch)",
          "generation": "generation (256 new tokens, greedy)", "data": "data stage (200k rows)",
          "startup": "startup",
          **{f"sft-{p}": f"sft throughput and peak RSS, {p} shape" for p in FAMILY_PRESETS},
          **{f"generation-{p}": f"generation, {p} shape (cached, greedy)" for p in FAMILY_PRESETS},
          "packing": "packing (neat_packing) vs unpacked and vs transformers+PEFT",
          "checkpointing": "gradient checkpointing: peak RSS and step time at the same batch"}


def load_results(folder: Path = RESULTS) -> dict[str, dict[str, Any]]:
    found = {}
    for name in ORDER:
        path = folder / f"{name}.json"
        if path.exists():
            found[name] = json.loads(path.read_text(encoding="utf-8"))
    return found


def machine_lines(m: dict[str, Any]) -> list[str]:
    v = m["versions"]
    return [f"- CPU: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), "
            f"{m['memory_gib']} GiB; flags: {', '.join(m['cpu_flags']) or 'n/a'}",
            f"- {m['platform']}; Python {v['python']}",
            "- " + ", ".join(f"{k} {v[k]}" for k in ("torch", "transformers", "peft", "accelerate", "deepspeed",
                                                      "tiktoken", "numpy", "llms-from-scratch"))]


def cpu_line(m: dict[str, Any]) -> str:
    return f"{m['cpu']} ({', '.join(m['cpu_flags']) or 'no avx512'})"


def section(name: str, res: dict[str, Any], header_cpu: str = "") -> list[str]:
    """A benchmark's figures; `header_cpu`: the machine the page's header names (a result measured on another
    CPU says which: a re-run alone may land on a different machine, and absolute times do not compare)."""
    cfg = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in res.get("config", {}).items()
                    if k not in ("flop_formula", "recipe") and not isinstance(v, dict))
    cpu = cpu_line(res["machine"]) if "machine" in res else header_cpu
    other = f" On another machine than the header's: {cpu}." if header_cpu and cpu != header_cpu else ""
    lines = [f"### {TITLES[name]}", "", f"{cfg}. Load average before / after: {res['load_before'][0]} / "
             f"{res['load_after'][0]} ({res['date']}).{other}", "", res["table"], ""]
    if res.get("targets"):
        lines += [targets_table(res["targets"]), ""]
    missed = not all(t["met"] for t in res.get("targets", []))
    if missed:
        for key, label in (("profile_ours", "torch.profiler, one of our steps: top ops by self CPU time"),
                           ("profile_trl", "torch.profiler, TRL's DPOTrainer, one step: top ops by self CPU time")):
            if res.get(key):
                lines += [f"Profile ({label}, {res[key]['total_ms']:,.0f} ms in all):", "", top_table(res[key]), ""]
        if name == "data" and res.get("profile"):
            for stage, prof in res["profile"].items():
                lines += [f"Profile of {stage} (cProfile on 20k rows, {prof['total_s']} s; top functions by own "
                          "time; `acquire` = the main thread waiting for tiktoken's worker threads):", "",
                          top_table(prof, 8), ""]
        if name == "startup" and res.get("validate_import_profile"):
            prof = res["validate_import_profile"]
            lines += ["Profile of validate: slowest imports (`python -X importtime`, cumulative seconds):", "",
                      table(["module", "seconds"], [(r["module"], r["cumulative_s"]) for r in prof["imports"]]), "",
                      "and cProfile, cumulative seconds per function:", "",
                      table(["function", "cumulative s", "self s"],
                            [(r["function"], r["cumulative_s"], r["self_s"]) for r in prof["functions"][:12]]), ""]
    return lines


def figures(results: dict[str, dict[str, Any]], run: dict[str, Any] | None) -> str:
    if not results:
        return "No results yet: run `make bench`."
    first = next(iter(results.values()))
    lines = ["## Latest figures", ""]
    if run:
        lines += [f"Last full `make bench`: {run['total_s'] / 60:.1f} minutes ({run['date']}); a benchmark re-run "
                  "alone since then shows its own date below.", ""]
    lines += ["Machine:", "", *machine_lines(first["machine"]), ""]
    everything = [t for r in results.values() for t in r.get("targets", [])]
    if everything:
        lines += ["All targets:", "", targets_table(everything), ""]
    header_cpu = cpu_line(first["machine"])
    for name, res in results.items():
        lines += section(name, res, header_cpu)
    return "\n".join(lines).rstrip() + "\n"


def write_readme(results_dir: Path = RESULTS) -> Path:
    """Replace the text between the markers (or append the markers) with the current figures."""
    text = README.read_text(encoding="utf-8") if README.exists() else "# Benchmarks\n\n"
    run_file = results_dir / "run.json"
    run = json.loads(run_file.read_text(encoding="utf-8")) if run_file.exists() else None
    block = f"{START}\n{figures(load_results(results_dir), run)}{END}"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    write_text(README, text)
    return README
