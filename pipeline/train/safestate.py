"""Training state without pickle: tensors in a safetensors file, the structure around them as JSON.

DeepSpeed's `engine.save_checkpoint` / `load_checkpoint` know how to save and restore every ZeRO stage's
optimizer partitions, loss scaler and counters, but they write pickles (`torch.save`) and read them
back with `torch.load(weights_only=False)`, which runs arbitrary code from a tampered file. Instead of
re-implementing DeepSpeed's checkpoint logic, `pipeline.runtime.deepspeed_compat.checkpoint_engine` plugs
`save_state` / `load_state` into its checkpoint-engine interface: every state dict DeepSpeed hands it is stored as one safetensors file whose header holds the
JSON structure (dicts, lists, numbers, strings, and a short allowlist of DeepSpeed classes rebuilt from
their attributes). Loading never unpickles; an unknown class is refused. The files keep DeepSpeed's
names (`*_model_states.pt`, `*_optim_states.pt`) because its loader looks for them by name.
"""
from __future__ import annotations

import enum
import importlib
import json
import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

from pipeline.errors import article
from pipeline.runtime import deepspeed_compat

STRUCTURE_KEY = "pipeline.structure"
FORMAT_KEY = "pipeline.format"
FORMAT = "pipeline-safestate-1"

# Classes DeepSpeed puts into its state dicts, rebuilt from their attributes (never by unpickling).
ALLOWED_OBJECTS = set(deepspeed_compat.STATE_CLASSES)
ALLOWED_ENUMS = set(deepspeed_compat.STATE_ENUMS)


def _qualname(obj_type: type) -> str:
    return f"{obj_type.__module__}.{obj_type.__qualname__}"


def _allowed_class(name: str, allowed: set[str]) -> type:
    if name not in allowed:
        raise ValueError(f"checkpoint refers to class {name!r}, which is not on the allowlist of loadable classes")
    module, _, attr = name.rpartition(".")
    return getattr(importlib.import_module(module), attr)


class _Encoder:
    """Walks a state dict: tensors go to `self.tensors`, everything else becomes tagged JSON."""

    def __init__(self) -> None:
        self.tensors: dict[str, Any] = {}
        self._storages: set[tuple[int, int]] = set()

    def tensor(self, value: Any) -> dict[str, Any]:
        value = value.detach().to("cpu")
        storage = value.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        # safetensors refuses tensors that share memory; copy views and repeats (rare, small).
        if key in self._storages or storage.nbytes() != value.numel() * value.element_size():
            value = value.clone()
        else:
            self._storages.add(key)
        name = f"t{len(self.tensors)}"
        self.tensors[name] = value.contiguous()
        return {"$t": "tensor", "k": name}

    def __call__(self, value: Any) -> Any:
        import torch

        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, enum.Enum):
            name = _qualname(type(value))
            _allowed_class(name, ALLOWED_ENUMS)
            return {"$t": "enum", "cls": name, "v": value.value}
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return value if math.isfinite(value) else {"$t": "float", "v": repr(value)}
        if isinstance(value, torch.Tensor):
            return self.tensor(value)
        if isinstance(value, torch.Size):
            return {"$t": "size", "v": list(value)}
        if isinstance(value, torch.dtype):
            return {"$t": "dtype", "v": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$t": "device", "v": str(value)}
        if isinstance(value, dict):
            items = [[self(k), self(v)] for k, v in value.items()]
            return {"$t": "odict" if isinstance(value, OrderedDict) else "dict", "v": items}
        if isinstance(value, list):
            return [self(v) for v in value]
        if isinstance(value, tuple):
            return {"$t": "tuple", "v": [self(v) for v in value]}
        if isinstance(value, (set, frozenset)):
            return {"$t": "set", "v": [self(v) for v in sorted(value, key=repr)]}
        name = _qualname(type(value))
        if name in ALLOWED_OBJECTS:
            return {"$t": "obj", "cls": name, "v": self(dict(vars(value)))}
        raise TypeError(f"cannot store {article(name)} {name} in a checkpoint without pickle; add it to "
                        "pipeline.train.safestate.ALLOWED_OBJECTS if it is plain data")


def _decode(value: Any, tensors: dict[str, Any]) -> Any:
    import torch

    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    tag, payload = value.get("$t"), value.get("v")
    if tag == "tensor":
        return tensors[value["k"]]
    if tag in ("dict", "odict"):
        pairs = [(_decode(k, tensors), _decode(v, tensors)) for k, v in payload]
        return OrderedDict(pairs) if tag == "odict" else dict(pairs)
    if tag == "tuple":
        return tuple(_decode(v, tensors) for v in payload)
    if tag == "set":
        return {_decode(v, tensors) for v in payload}
    if tag == "float":
        return float(payload)
    if tag == "size":
        return torch.Size(payload)
    if tag == "dtype":
        dtype = getattr(torch, payload, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"checkpoint names an unknown dtype {payload!r}")
        return dtype
    if tag == "device":
        return torch.device(payload)
    if tag == "enum":
        return _allowed_class(value["cls"], ALLOWED_ENUMS)(payload)
    if tag == "obj":
        cls = _allowed_class(value["cls"], ALLOWED_OBJECTS)
        obj = cls.__new__(cls)
        obj.__dict__.update(_decode(payload, tensors))
        return obj
    raise ValueError(f"checkpoint structure has an unknown tag {tag!r}")


def save_state(obj: Any, path: str | Path) -> None:
    """Write `obj` (nested dicts/lists of tensors and plain values) to one safetensors file.

    save_file writes each tensor from its own memory. safetensors' `save` (bytes) built the whole file in
    memory first: a second copy of the optimizer state at every checkpoint, which took full fine-tuning of
    a 0.6B model from 9 GB to past 24 GB at its first save (docs/output-layout.md).
    """
    from safetensors.torch import save_file

    encoder = _Encoder()
    structure = encoder(obj)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # inside a checkpoint's temp directory, which is renamed when complete
    save_file(encoder.tensors, str(path), metadata={FORMAT_KEY: FORMAT,
                                                    STRUCTURE_KEY: json.dumps(structure, allow_nan=False)})


class StateFileError(ValueError):
    """A file that is not a readable `save_state` file (damaged, or planted: a pickle, another format)."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def load_state(path: str | Path, map_location: Any = None) -> Any:
    """Read a file written by `save_state`; tensors land on `map_location` when it is a device (else CPU).

    Each tensor is read through a handle of its own. On the CPU safetensors hands out views of one mapping
    of the whole file, which lives as long as any of them: DeepSpeed copies the optimizer state into its
    own buffers but keeps a few small loaded tensors (the step counts), and through them every page of the
    file stayed resident for the rest of the run (gpt2-small resumed: 0.6 GB above a fresh run).
    Whatever is wrong with the file surfaces as one StateFileError naming it.
    """
    import torch
    from safetensors import SafetensorError, safe_open

    device = map_location if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as handle:
            meta = handle.metadata() or {}
            if meta.get(FORMAT_KEY) != FORMAT:
                raise StateFileError(path, f"not a pipeline state file (no {FORMAT_KEY}={FORMAT} in its header)")
            keys = list(handle.keys())
        tensors = {}
        for key in keys:
            with safe_open(str(path), framework="pt", device=str(device)) as own:
                tensors[key] = own.get_tensor(key)
        return _decode(json.loads(meta[STRUCTURE_KEY]), tensors)
    except StateFileError:
        raise
    except (SafetensorError, ValueError, KeyError, TypeError) as err:  # not safetensors / a bad structure
        raise StateFileError(path, f"not a readable pipeline state file ({err})") from None
