"""torch.profiler over a few optimizer steps of a real run, written as one JSON: where a step's time goes.

Why an environment variable and not a recipe key: profiling is a diagnosis of the machine and the code, not
part of an experiment, and it must not change what a recipe means or its resume fingerprint.

    PIPELINE_PROFILE=profile.json[:FIRST[:COUNT]]    # default FIRST=3 (after warm-up), COUNT=2

The JSON holds the profiled steps, their wall time, the time the accelerator was busy running kernels
(CUDA only: the share of the wall time the GPU worked; a small share means the host - Python, DeepSpeed's
step, synchronisations - bounds the step, not the kernels), and the top ops by self CPU time, by self
device time and by call count (a step bound by the host spends it on many small ops), and how often a step
stopped the host until the device drained (host_syncs_per_step: CUDA's synchronize calls, the loop's, the model's
and DeepSpeed's together; syncing_ops_per_step: the ops that read device values on the host, counted on any
device). Rank 0 writes it; other ranks profile nothing. bench/gpu_check.py sets it for every run.
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import UserError
from pipeline.io import write_text

ENV = "PIPELINE_PROFILE"
TOP = 15
# CUDA runtime calls that block the host until the device (or a stream, an event) has run what it was given:
# a .item() / float() / tolist() / boolean index of a CUDA tensor is a copy followed by cudaStreamSynchronize
CUDA_SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# ops whose result the host needs from the device on any device kind: a scalar read (item, float, int, bool of a
# tensor) and a data-dependent shape (boolean indexing, masked_select, nonzero); on CUDA each is a sync
SYNCING_OPS = ("aten::_local_scalar_dense", "aten::nonzero")


@dataclass(frozen=True)
class ProfileRequest:
    path: Path
    first: int = 3
    count: int = 2

    @property
    def last(self) -> int:
        return self.first + self.count - 1


def parse(text: str) -> ProfileRequest:
    """`out.json`, `out.json:FIRST` or `out.json:FIRST:COUNT` (steps counted from 1)."""
    path, *numbers = text.split(":")
    if not path or len(numbers) > 2 or not all(n.isdigit() and int(n) >= 1 for n in numbers):
        raise UserError(f"{ENV}={text!r}: expected FILE.json[:FIRST[:COUNT]] with FIRST and COUNT whole numbers "
                        "of at least 1, e.g. profile.json:3:2 (steps 3 and 4)")
    return ProfileRequest(Path(path), *(int(n) for n in numbers))


def from_env(rank: int) -> ProfileRequest | None:
    text = os.environ.get(ENV, "")
    return parse(text) if text and rank == 0 else None


class StepProfiler:
    """`with profiler.step(n): ...` around each optimizer step; profiles the requested ones and writes the JSON
    after the last of them. Does nothing when no profile was requested."""

    def __init__(self, request: ProfileRequest | None) -> None:
        self.request = request
        self._prof: Any = None
        self._started = 0.0

    @contextlib.contextmanager
    def step(self, number: int) -> Iterator[None]:
        req = self.request
        if req is None or not req.first <= number <= req.last:
            yield
            return
        if number == req.first:
            self._start()
        yield
        if number == req.last and self._prof is not None:  # a run resumed past `first` never started one
            self._finish()

    def close(self, last_step: int) -> None:
        """End of the run: a profile still open (the run ended inside the requested steps) is written for the
        steps it saw; one that never started (the run ended before `first`, or resumed past it) says so."""
        req = self.request
        if req is None:
            return
        if self._prof is not None:
            self.request = ProfileRequest(req.path, req.first, last_step - req.first + 1)
            self._finish()
        else:
            print(f"{ENV}: step {req.first} was not run here (this run ended at step {last_step}, or resumed past "
                  "it); no profile written", file=sys.stderr, flush=True)
            self.request = None

    def _start(self) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        _synchronize()
        self._prof = profile(activities=activities)
        self._prof.__enter__()
        self._started = time.perf_counter()

    def _finish(self) -> None:
        own_syncs = _synchronize()  # inside the profile: summarize leaves it out of host_syncs_per_step
        wall = time.perf_counter() - self._started
        self._prof.__exit__(None, None, None)
        assert self.request is not None
        write(self.request, summarize(self._prof.key_averages(), wall, self.request, kernel_spans(self._prof.events()),
                                      own_syncs))
        self.request = None  # once per run
        self._release()

    def _release(self) -> None:
        """Free the profile's events once they are written. Why: kept, they lived as long as the run: about a
        million Python objects (a 12-block GPT-2 profiled over two steps on the CPU: 0.44 M objects in the process
        without them, 1.41 M with them, 290 MB of RSS), which every later full garbage collection walks. The
        collection here runs inside the profiled step, whose time is not representative anyway."""
        self._prof = None
        gc.collect()


def _synchronize() -> int | None:
    """Waits for the device; returns how many CUDA synchronize calls that made (None without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return 1
    return None


def kernel_spans(events: Any) -> list[tuple[float, float]]:
    """(start, end) in µs of every event that ran on the device (kernels, copies), from profile.events()."""
    return [(e.time_range.start, e.time_range.end) for e in events
            if getattr(getattr(e, "device_type", None), "name", "CPU") != "CPU"]


def busy_us(spans: list[tuple[float, float]]) -> float:
    """How long the device ran anything: the union of the spans. Why not a sum of device times: key_averages()
    counts a kernel's time twice (once as the kernel, again as the self device time of the aten op that launched
    it), and kernels on concurrent streams overlap; the first H200 profiles read 108% and 163% busy that way."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(spans):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def summarize(events: Any, wall_s: float, request: ProfileRequest,
              spans: list[tuple[float, float]] | None = None, own_syncs: int | None = None) -> dict[str, Any]:
    """The JSON's content from torch.profiler's key_averages() (the top ops by host time, device time and
    calls), the device spans (how long the device was busy) and the host syncs per step. `own_syncs`: the CUDA
    synchronize calls the profiler made itself inside the profile (None: CUDA was not profiled, so there is no
    host_syncs_per_step)."""
    def device_us(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) or getattr(e, "self_cuda_time_total", 0.0) or 0.0)

    cpu_total = sum(e.self_cpu_time_total for e in events)
    busy = busy_us(spans or [])
    calls: dict[str, int] = {}
    for e in events:
        calls[e.key] = calls.get(e.key, 0) + int(e.count)
    syncs = None if own_syncs is None else sum(calls.get(name, 0) for name in CUDA_SYNCS) - own_syncs

    def rows(key: Any) -> list[dict[str, Any]]:
        return [{"op": e.key, "calls": e.count, "self_cpu_ms": round(e.self_cpu_time_total / 1000, 3),
                 "self_device_ms": round(device_us(e) / 1000, 3)}
                for e in sorted(events, key=key, reverse=True)[:TOP] if key(e) > 0]

    return {
        "steps": [request.first, request.last],
        "wall_ms": round(wall_s * 1000, 2),
        "wall_ms_per_step": round(wall_s * 1000 / request.count, 2),
        "self_cpu_ms": round(cpu_total / 1000, 2),
        "device_busy_ms": round(busy / 1000, 2),
        "device_busy_share": round(busy / 1000 / (wall_s * 1000), 4) if busy else None,
        "ops": int(sum(e.count for e in events)),
        # host-device synchronisations: each stops the host until the device drains, so the next kernels cannot be
        # queued meanwhile (at small batches the step is then bound by the host)
        "host_syncs_per_step": None if syncs is None else round(syncs / request.count, 2),
        "syncing_ops_per_step": {name: round(calls.get(name, 0) / request.count, 2) for name in SYNCING_OPS},
        "top_cpu": rows(lambda e: e.self_cpu_time_total),
        "top_device": rows(device_us) if any(device_us(e) for e in events) else [],
        # where a step bound by the host spends it: many small ops (views, per-tensor checks), not long ones
        "top_calls": rows(lambda e: e.count),
    }


def write(request: ProfileRequest, summary: dict[str, Any]) -> None:
    request.path.parent.mkdir(parents=True, exist_ok=True)
    write_text(request.path, json.dumps(summary, indent=2) + "\n")
