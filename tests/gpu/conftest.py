"""Where the CUDA-only tests run: the `device` fixture.

Without a CUDA GPU the tests that take `device` are skipped, saying why (bench/gpu_check.py records the reason),
so the CPU suite spends nothing on them. PIPELINE_TEST_DEVICE=cpu runs them on the CPU instead, with the CUDA
devices hidden from every command they start: a check of the tests themselves (their recipes, launches and
goldens) on a machine without a GPU, before a lent one runs them. The older files of this folder (the varlen kernel,
the user's path under DeepSpeed fp16) need CUDA itself and keep their own skip.
"""
from __future__ import annotations

import os

import pytest

VARIABLE = "PIPELINE_TEST_DEVICE"
SKIP_REASON = "needs a CUDA GPU (bench/gpu_check.sh; PIPELINE_TEST_DEVICE=cpu runs it on the CPU)"


@pytest.fixture(scope="session")
def device() -> str:
    """"cuda", or "cpu" under PIPELINE_TEST_DEVICE=cpu; the test is skipped when neither is at hand."""
    chosen = os.environ.get(VARIABLE, "")
    if chosen not in ("", "cuda", "cpu"):
        raise pytest.UsageError(f"{VARIABLE}={chosen!r}: expected cpu or cuda")
    if chosen == "cpu":
        return "cpu"
    import torch

    if not torch.cuda.is_available():
        pytest.skip(SKIP_REASON)
    return "cuda"


@pytest.fixture(scope="session")
def device_env(device: str) -> dict[str, str]:
    """The environment of a command a test starts (tests.acceptance.harness.cli_env): on the CPU no CUDA device is
    visible to it, so that it runs where the test's goldens are computed."""
    from tests.acceptance.harness import cli_env

    return cli_env(**({"CUDA_VISIBLE_DEVICES": ""} if device == "cpu" else {}))
