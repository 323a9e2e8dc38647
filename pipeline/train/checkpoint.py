"""Resumable checkpoints: `checkpoint-<step>/` appears complete or not at all, and is verified before use.

    checkpoint-<step>/
      manifest.json         sha256 and size of every other file (written last)
      trainer_state.json    step, data position (epoch, batch index), tokens seen, the recipe values resume needs
      adapter/              lora: adapter_config.json + adapter_model.safetensors (PEFT layout, fp32)
      model/                full/freeze: config.json + model.safetensors (usable as model_name_or_path)
      deepspeed/            DeepSpeed's own state, per rank: optimizer / ZeRO partitions with the fp32 masters,
                            LR scheduler, loss scaler, step counters (trainable weights only)
      rng/rank-<r>.safetensors   torch, python and numpy RNG states of every rank

DeepSpeed's `save_checkpoint` / `load_checkpoint` do the per-stage work, through
`pipeline.train.safestate`'s checkpoint engine, so the files under deepspeed/ are safetensors (with DeepSpeed's
`.pt` names) and loading never unpickles. All ranks write into `.checkpoint-<step>.tmp/`; rank 0 writes the
manifest and renames the directory. A crash before the rename leaves only the temp directory, removed by
the next run. `latest` takes the newest checkpoint whose manifest matches its files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.errors import UserError
from pipeline.io import sha256_file, write_json
from pipeline.runtime import deepspeed_compat
from pipeline.runtime import dist

FORMAT = "pipeline-checkpoint"
VERSION = 1
PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
DS_TAG = "deepspeed"
RNG_DIR = "rng"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Recipe values a checkpoint is bound to: with another value the saved state cannot be loaded, or the data
# position would point at other batches.
RESUME_KEYS = ("stage", "finetuning_type", "lora_rank", "lora_target", "use_rslora", "additional_target",
               "freeze_trainable_layers", "zero_stage", "bf16", "fp16", "world_size", "per_device_train_batch_size",
               "gradient_accumulation_steps", "seed", "cutoff_len", "packing", "neat_packing")


@dataclass
class TrainState:
    """Where training stands: restored on resume, so the next batch is the one an uninterrupted run takes."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (the same on every rank)
    tokens_seen: int = 0  # all ranks, attention-mask tokens
    trained_tokens_seen: int = 0  # all ranks, tokens with a label
    skipped_batches: int = 0  # non-finite losses dropped under nan_policy: skip

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in data.items() if k in names})


# ---------------------------------------------------------------------------------------------- listing

def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-<step> directories, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def problems_with(path: str | Path) -> list[str]:
    """Why a checkpoint directory cannot be used ([] when its manifest matches its files)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{path / MANIFEST} is missing (the checkpoint was not finished)"]
    except (OSError, ValueError) as err:
        return [f"{path / MANIFEST} is unreadable ({err})"]
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return [f"{path / MANIFEST} is not a {FORMAT} manifest"]
    if manifest.get("version") != VERSION:
        return [f"{path / MANIFEST} has version {manifest.get('version')!r}; this trainer reads version {VERSION}"]
    problems = []
    for rel, info in sorted(manifest.get("files", {}).items()):
        file = path / rel
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != info.get("bytes"):
            problems.append(f"{file} has {file.stat().st_size} bytes, the manifest says {info.get('bytes')}")
        elif sha256_file(file) != info.get("sha256"):
            problems.append(f"{file} does not match its sha256 in the manifest (corrupted or modified)")
    if STATE not in manifest.get("files", {}):
        problems.append(f"{path / STATE} is not listed in the manifest")
    return problems


def read_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- resume

def where(r: Mapping[str, Any], key: str) -> str:
    """`recipes/x.yaml:12: key` when the value came from a file or the command line, else `key`."""
    source = getattr(r, "source", None)
    origin = source(key) if source is not None else "default"
    return f"{origin}: {key}" if origin not in ("default", "derived") else key


def find_resume(r: Mapping[str, Any]) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); a UserError when it cannot be used."""
    value = r["resume_from_checkpoint"]
    if value is None:
        return None
    at = where(r, "resume_from_checkpoint")
    output_dir = Path(r["output_dir"])
    if value == "latest":
        candidates = list_checkpoints(output_dir)
        if not candidates:
            raise UserError(f"{at}: 'latest', but {output_dir} holds no checkpoint-<step>/ directory; remove "
                            "resume_from_checkpoint to start a new run")
        damaged: list[str] = []
        for path in reversed(candidates):
            problems = problems_with(path)
            if not problems:
                if damaged and dist.is_main():
                    print(f"warning: skipped damaged checkpoints: {'; '.join(damaged)}; resuming from {path}",
                          file=sys.stderr)
                return path
            damaged.append(f"{path.name} ({problems[0]})")
        raise UserError(f"{at}: 'latest', but every checkpoint in {output_dir} is damaged: {'; '.join(damaged)}")
    path = Path(value)
    if not path.exists():
        available = ", ".join(p.name for p in list_checkpoints(output_dir)) or "none"
        raise UserError(f"{at}: {value!r} does not exist (checkpoints in {output_dir}: {available}; "
                        "'latest' picks the newest)")
    problems = problems_with(path)
    if problems:
        raise UserError([f"{at}: {path} cannot be resumed from: {p}" for p in problems])
    return path


def check_compatible(r: Mapping[str, Any], path: Path) -> None:
    """The recipe must agree with the checkpoint on what the saved state depends on."""
    if read_state(path).get("save_only_model"):
        weights = path / ("adapter" if (path / "adapter").is_dir() else "model")
        raise UserError(f"{where(r, 'resume_from_checkpoint')}: {path} was saved with save_only_model: true: it "
                        "holds the weights only, without the optimizer, scheduler and RNG state a resume needs, so "
                        f"resuming from it is refused. Start a new run from its weights ({weights} as "
                        f"{'adapter_name_or_path' if weights.name == 'adapter' else 'model_name_or_path'}), or "
                        "train with save_only_model: false to get resumable checkpoints")
    saved = read_state(path).get("recipe", {})
    problems = [f"{where(r, key)} is {json.dumps(r[key])} but {path} was trained with {json.dumps(saved[key])}; "
                f"resume with the same value (or start a new run from {path}/adapter or {path}/model)"
                for key in RESUME_KEYS if key in saved and saved[key] != r[key]]
    if problems:
        raise UserError(problems)


# ---------------------------------------------------------------------------------------------- RNG

def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- save / load

def attach(engine: Any) -> None:
    """Prepare a DeepSpeed engine for these checkpoints.

    Its checkpoint engine becomes the safetensors one (never pickle). Its module_state_dict learns to leave
    out frozen weights reached through a second name: DeepSpeed drops frozen parameters by their first name
    only, so a frozen tied output head (lm_head.weight = wte.weight) was written into every LoRA checkpoint.
    """
    from pipeline.train.safestate import load_state, save_state

    deepspeed_compat.use_checkpoint_engine(engine, deepspeed_compat.checkpoint_engine(save_state, load_state))
    deepspeed_compat.exclude_frozen_aliases(engine)


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Belt and braces: any torch.load DeepSpeed might still reach runs with weights_only=True."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _fsync_tree(root: Path) -> None:
    for path in _files(root):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def save(engine: Any, r: Mapping[str, Any], state: TrainState, exporter: Any) -> Path:
    """Write checkpoint-<step>/ (every rank must call this). Returns its path."""
    from pipeline.train.safestate import save_state

    output_dir = Path(r["output_dir"])
    final = output_dir / f"{PREFIX}{state.global_step}"
    tmp = output_dir / f".{final.name}.tmp"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    only_model = bool(r.get("save_only_model"))
    if not only_model:  # save_only_model: the weights only (no optimizer, scheduler, RNG): not resumable
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False,
                               exclude_frozen_parameters=True)
        save_state(_rng_state(), tmp / RNG_DIR / f"rank-{dist.rank()}.safetensors")
    exporter.write(tmp)
    dist.barrier()
    if dist.is_main():
        for script in deepspeed_compat.HELPER_SCRIPTS:  # DeepSpeed's helpers cannot read these files
            (tmp / script).unlink(missing_ok=True)
        write_json(tmp / STATE, {**state.to_dict(), "recipe": {k: r[k] for k in RESUME_KEYS if k in r},
                                 **({"save_only_model": True} if only_model else {})})
        files = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in _files(tmp)}
        write_json(tmp / MANIFEST, {"format": FORMAT, "version": VERSION, "step": state.global_step, "files": files})
        _fsync_tree(tmp)
        if final.exists():  # a re-run reaching the same step replaces the old checkpoint in one rename
            old = output_dir / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        prune(output_dir, r["save_total_limit"], keep=final)
    dist.barrier()
    return final


def prune(output_dir: Path, limit: int | None, keep: Path) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit` (never `keep`); returns what was removed."""
    if not limit:
        return []
    checkpoints = [p for p in list_checkpoints(output_dir) if p != keep]
    doomed = checkpoints[: max(0, len(checkpoints) + 1 - limit)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def load(engine: Any, path: Path) -> TrainState:
    """Restore DeepSpeed's state, this rank's RNG and the data position (every rank must call this)."""
    from pipeline.train.safestate import StateFileError, load_state

    try:
        with _weights_only_loads():
            loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise UserError(f"{path}/{DS_TAG}: DeepSpeed found no state to load; the checkpoint is incomplete")
        rng_file = path / RNG_DIR / f"rank-{dist.rank()}.safetensors"
        if not rng_file.is_file():
            raise UserError(f"{rng_file} is missing: the checkpoint was written by fewer ranks")
        _set_rng_state(load_state(rng_file))
    except StateFileError as err:
        raise UserError(f"{err.path}: {err.reason}; this trainer writes and reads only its own safetensors state, "
                        f"so {path} cannot be resumed from. Resume from another checkpoint "
                        "(resume_from_checkpoint: <output_dir>/checkpoint-<step>), or start over with "
                        "overwrite_output_dir: true") from None
    return TrainState.from_dict(read_state(path))


def clean_stale(output_dir: str | Path) -> None:
    """Tidy up after a run killed while saving (rank 0).

    Temp directories go. A `.checkpoint-<step>.old` is the previous copy of a checkpoint being replaced
    (see save): if the kill fell between its two renames, `checkpoint-<step>` is missing and the .old copy,
    when it passes its manifest, is put back instead of deleted.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return
    for path in root.glob(f".{PREFIX}*.tmp"):
        shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(f".{PREFIX}*.old"):
        final = root / path.name[1:].removesuffix(".old")
        if step_of(final) is not None and not final.exists() and not problems_with(path):
            os.replace(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)
