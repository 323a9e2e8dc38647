"""PIPELINE_PROFILE: torch.profiler over chosen optimizer steps of a real run, one JSON (bench/gpu_check sets it)."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.runtime.log import read_log
from pipeline.train import step_profile
from pipeline.train.run import train
from tests.train.helpers import BASE_SFT

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text, want", [
    ("p.json", ("p.json", 3, 2)),
    ("out/p.json:5", ("out/p.json", 5, 2)),
    ("p.json:1:4", ("p.json", 1, 4)),
])
def test_parse(text, want):
    req = step_profile.parse(text)
    assert (str(req.path), req.first, req.count) == want
    assert req.last == req.first + req.count - 1


@pytest.mark.parametrize("text", ["", ":3", "p.json:0", "p.json:x", "p.json:1:0", "p.json:1:2:3"])
def test_parse_refuses_with_the_expected_form(text):
    with pytest.raises(UserError, match=r"PIPELINE_PROFILE=.*expected FILE.json\[:FIRST\[:COUNT\]\]"):
        step_profile.parse(text)


def test_only_rank_0_profiles(monkeypatch):
    monkeypatch.setenv(step_profile.ENV, "p.json:2:1")
    assert step_profile.from_env(0) == step_profile.ProfileRequest(Path("p.json"), 2, 1)
    assert step_profile.from_env(1) is None
    monkeypatch.delenv(step_profile.ENV)
    assert step_profile.from_env(0) is None


def test_a_run_writes_the_profile_of_the_chosen_steps(make_recipe, workdir, monkeypatch):
    """In a real (in-process, DeepSpeed CPU) run: steps 2-3 of 4 profiled; the run's own figures unchanged."""
    out = workdir / "profile.json"
    monkeypatch.setenv(step_profile.ENV, f"{out}:2:2")
    result = train(make_recipe(BASE_SFT, name="p", max_steps=4))
    profile = json.loads(out.read_text())
    assert profile["steps"] == [2, 3] and profile["wall_ms"] > 0 and profile["ops"] > 0
    assert profile["wall_ms_per_step"] == pytest.approx(profile["wall_ms"] / 2, rel=0.01)
    assert profile["device_busy_ms"] == 0 and profile["device_busy_share"] is None  # no GPU here
    assert profile["top_device"] == []
    ops = {row["op"] for row in profile["top_cpu"]}
    assert any(op.startswith("aten::") for op in ops)
    assert all(row["self_cpu_ms"] >= 0 and row["calls"] >= 1 for row in profile["top_cpu"])
    calls = [row["calls"] for row in profile["top_calls"]]  # the most frequent ops first
    assert calls == sorted(calls, reverse=True) and calls[0] >= max(row["calls"] for row in profile["top_cpu"])
    assert len(read_log(result.output_dir / "trainer_log.jsonl")) == 4  # every step still logged
    assert profile["host_syncs_per_step"] is None  # CUDA's synchronize calls: no GPU here
    reads = profile["syncing_ops_per_step"]  # the ops that read the device (item / float / int / bool, nonzero)
    assert set(reads) == {"aten::_local_scalar_dense", "aten::nonzero"} and reads["aten::nonzero"] > 0  # the loss'
    # labelled positions (boolean indexing): a sync per micro-batch on a GPU


def test_a_bad_value_is_one_message_before_anything_is_written(workdir):
    recipe = workdir / "r.yaml"
    recipe.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {**BASE_SFT, "output_dir": "saves/bad"}.items()))
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "PIPELINE_PROFILE": "p.json:0", "HOME": str(workdir)}
    built = subprocess.run([sys.executable, "-m", "pipeline", "build", str(recipe)], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", str(recipe)], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "PIPELINE_PROFILE='p.json:0'" in proc.stderr
    assert not (workdir / "saves" / "bad").exists()


def test_a_run_that_ends_inside_or_before_the_steps(make_recipe, workdir, monkeypatch, capsys):
    """Steps 3-6 asked of a 4-step run: the profile covers 3-4. Step 9 asked: nothing written, and it says so."""
    inside = workdir / "inside.json"
    monkeypatch.setenv(step_profile.ENV, f"{inside}:3:4")
    train(make_recipe(BASE_SFT, name="inside", max_steps=4))
    assert json.loads(inside.read_text())["steps"] == [3, 4]
    before = workdir / "before.json"
    monkeypatch.setenv(step_profile.ENV, f"{before}:9")
    train(make_recipe(BASE_SFT, name="before", max_steps=4))
    assert not before.exists()
    assert "PIPELINE_PROFILE: step 9 was not run here (this run ended at step 4" in capsys.readouterr().err


def test_the_profile_is_let_go_once_written(tmp_path):
    """After the JSON is written the profiler keeps no events: they are about a million Python objects that every
    later full garbage collection would walk."""
    profiler = step_profile.StepProfiler(step_profile.ProfileRequest(tmp_path / "p.json", 1, 1))
    with profiler.step(1):
        sum(range(10))
    assert (tmp_path / "p.json").is_file() and profiler._prof is None


def test_a_resumed_run_past_the_first_step_profiles_nothing(capsys, tmp_path):
    """Resumed at step 4 with steps 3-4 asked: step 4 runs, but no profile was started, so none is written."""
    profiler = step_profile.StepProfiler(step_profile.ProfileRequest(tmp_path / "p.json", 3, 2))
    for number in (4, 5):
        with profiler.step(number):
            pass
    profiler.close(5)
    assert not (tmp_path / "p.json").exists()
    assert "step 3 was not run here" in capsys.readouterr().err


@pytest.mark.parametrize("spans, want", [
    ([], 0.0),
    ([(0, 10)], 10.0),
    ([(0, 10), (20, 25)], 15.0),            # a gap between kernels is idle
    ([(0, 10), (5, 12)], 12.0),             # concurrent streams overlap: counted once
    ([(20, 25), (0, 30), (2, 3)], 30.0),    # unsorted, one span inside another
])
def test_busy_time_is_the_union_of_the_device_spans(spans, want):
    assert step_profile.busy_us(spans) == want


def test_busy_share_counts_a_kernel_once_not_again_as_its_op():
    """key_averages() gives the aten op the self device time of the kernel it launched; the share is from the
    device spans, so an op and its kernel (and two overlapping kernels) never read more than the wall time."""
    dev = types.SimpleNamespace(name="CUDA")
    cpu = types.SimpleNamespace(name="CPU")

    def event(key, cpu_us, device_us, kind, start=0.0, end=0.0):
        return types.SimpleNamespace(key=key, count=1, self_cpu_time_total=cpu_us, self_device_time_total=device_us,
                                     device_type=kind, time_range=types.SimpleNamespace(start=start, end=end))

    ops = [event("aten::mm", 50.0, 600.0, cpu), event("gemm_kernel", 0.0, 600.0, dev, 100.0, 700.0),
           event("add_kernel", 0.0, 300.0, dev, 500.0, 800.0), event("aten::add", 5.0, 300.0, cpu, 10.0, 20.0)]
    summary = step_profile.summarize(ops, wall_s=0.001, request=step_profile.ProfileRequest(Path("p.json")),
                                     spans=step_profile.kernel_spans(ops))
    assert summary["device_busy_ms"] == 0.7 and summary["device_busy_share"] == 0.7  # 100..800 µs of 1000 µs
    assert summary["top_device"][0]["self_device_ms"] == 0.6


def test_host_syncs_per_step_are_cudas_synchronize_calls_less_the_profilers_own():
    """CUDA's synchronize calls over the profiled steps, per step, without the one the profiler makes to close the
    profile; the ops that read the device on the host counted on any device kind (what bench/gpu_check keeps)."""
    cpu = types.SimpleNamespace(name="CPU")

    def event(key, count):
        return types.SimpleNamespace(key=key, count=count, self_cpu_time_total=1.0, self_device_time_total=0.0,
                                     device_type=cpu)

    ops = [event("cudaStreamSynchronize", 6), event("cudaDeviceSynchronize", 1), event("cudaEventSynchronize", 2),
           event("aten::_local_scalar_dense", 5), event("cudaLaunchKernel", 90), event("aten::mm", 40)]
    request = step_profile.ProfileRequest(Path("p.json"), 3, 2)
    summary = step_profile.summarize(ops, wall_s=0.01, request=request, own_syncs=1)
    assert summary["host_syncs_per_step"] == 4.0  # (6 + 1 + 2 - 1) / 2 steps
    assert summary["syncing_ops_per_step"] == {"aten::_local_scalar_dense": 2.5, "aten::nonzero": 0.0}
    assert step_profile.summarize(ops, 0.01, request)["host_syncs_per_step"] is None  # CUDA not profiled
