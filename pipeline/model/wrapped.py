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
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
from safetensors import safe_open

from pipeline.errors import UserError
from pipeline.model.families import WRAPPERS, Family, Wrapper, wrapper_of
from pipeline.model.safetensors_header import shard_files


def source_of(wrapper: Wrapper, source: str | Path | None) -> tuple[Path, dict[str, Any]]:
    """(the source directory, its config.json) once it is a checkpoint of this wrapper; a UserError when it is not
    (our own format holds the decoder alone: the other towers are only in the checkpoint training started from)."""
    from pipeline.model.config import read_raw

    folder = Path(source) if source is not None else None
    raw = read_raw(folder / "config.json") if folder is not None and (folder / "config.json").is_file() else {}
    if folder is None or wrapper_of(raw) is not wrapper:
        raise UserError(f"export: a {wrapper.architecture} is written around its source checkpoint (its vision tower"
                        f" and config come from there), and {folder or 'none'} is no {wrapper.architecture}"
                        " checkpoint; set model_name_or_path to the checkpoint the run started from (a folder of our"
                        " own format holds the text decoder alone)")
    return folder, raw


def source_names(family: Family, keys: Iterable[str]) -> Callable[[str], str]:
    """A canonical HF tensor name -> the spelling the source's files use: an alias's old prefix where the source
    spells its tensors so (the hub's language_model.model.*), else the name as it is."""
    keys = list(keys)
    used = {family.alias_of(k) for k in keys} - {None}
    older = [(new, old) for old, new in family.aliases if (old, new) in used]

    def name(hf: str) -> str:
        pair = next(((new, old) for new, old in older if hf.startswith(new)), None)
        return pair[1] + hf[len(pair[0]):] if pair else hf
    return name


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
    wrapper's own files copied into `directory`."""
    wrapper = WRAPPERS[cfg.wrapper]
    folder, raw = source_of(wrapper, source)
    family = cfg.hf
    keys: list[str] = []
    carried: dict[str, torch.Tensor] = {}  # the other towers' tensors as stored (no cast: bit for bit)
    for file in shard_files(folder):
        with safe_open(file, framework="pt") as handle:
            for key in handle.keys():
                keys.append(key)
                if family.is_carried(key):
                    carried[key] = handle.get_tensor(key)
    name = source_names(family, keys)
    for file in wrapper.files:
        if (folder / file).is_file():
            shutil.copyfile(folder / file, directory / file)
    return ({**{name(k): v for k, v in state.items()}, **carried},
            wrapped_config(wrapper, config, raw, str(config.get("torch_dtype", "float32"))))
