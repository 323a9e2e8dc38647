"""Where the weights live in memory: large CPU tensors on transparent huge pages (2 MiB) where Linux offers them.

Why: decoding on a CPU reads every weight once per token, and the output head alone is 0.5-1 GB in fp32
(128-152k rows): memory traffic is most of a step. torch's allocator hands out anonymous memory in 4 KiB pages
(it asks for huge pages only under the environment variable THP_MEM_ALLOC_ENABLE, read once at import), and
with the usual `madvise` setting of /sys/kernel/mm/transparent_hugepage/enabled the kernel gives none unless
asked. Streaming 1 GB through 262,144 small pages costs a TLB miss and a page walk every 4 KiB. Measured
side by side in one process (MKL's kernel, the 2048 x 128256 head of the Llama-3.2-1B shape at batch 8, load
4-9): from such memory the head ran 9% slower than from the safetensors file's page-cache pages (which is
where transformers' weights live when no dtype conversion is needed), and level with them from 2 MiB pages;
whole cached generation went from 0.97x to 1.07x transformers' with the weights moved to huge pages.

So wherever loading has to allocate a weight anyway (a bf16 checkpoint converted to fp32, a transposed
GPT-2 Conv1D), the copy goes into a private anonymous mapping advised MADV_HUGEPAGE, sized to whole huge
pages (Linux 6.7+ aligns such mappings on 2 MiB; older kernels still back the aligned part). The tensor is an ordinary dense CPU tensor over that mapping
(torch.frombuffer keeps the mapping alive as long as the tensor): same values, same strides, so every
kernel computes bit-for-bit what it computed before. Elsewhere (no madvise, THP `never`, small tensors,
other devices) the ordinary allocation is kept.
"""
from __future__ import annotations

import mmap
from functools import lru_cache
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@lru_cache(maxsize=1)
def huge_pages_available() -> bool:
    """True where an madvise'd anonymous mapping can get transparent huge pages (Linux, THP not `never`)."""
    if not hasattr(mmap, "MADV_HUGEPAGE") or not hasattr(mmap, "MAP_ANONYMOUS"):
        return False
    try:
        setting = THP_SETTING.read_text()
    except OSError:
        return False
    return "[never]" not in setting


def huge_page_empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised dense CPU tensor in its own mapping advised for 2 MiB pages."""
    numel = torch.Size(shape).numel()
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    mapping = mmap.mmap(-1, max(HUGE_PAGE, -(-nbytes // HUGE_PAGE) * HUGE_PAGE),
                        flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mapping.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the pages are faulted in huge
    return torch.frombuffer(mapping, dtype=dtype, count=numel).view(shape)


def dense_weight(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` as a dense tensor of `dtype`: itself when it already is one (no copy: a safetensors tensor stays
    the file's page-cache mapping), else a copy, on huge pages when it is a CPU tensor of at least 2 MiB."""
    if tensor.dtype == dtype and tensor.is_contiguous():
        return tensor
    nbytes = tensor.numel() * torch.empty((), dtype=dtype).element_size()
    if tensor.device.type != "cpu" or nbytes < HUGE_PAGE or not huge_pages_available():
        return tensor.to(dtype).contiguous()
    out = huge_page_empty(tensor.shape, dtype)
    out.copy_(tensor)
    return out
