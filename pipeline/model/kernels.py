"""The matrix product behind every Linear of the model, chosen for decoding on a CPU.

torch computes an fp32 nn.Linear on x86 CPUs with MKL's sgemm. On AMD CPUs MKL takes a slow generic path,
and decoding is exactly its worst case: a few rows (the batch) against a large weight. Measured side by side
in one process on this project's AMD EPYC (bench/README.md, generation): oneDNN's fp32 inner product -- the
kernel torch itself uses for bf16 Linears and for fp32 Linears compiled by inductor -- ran the
2048 x 128256 output head of the Llama-3.2-1B shape 4.2x faster at batch 8 (2x at batch 2), the block
Linears 2.5-3x faster at batch 8, and a 384-token prompt 1.4x faster; with one row (batch-1 decoding) MKL's
matrix-vector product is as fast, so one row stays on F.linear. Same fp32 inputs, fp32 accumulation
and fp32 result; only the order of the additions differs (logits within ~1e-5 of MKL's: greedy tokens are the
same unless two candidates tie to that precision).

oneDNN's op has no autograd formula, so it runs only under torch.inference_mode (our generate): training,
evaluation with grad, other dtypes and devices keep F.linear.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn


@lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """torch built with oneDNN (x86 and ARM wheels) and its dense-input fp32 linear op present."""
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Inference mode, CPU, fp32, and at least 2 rows: one row (batch-1 decoding) is a matrix-vector product,
    where MKL's gemv is as fast or faster (measured: 0.93x-1.2x for oneDNN on the Llama shape's Linears, and
    a fixed cost of ~10 ms per call on small weights)."""
    return (torch.is_inference_mode_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and x.numel() >= 2 * x.shape[-1] and onednn_linear_available())


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by oneDNN where use_onednn says so."""
    if use_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and init) whose product is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
