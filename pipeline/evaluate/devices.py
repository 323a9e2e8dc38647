"""Where and in which precision eval's forward passes run: shared by the held-out evaluation (pipeline.evaluate.run)
and the multiple-choice benchmarks (pipeline.evaluate.choice), so both compute as the run trained."""
from __future__ import annotations

import torch

from pipeline.recipe.args import EvalArgs


def device() -> torch.device:
    """This rank's CUDA device when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def autocast(ev: EvalArgs, device: torch.device):
    """bf16/fp16 compute on CUDA when the recipe trains that way; fp32 otherwise (CPU evaluation)."""
    dtype = torch.bfloat16 if ev.bf16 else torch.float16 if ev.fp16 else None
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None and device.type == "cuda")
