"""safetensors files read without torch (validate and plan import none): each tensor's shape from the header, and
whether a tensor's bytes are all zero, and the files of a checkpoint folder (one file or an index of shards). safetensors' layout: an 8-byte little-endian header size, the JSON header
({key: {dtype, shape, data_offsets}}, offsets from the end of the header), then the data."""
from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO, Iterable

from pipeline.errors import UserError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# Pickled weights a download may hold instead of safetensors, named (never opened) when there is no safetensors:
# transformers' pytorch_model*.bin, *.pt / *.pth, Meta's original/consolidated.00.pth
PICKLED = ("*.bin", "*.pt", "*.pth", "original/*.pth")


def index_shards(index: Path) -> list[str]:
    """The shard file names a model.safetensors.index.json's weight_map lists, sorted, each once."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{index}: not a valid safetensors index ({err!r}); expected {{\"weight_map\": {{key: file}}}}")


def shard_files(directory: Path) -> list[Path]:
    """The safetensors files a checkpoint folder's weights are read from, as transformers picks them:
    model.safetensors, else the shards model.safetensors.index.json lists. Any other *.safetensors beside them (the
    hub's Mistral consolidated.safetensors) is never opened."""
    if (directory / SINGLE).is_file():
        return [directory / SINGLE]
    index = directory / INDEX
    if index.is_file():
        names = index_shards(index)
        missing = [n for n in names if not (directory / n).is_file()]
        if missing:
            raise UserError([f"{index}: lists shard '{n}', which is missing from {directory}" for n in missing])
        return [directory / n for n in names]
    pickled = [p.relative_to(directory).as_posix() for pattern in PICKLED for p in sorted(directory.glob(pattern))]
    hint = (f" ({', '.join(pickled)} are pickled weights, which this pipeline never loads; convert them to"
            " safetensors, or download model.safetensors from the hub)") if pickled else ""
    raise UserError(f"{directory}: no {SINGLE} (nor {INDEX}){hint}")


def safetensors_shapes(file: Path) -> dict[str, list[int]]:
    """Each tensor's shape from a safetensors file's header (safetensors' own reader: no tensor data is read);
    {} when the file is missing or not safetensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="numpy") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError):
        return {}


def nonzero_tensors(file: Path, keys: Iterable[str]) -> set[str]:
    """Which of `keys` in the safetensors `file` hold a non-zero byte (any dtype: a zero tensor written by torch has
    every bit clear), each read only up to its first non-zero byte. OSError / ValueError / KeyError on a file that
    is not what its header says."""
    wanted, found = set(keys), set()
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        for key in wanted & header.keys():
            begin, end = header[key]["data_offsets"]
            if _any_set(handle, 8 + size + begin, 8 + size + end):
                found.add(key)
    return found


def _any_set(handle: BinaryIO, start: int, end: int, chunk: int = 1 << 24) -> bool:
    """Whether any byte of handle[start:end] is non-zero, read a chunk at a time up to the first one."""
    handle.seek(start)
    while start < end:
        block = handle.read(min(chunk, end - start))
        if not block:
            raise ValueError("safetensors file shorter than its header says")
        if block.count(0) != len(block):
            return True
        start += len(block)
    return False
