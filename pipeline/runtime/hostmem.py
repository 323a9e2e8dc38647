"""Host memory that training frees goes back to the system (glibc malloc on Linux; elsewhere nothing).

Why: on a CPU torch allocates every tensor with malloc. glibc serves a request from its heaps unless it is
at least the mmap threshold, and that threshold is dynamic: each time a block served by mmap is freed, it
rises to that block's size (up to 32 MiB). After the first forward has freed one activation (3-13 MB each
for gpt2-small at 2,048 positions), every later activation of that size comes from a heap, and a heap
hands freed space back to the kernel only from its top: the middle stays resident, fragmented, and the
next step's activations land beside it. Measured on the checkpointing benchmark (gpt2-small, 4 packed rows
of 512, bf16 LoRA, bench/README.md): with gradient checkpointing the steps raised the RSS 345 MB above
its level before the first step, of which ~200 MB was freed-but-resident heap; with a fixed 1 MiB
threshold (the first setting) they raised it by ~160 MB, the activations themselves (on the attention path of that day;
bench/README.md has the current figure).

`tune_malloc` fixes the threshold (mallopt M_MMAP_THRESHOLD, which also turns the dynamic rise off): a
block of 4 MiB or more is a mapping of its own, returned to the kernel the moment it is freed. Smaller
blocks (Python objects, shapes, LoRA's rank-16 intermediates, per-head pieces) keep the heaps. The cost is
the kernel zeroing and mapping the pages of every new large activation instead of reusing resident ones.
Why 4 MiB: measured on the idle machine, paired runs of the checkpointing benchmark (lead, 2026-12-03
19:15): a 1 MiB threshold gave the lowest peak (~878 MB) but cost 1.29x the step time (every 1-4 MiB
intermediate faulted in fresh), 4 MiB peaked at ~930 MB for no measurable step time (12.5-13.7 s against
12.3-14.4 s with glibc's default, which peaked at ~1,000-1,090 MB), 16 MiB at ~1,015 MB. So `train` sets it only when
the recipe checkpoints (disable_gradient_checkpointing: false): there the user has chosen memory over
speed (recomputing every block already costs ~1.3x the step time), and without it the faster reuse of
resident heap is kept.

`release_freed` calls malloc_trim(0) once the model and engine are built, whatever the recipe: it returns
what the build left free inside the heaps (DeepSpeed's set-up, the data loader's temporaries; 16 MB on
the benchmark), once, before the steps.

Both are process-wide settings of the C library; they never change a computed value. Where the C library
is not glibc (macOS, musl) they do nothing: other allocators have their own policies and no such calls.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 4 << 20  # 4 MiB: the large activations (MLP, q|k|v, logit blocks); glibc's default starts at 128 KiB


@functools.lru_cache(maxsize=1)
def _glibc() -> ctypes.CDLL | None:
    """The running glibc, or None (another C library or OS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (only glibc has it; musl does not)
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    return libc


def tune_malloc(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve blocks of `threshold` bytes or more by their own mappings from now on; True when applied."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1)


def release_freed() -> bool:
    """Hand the free space inside glibc's heaps back to the kernel; True when some was returned."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0) == 1)
