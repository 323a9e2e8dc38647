"""bench.gpu_check's `tests` section records each CUDA-only test: its outcome (also when the section times out), the
files it ran, the slowest phases; and it runs them on CUDA even where PIPELINE_TEST_DEVICE=cpu is set (the switch
of tests/gpu/conftest.py that runs them on a CPU). pytest itself is stood in for by its -v / --durations lines."""
from __future__ import annotations

import subprocess

from bench import gpu_check

OUTPUT = """\
============================= test session starts ==============================
tests/gpu/test_features_cuda.py::test_ppo_one_lora_step_in_bf16 PASSED   [ 10%]
tests/gpu/test_features_cuda.py::test_two_ranks_end_cleanly SKIPPED (two NCCL ranks need two GPUs) [ 20%]
tests/gpu/test_packed_attention_cuda.py::test_varlen[tiny-bf16] FAILED   [ 30%]
tests/gpu/test_user_path_cuda.py::test_the_run_trained_on_the_gpu[gpt2-bf16-zero2] PASSED [ 40%]
tests/gpu/test_user_path_cuda.py::test_the_run_trained_on_the_gpu[gpt2-bf16-zero2] ERROR [ 40%]
============================= slowest durations ==============================
12.31s call     tests/gpu/test_features_cuda.py::test_ppo_one_lora_step_in_bf16
1.02s setup    tests/gpu/test_user_path_cuda.py::test_the_run_trained_on_the_gpu[gpt2-bf16-zero2]
=========================== short test summary info ============================
SKIPPED [1] tests/gpu/test_features_cuda.py:241: two NCCL ranks need two GPUs
FAILED tests/gpu/test_packed_attention_cuda.py::test_varlen[tiny-bf16] - AssertionError
============= 1 failed, 2 passed, 1 skipped, 1 error in 30.00s ==============
"""


def test_each_case_recorded_and_the_cpu_switch_not_passed_on(monkeypatch):
    seen = {}

    def fake_run(command, **kwargs):
        seen.update(command=command, env=kwargs["env"])
        return subprocess.CompletedProcess(command, 1, OUTPUT, "")

    monkeypatch.setenv("PIPELINE_TEST_DEVICE", "cpu")
    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    result = gpu_check.cuda_tests(60)
    assert "PIPELINE_TEST_DEVICE" not in seen["env"]
    ran = [arg for arg in seen["command"] if arg.startswith(gpu_check.CUDA_TESTS + "/")]
    assert ran == result["files"] and ran[-1] == "tests/gpu/test_features_cuda.py"  # the user's path first
    assert {"tests/gpu/test_user_path_cuda.py", "tests/gpu/test_packed_attention_cuda.py"} < set(ran)
    assert result["status"] == "failed" and result["summary"].startswith("=====")
    assert result["cases"] == {
        "tests/gpu/test_features_cuda.py::test_ppo_one_lora_step_in_bf16": "passed",
        "tests/gpu/test_features_cuda.py::test_two_ranks_end_cleanly": "skipped",
        "tests/gpu/test_packed_attention_cuda.py::test_varlen[tiny-bf16]": "failed",
        "tests/gpu/test_user_path_cuda.py::test_the_run_trained_on_the_gpu[gpt2-bf16-zero2]": "error"}  # teardown
    assert result["slowest"] == [
        "12.31s call     tests/gpu/test_features_cuda.py::test_ppo_one_lora_step_in_bf16",
        "1.02s setup    tests/gpu/test_user_path_cuda.py::test_the_run_trained_on_the_gpu[gpt2-bf16-zero2]"]
    assert result["skipped"] == ["SKIPPED [1] tests/gpu/test_features_cuda.py:241: two NCCL ranks need two GPUs"]
    assert "tests/gpu/test_features_cuda.py" in result["files"]


def test_a_timeout_keeps_the_cases_that_ran(monkeypatch):
    def fake_run(command, **kwargs):
        raise subprocess.TimeoutExpired(command, kwargs["timeout"], output=OUTPUT.split("[ 30%]")[0].encode())

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    result = gpu_check.cuda_tests(60)
    assert result["status"] == "failed" and result["reason"] == "timed out after 60 s"
    assert list(result["cases"].values()) == ["passed", "skipped", "failed"]
