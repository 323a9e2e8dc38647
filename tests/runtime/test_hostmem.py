"""Freed activations go back to the system under gradient checkpointing (pipeline.runtime.hostmem)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.runtime import hostmem
from pipeline.train.run import enable_features

# One process per case: the allocator settings are process-wide. The script plays a training step's pattern:
# a 16 MB activation freed once (glibc's dynamic threshold rises to 16 MB), then 40 activations of 5 MiB
# (above tune_malloc's 4 MiB threshold), each
# followed by a small block that outlives them (a Python object, a LoRA intermediate), then the activations
# are freed. Returned: how much of their 200 MB is still resident.
SCRIPT = """
import json, sys, torch
from pipeline.runtime import hostmem
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024
tuned = hostmem.tune_malloc() if sys.argv[1] == "tuned" else False
first = torch.ones(1 << 22, dtype=torch.float32)  # 16 MB
del first
before = rss()
big, small = [], []
for _ in range(40):
    big.append(torch.ones(5 << 18, dtype=torch.float32))  # 5 MiB
    small.append(torch.ones(1 << 12, dtype=torch.float32))  # 16 KB, kept
peak = rss()
del big
print(json.dumps({"tuned": tuned, "allocated": peak - before, "still_resident": rss() - before}))
"""


def resident_after_free(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    return json.loads(out.stdout)


@pytest.mark.skipif(hostmem._glibc() is None, reason="glibc only: elsewhere the calls do nothing")
def test_tuned_malloc_returns_freed_activations_to_the_system():
    default, tuned = resident_after_free("default"), resident_after_free("tuned")
    assert default["allocated"] > 150 and tuned["allocated"] > 150  # the 200 MB were touched in both
    assert tuned["tuned"] is True
    assert default["still_resident"] > 150  # glibc's heap keeps them, under the small live blocks
    assert tuned["still_resident"] < 20  # each was its own mapping, unmapped when freed


def test_without_glibc_nothing_is_called(monkeypatch):
    monkeypatch.setattr(hostmem, "_glibc", lambda: None)
    assert hostmem.tune_malloc() is False and hostmem.release_freed() is False


class Model:
    def __init__(self) -> None:
        self.checkpointing = False

    def forward(self, input_ids, segment_ids=None):  # noqa: ANN001 (a stand-in)
        return input_ids

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.checkpointing = enabled


@pytest.mark.parametrize("disabled", [True, False])
def test_train_tunes_malloc_only_when_it_checkpoints(monkeypatch, disabled):
    """Checkpointing is the memory-first mode; without it the faster reuse of resident heap is kept."""
    calls = []
    monkeypatch.setattr(hostmem, "tune_malloc", lambda: calls.append(1) or True)
    model = Model()
    enable_features(model, {"neat_packing": False, "disable_gradient_checkpointing": disabled, "neftune_noise_alpha": None})
    assert model.checkpointing is (not disabled)
    assert len(calls) == (0 if disabled else 1)
