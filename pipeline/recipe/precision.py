"""Does `bf16: true` (or `pure_bf16: true`) fit this machine? A notice when a CPU without native bf16 would
emulate it; and which precision a run trains in (`precision`), the one place that reads the two keys together.

On a CPU without avx512_bf16 or AMX, torch runs bf16 matmuls in emulation: measured on such a CPU, one
LoRA step of a 4-layer gpt2-small-wide model took 49 s in bf16 against 0.9 s in fp32. Nothing is wrong
with the recipe (it is right for a GPU), so this is a notice, not an error: `plan`, `train --dry-run` and
the start of `train` print it, with what was detected, the cost and the key to change.

Detection reads /proc/cpuinfo (no torch: `plan` must not import it); PIPELINE_CPUINFO names another file
(tests use it to play a CPU without bf16). `measured_slowdown` times a matmul in both precisions for
the commands that have torch loaded anyway.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any, Mapping

from pipeline.errors import article

NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
PUBLISHED = ("measured on such a CPU: one LoRA step of a 4-layer gpt2-small-wide model took 49 s in bf16 "
             "against 0.9 s in fp32")


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags from /proc/cpuinfo (or PIPELINE_CPUINFO); None where there is no such file."""
    path = Path(os.environ.get("PIPELINE_CPUINFO", "/proc/cpuinfo"))
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm
            flags.update(value.split())
    return flags


def cpu_bf16() -> tuple[bool | None, str]:
    """(native bf16?, what was detected, in words). None: unknown (no cpuinfo, not x86)."""
    flags = cpu_flags()
    if flags is None:
        return None, f"no CPU flags readable on this {platform.system()} {platform.machine()} machine"
    native = sorted(f for f in NATIVE_BF16_FLAGS if f in flags)
    if native:
        return True, f"CPU flags {', '.join(native)}"
    if "bf16" in flags:  # aarch64 (Graviton 3, Neoverse V1 and later)
        return True, "CPU feature bf16"
    if not any(f.startswith(("avx", "sse")) for f in flags):
        return None, "a CPU whose flags this check does not know"
    return False, f"this CPU lacks {' and '.join(NATIVE_BF16_FLAGS)} in its flags"


def precision(r: Mapping[str, Any]) -> str:
    """How the run trains: "pure_bf16" (LLaMA-Factory's key: the model, its trainable parameters included, in bf16,
    stepped with bf16 optimizer states and no fp32 master copy: pipeline.recipe.dsconfig.bf16_section), "bf16" /
    "fp16" (mixed precision: DeepSpeed keeps fp32 masters), else "fp32"."""
    if r.get("pure_bf16"):
        return "pure_bf16"
    return "bf16" if r.get("bf16") else "fp16" if r.get("fp16") else "fp32"


def compute_bytes(r: Mapping[str, Any]) -> int:
    """Bytes per number of the dtype the model is built and computes in (pipeline.train.run.compute_dtype): 2 under
    bf16 / fp16 / pure_bf16, else 4; the frozen models a run holds beside it (ppo's reward model) are cast to it."""
    return 4 if precision(r) == "fp32" else 2


def weights_dtype(r: Mapping[str, Any]) -> str:
    """The dtype (pipeline.model.weights.DTYPES' name) the run's weights are trained, written (model/, a checkpoint's
    model/) and evaluated in: "bf16" under pure_bf16, where the bf16 weights are all there is (no fp32 master: fp32
    files would hold the same values at twice the size; LLaMA-Factory's Trainer saves them bf16), else "fp32" (the
    fp32 master weights of a bf16 / fp16 run, or the fp32 weights)."""
    return "bf16" if precision(r) == "pure_bf16" else "fp32"


def trained_dtype(r: Mapping[str, Any], adapter: bool) -> str:
    """The dtype a trained tensor is held and stepped in (its gradient and optimizer state too, where no master copy
    is kept): a LoRA / OFT adapter's own weights (`adapter`) are fp32 whatever the base's dtype, as PEFT's
    get_peft_model upcasts them (pipeline.model.adapter.upcast_adapter; LLaMA-Factory leaves that on, pure_bf16 too);
    every other tensor weights_dtype's (bf16 under pure_bf16: the modules an adapter trains in full beside it
    too)."""
    return "fp32" if adapter else weights_dtype(r)


def default_export_dtype(r: Mapping[str, Any]) -> str:
    """export_dtype when the recipe leaves it out: bf16 for the model/ of a pure_bf16 full / freeze run (its weights
    are bf16: fp32 would hold the same values at twice the size; LLaMA-Factory's export keeps the model's bf16), else
    the schema's fp32. A LoRA run's merge folds B A into W: the sum is no bf16 value, and fp32 keeps the model that
    trained (export_dtype: bf16, LLaMA-Factory's, rounds it, checked by merge)."""
    from pipeline.names import trains_adapter

    return "bf16" if precision(r) == "pure_bf16" and not trains_adapter(r.get("finetuning_type", "lora")) else "fp32"


def eval_precision(r: Mapping[str, Any], *, cuda: bool = False, training: bool = False) -> str:
    """How a held-out loss of this run is computed, in words for all_results.json (`training`: the eval_loss logged
    while it trains) and eval's report. pure_bf16: the bf16 weights without autocast, as the run trained and as
    LLaMA-Factory evaluates its bf16 model (a LoRA / OFT adapter on them in fp32, as it trained: trained_dtype).
    bf16 / fp16 while training: DeepSpeed's 16-bit copy of the fp32 masters
    (its module), no autocast; eval of a bf16 / fp16 run: the fp32 weights under autocast on CUDA, fp32 on a CPU."""
    from pipeline.names import trains_adapter

    kind = precision(r)
    if kind == "pure_bf16":
        adapter = " (the adapter fp32)" if trains_adapter(r.get("finetuning_type", "lora")) else ""
        return f"bf16 weights{adapter}, no autocast (pure_bf16, as trained)"
    if kind == "fp32":
        return "fp32"
    if training:
        return f"{kind} weights (DeepSpeed's copy of the fp32 masters), no autocast"
    return f"fp32 weights under {kind} autocast" if cuda else f"fp32 ({kind} autocast on CUDA only)"


def bf16_notice(r: Mapping[str, Any], *, cuda: bool, measured: str | None = None) -> str | None:
    """The notice for `bf16: true` or `pure_bf16: true` on a CPU that would emulate it, or None when bf16 fits (or
    is off)."""
    key = {"pure_bf16": "pure_bf16", "bf16": "bf16"}.get(precision(r))
    if key is None or cuda:
        return None
    native, detected = cpu_bf16()
    if native is not False:
        return None
    origin = getattr(r, "origin", None)  # as recipe.args.key_at, which imports this module's importers
    where = origin(key).names(key) if callable(origin) else key
    cost = f"{measured}; {PUBLISHED}" if measured else PUBLISHED
    return (f"notice: {where} is true, but no CUDA GPU was found and {detected}: bf16 is emulated here, "
            f"often 10-50x slower than fp32 ({cost}). For this machine set {key}: false (or add the override "
            f"{key}=false); keep {key}: true for GPUs that have it")


def measured_slowdown(size: int = 256, repeats: int = 3) -> str:
    """Time a size x size matmul in fp32 and bf16 on this CPU (best of `repeats`); a sentence for the notice."""
    import torch

    def best(dtype: Any) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times[1:])

    fp32, bf16 = best(torch.float32), best(torch.bfloat16)
    return (f"measured here just now: {article(str(size))} {size}x{size} matmul takes {bf16 * 1e3:.2f} ms in bf16 against "
            f"{fp32 * 1e3:.2f} ms in fp32, {bf16 / max(fp32, 1e-9):.1f}x")
