"""Profiles backing the explanations of missed targets: torch.profiler for model steps, cProfile for Python."""
from __future__ import annotations

import cProfile
import io
import pstats
from typing import Any, Callable


def profile_step(step: Callable[[], Any], rows: int = 15) -> dict[str, Any]:
    """torch.profiler over one call: the ops taking the most self CPU time, as text and as data."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:rows]
    return {"total_ms": round(total / 1000, 1),
            "top": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1000, 1),
                     "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in top]}


def profile_python(func: Callable[[], Any], rows: int = 15) -> dict[str, Any]:
    """cProfile over one call: the functions with the most internal time."""
    prof = cProfile.Profile()
    prof.enable()
    func()
    prof.disable()
    stats = pstats.Stats(prof, stream=io.StringIO())
    total = stats.total_tt or 1.0
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:rows]  # type: ignore[attr-defined]
    top = [{"function": f"{path.rsplit('/', 2)[-1] if '/' in path else path}:{line}({name})",
            "self_s": round(tt, 3), "cumulative_s": round(ct, 3), "share": round(tt / total, 3), "calls": nc}
           for (path, line, name), (cc, nc, tt, ct, callers) in entries]
    return {"total_s": round(total, 3), "top": top}


def top_table(profile: dict[str, Any], rows: int = 10) -> str:
    from bench.common import table

    if "total_ms" in profile:
        return table(["op", "self ms", "share", "calls"],
                     [(e["op"], e["self_ms"], f"{e['share']:.0%}", e["calls"]) for e in profile["top"][:rows]])
    return table(["function", "self s", "cumulative s", "share", "calls"],
                 [(e["function"], e["self_s"], e["cumulative_s"], f"{e['share']:.0%}", e["calls"])
                  for e in profile["top"][:rows]])
