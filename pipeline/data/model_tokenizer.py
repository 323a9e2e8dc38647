"""The tokenizer of a model: a GPT-2 preset, a checkpoint directory, or a hub id (resolved offline-first).

Apart from pipeline.data.tokenizer (the Tokenizer itself) because finding a model's tokenizer needs the
model's presets and the hub (pipeline.model.config, pipeline.model.hub), and pipeline.model.config needs
the Tokenizer: kept in one module, the two would import each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from pipeline.data.tokenizer import Tokenizer, gpt2
from pipeline.data.tokenizer_files import read_tokenizer
from pipeline.errors import UserError
from pipeline.model.config import PRESETS


class HasModel(Protocol):
    """An argument group that names the base model (DataArgs, ModelArgs)."""

    @property
    def model_name_or_path(self) -> str: ...


def is_gpt2_preset(name: str) -> bool:
    """True for "gpt2" and the presets of the GPT-2 family (pipeline.model.config.PRESETS)."""
    if name == "gpt2":
        return True
    cfg = PRESETS.get(name)
    return cfg is not None and getattr(cfg, "family", "gpt2") == "gpt2"


def load_tokenizer(model_name_or_path: str | Path) -> Tokenizer:
    """The tokenizer of a model: a GPT-2 preset, a checkpoint directory, or a hub id (resolved offline-first)."""
    name = str(model_name_or_path)
    if is_gpt2_preset(name):
        return gpt2()
    path = Path(name)
    if not path.is_dir():
        if name in PRESETS:
            raise UserError(f"model_name_or_path: preset '{name}' has no tokenizer (presets are shapes with random "
                            "weights); point model_name_or_path at a checkpoint directory or hub id of this family")
        from pipeline.model.hub import resolve_model_path

        path = resolve_model_path(name)
    return read_tokenizer(path)


def recipe_tokenizer(args: HasModel) -> Tokenizer:
    """The tokenizer of the recipe's base model (model_name_or_path of a DataArgs or ModelArgs)."""
    return load_tokenizer(args.model_name_or_path)


def available_tokenizer(args: HasModel) -> Tokenizer | None:
    """The recipe's tokenizer when the model's files are on this machine; None for a hub id not yet cached.

    `build` and `validate` run before a hub model is downloaded (a user checks the data first, and the weights
    can be gigabytes): their token statistics are then left out rather than computed with another model's
    tokenizer, and the commands that load the model (train, eval, ...) fetch it or say what to run.
    """
    from pipeline.model.hub import is_hub_id, resolve_model_path

    name = str(args.model_name_or_path)
    if is_hub_id(name):
        try:
            return load_tokenizer(resolve_model_path(name, download=False))
        except UserError:
            return None
    return load_tokenizer(name)
