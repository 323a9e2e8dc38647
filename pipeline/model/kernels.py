"""The matrix product behind every Linear of the model, chosen for decoding on a CPU.

torch computes an fp32 nn.Linear on x86 CPUs with MKL's sgemm. On AMD CPUs MKL takes a slow generic path,
and decoding is exactly its worst case: a few rows (the batch) against a large weight. Measured side by side
in one process on this project's AMD EPYC (bench/README.md, generation): oneDNN's fp32 inner product -- the
kernel torch itself uses for bf16 Linears and for fp32 Linears compiled by inductor -- ran the
2048 x 128256 output head of the Llama-3.2-1B shape 4.2x faster at batch 8 (2x at batch 2), the block
Linears 2.5-3x faster at batch 8, and a 384-token prompt 1.4x faster. With one row (batch-1 decoding) the
product is a matrix-vector one, memory-bound: MKL's runs it on one thread, oneDNN's on all of them, which
pays once the weight is large (idle Zen 3 EPYC, 2 threads: the output heads 1.6-1.8x, the Llama shape's MLP
1.6-1.7x, GPT-2's 768 x 2304 and 768 x 3072 1.2x) and loses on small ones that sit in cache (768 x 768
0.85x) or on one thread (0.74-1.14x). So one row takes oneDNN only for weights of ONE_ROW_MIN_WEIGHT elements
or more and more than one thread. Same fp32 inputs, fp32 accumulation and fp32 result; only the order of the
additions differs (logits within ~1e-5 of MKL's: greedy tokens are the same unless two candidates tie to
that precision).

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


ONE_ROW_MIN_WEIGHT = 1_500_000  # elements (6 MB fp32): below, one row stays on MKL's gemv (see above)


def use_onednn(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Inference mode, CPU, fp32; at least 2 rows, or one row (batch-1 decoding, a matrix-vector product)
    against a weight large enough for oneDNN's threads to pay (measured above)."""
    if not (torch.is_inference_mode_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and onednn_linear_available()):
        return False
    return x.numel() >= 2 * x.shape[-1] or (weight.numel() >= ONE_ROW_MIN_WEIGHT and torch.get_num_threads() > 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias), by oneDNN where use_onednn says so."""
    if use_onednn(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, state dict and init) whose product is `linear` above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
