"""The export of a wrapped checkpoint (pipeline.model.families.Wrapper: Gemma3ForConditionalGeneration's Gemma 3
decoder inside a vision tower and a projector): what save_hf writes around the decoder so that transformers loads the
wrapper again, and the vision side is the source's, unchanged.

Only the decoder is ever read and trained here; the other towers never leave the source checkpoint. So the export
takes from the source (`model_name_or_path`, the checkpoint the run started from):

- every tensor of the other towers, read as stored (dtype and bytes kept), under the source's names;
- config.json, with its text config replaced by the decoder's as trained (the family's keys over the source's, the
  ones the wrapper keeps at its top level there too); architectures, the vision config and the rest kept;
- the wrapper's own files (the image processor's), beside the tokenizer files merge copies as for any checkpoint.

The decoder's tensors are written under the source's spelling: the hub's files and transformers 5's save_pretrained
say language_model.model.*, the module tree (and PEFT) model.language_model.*; transformers reads either.

A folder of our own format (a full / freeze run's output_dir/model) holds the decoder, and, for a wrapped model, the
rest of its source in WRAPPER_DIR (carry): the source's config.json, the other towers' tensors as stored, the
wrapper's own files and the spelling of the source's decoder names. So the folder is a source as good as the
checkpoint it came from: a next recipe starting from it (model_name_or_path: saves/run/model) merges or exports the
whole image-text checkpoint. The towers are copied, not pointed at: the folder stays whole when the source checkpoint
moves, changes or leaves the hub cache, or the folder is copied to another machine, for the price of the towers'
bytes (a few percent of the decoder's: Gemma 3 4B's SigLIP tower and projector are 0.84 GB in bf16 beside the 4B
decoder's 15.5 GB in fp32).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.errors import UserError, article
from pipeline.io import write_json
from pipeline.model.families import WRAPPERS, Family, Wrapper, wrapper_of
from pipeline.model.safetensors_header import shard_files

WRAPPER_DIR = "wrapper"  # in a folder of our own format: the rest of a wrapped model's source (carry)
TOWERS = "towers.safetensors"  # there: the other towers' tensors, as the source stores them
SPELLING = "spelling.json"  # there: how the source spells the decoder's tensor names (source_names)


@dataclass(frozen=True)
class Source:
    """What an export around a wrapped model takes from its source: the folder holding the wrapper's own files, its
    config.json, the files holding the other towers' tensors (a checkpoint's shards: the decoder's tensors are there
    too, and passed over) and the alias pairs (module tree's prefix, the source's) its decoder names are spelled in."""

    folder: Path
    raw: dict[str, Any]
    tensors: list[Path]
    spelling: tuple[tuple[str, str], ...]


def source_of(wrapper: Wrapper, source: str | Path | None) -> Source:
    """The wrapped source at `source`: a checkpoint of this wrapper, or a folder of our own format that carries one
    (WRAPPER_DIR); a UserError when it is neither (the other towers are in the checkpoint training started from)."""
    from pipeline.model.config import FORMAT, read_raw

    folder = Path(source) if source is not None else None
    raw = read_raw(folder / "config.json") if folder is not None and (folder / "config.json").is_file() else {}
    if folder is not None and wrapper_of(raw) is wrapper:
        files = shard_files(folder)
        keys = [key for file in files for key in _keys(file)]
        return Source(folder, raw, files, spelling(wrapper.family_of(), keys))
    carried = folder / WRAPPER_DIR if folder is not None else None
    inner = read_raw(carried / "config.json") if carried is not None and (carried / "config.json").is_file() else {}
    if carried is not None and wrapper_of(inner) is wrapper:
        pairs = json.loads((carried / SPELLING).read_text(encoding="utf-8"))
        return Source(carried, inner, [carried / TOWERS], tuple((new, old) for new, old in pairs))
    ours = " (a folder of our own format written without the rest of its source: its text decoder alone)" \
        if raw.get("format") == FORMAT else ""
    raise UserError(f"export: {article(wrapper.architecture)} {wrapper.architecture} is written around its source checkpoint (its vision tower"
                    f" and config come from there), and {folder or 'none'} is no {wrapper.architecture}"
                    f" checkpoint{ours}; set model_name_or_path to the checkpoint the run started from")


def _keys(file: Path) -> list[str]:
    with safe_open(file, framework="pt") as handle:
        return list(handle.keys())


def spelling(family: Family, keys: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """(the module tree's prefix, the source's) for each alias the source's tensor names use (the hub's
    language_model.model.* for model.language_model.*); empty where the source spells them as the module tree."""
    used = {family.alias_of(k) for k in keys} - {None}
    return tuple((new, old) for old, new in family.aliases if (old, new) in used)


def source_names(pairs: Iterable[tuple[str, str]]) -> Callable[[str], str]:
    """A canonical HF tensor name -> the spelling the source's files use (`pairs`: spelling's)."""
    older = list(pairs)

    def name(hf: str) -> str:
        pair = next(((new, old) for new, old in older if hf.startswith(new)), None)
        return pair[1] + hf[len(pair[0]):] if pair else hf
    return name


def carried_tensors(family: Family, src: Source) -> dict[str, torch.Tensor]:
    """The other towers' tensors of the source, as stored (no cast: bit for bit), under the source's names."""
    carried: dict[str, torch.Tensor] = {}
    for file in src.tensors:
        with safe_open(file, framework="pt") as handle:
            carried.update((key, handle.get_tensor(key)) for key in handle.keys() if family.is_carried(key))
    return carried


def copy_wrapper_files(wrapper: Wrapper, src: Source, directory: Path) -> None:
    """The wrapper's own files (the image processor's) the source has, into `directory`."""
    for file in wrapper.files:
        if (src.folder / file).is_file():
            shutil.copyfile(src.folder / file, directory / file)


def carry(cfg: Any, source: str | Path | None, directory: Path) -> None:
    """directory/WRAPPER_DIR for a folder of our own format holding a wrapped model's decoder: the rest of its source
    (a checkpoint of the wrapper, or a folder of ours that carries one): config.json, the towers (TOWERS), the
    wrapper's own files and the decoder names' spelling (SPELLING), so that the folder exports the whole model.
    A source that carries none (a folder of ours written before folders carried it) leaves the folder the decoder
    alone, as it was: training goes on, and an export from it says what to name instead (source_of)."""
    wrapper = WRAPPERS[cfg.wrapper]
    try:
        src = source_of(wrapper, source)
    except UserError:
        return
    target = directory / WRAPPER_DIR
    target.mkdir()
    write_json(target / "config.json", src.raw)
    save_file(carried_tensors(cfg.hf, src), str(target / TOWERS), metadata={"format": "pt"})
    write_json(target / SPELLING, [list(pair) for pair in src.spelling])
    copy_wrapper_files(wrapper, src, target)


def wrapped_config(wrapper: Wrapper, text: Mapping[str, Any], source: Mapping[str, Any], dtype: str) -> dict[str, Any]:
    """The source's config.json with the decoder's config.json keys (`text`, as the causal LM's export has them)
    as its text config, over the source's own there."""
    decoder = {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype")}
    if wrapper.text_model_type:
        decoder["model_type"] = wrapper.text_model_type
    inner = source.get(wrapper.text_config)
    out = dict(source)
    if isinstance(inner, dict) or not wrapper.flat_text:
        inner = dict(inner or {})
        out[wrapper.text_config] = {**inner, **decoder, **wrapper.multimodal_rope(inner, decoder)}
    if wrapper.flat_text:  # the text keys the source holds at its top level (all of them without a text config)
        flat = {**decoder, **wrapper.multimodal_rope(source, decoder)}
        out.update({k: v for k, v in flat.items() if k != "model_type" and (inner is None or k in source)})
    out.update({key: text[key] for key, _ in wrapper.top_level if key in text})
    out.update({key: dtype for key in ("torch_dtype", "dtype") if key in source or key == "torch_dtype"})
    return out


def around(cfg: Any, state: dict[str, torch.Tensor], config: dict[str, Any], source: str | Path | None,
           directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """save_hf's tensors and config.json for a wrapped model: the decoder's `state` (canonical names) renamed as
    the source spells them, the other towers' tensors added, the source's config.json around `config`; the
    wrapper's own files copied into `directory`. The source is a checkpoint of the wrapper or a folder of our own
    format that carries one (carry)."""
    wrapper = WRAPPERS[cfg.wrapper]
    src = source_of(wrapper, source)
    name = source_names(src.spelling)
    copy_wrapper_files(wrapper, src, directory)
    return ({**{name(k): v for k, v in state.items()}, **carried_tensors(cfg.hf, src)},
            wrapped_config(wrapper, config, src.raw, str(config.get("torch_dtype", "float32"))))
