"""From a resolved recipe to a model: base weights, the recipe's overrides, the fine-tuning type.

finetuning_type decides what the optimizer sees:
  lora    every base weight frozen; LoRA on lora_target (+ additional_target modules trained in full)
  freeze  only the last freeze_trainable_layers blocks and the final norm ln_f train (embeddings and
          the tied head stay frozen: they hold most of GPT-2's parameters and its vocabulary knowledge)
  full    every weight trains
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.errors import UserError
from pipeline.model.config import PRESETS, GPTConfig, freeze_trainable_names, read_config
from pipeline.model.gpt import GPTModel
from pipeline.model.hub import resolve_model_path
from pipeline.model.lora import apply_lora, load_adapter, merge_lora
from pipeline.model.weights import load_model, note

KINDS = ("base", "adapter", "model", "merged")


def get_key(r: Mapping[str, Any], key: str, default: Any = None) -> Any:
    """Resolved fills every schema key; plain dicts in unit tests may leave some out."""
    try:
        value = r[key]
    except KeyError:
        return default
    return default if value is None else value


def recipe_config(r: Mapping[str, Any]) -> GPTConfig:
    """The base model's config with the recipe's overrides (null keeps the preset/checkpoint value)."""
    cfg = read_config(r["model_name_or_path"])
    changes: dict[str, Any] = {"drop_rate": float(get_key(r, "dropout", 0.0))}
    for key, field in (("context_length", "context_length"), ("qkv_bias", "qkv_bias"),
                       ("tie_word_embeddings", "tie_weights")):
        value = get_key(r, key)
        if value is not None:
            changes[field] = value
    return cfg.replace(**changes)


def load_base(r: Mapping[str, Any], *, dropout: bool = True) -> GPTModel:
    """The base model of the recipe (a preset starts from a seeded random init: say so on stderr)."""
    name = str(r["model_name_or_path"])
    cfg = recipe_config(r)
    if not dropout:
        cfg = cfg.replace(drop_rate=0.0)
    seed = int(get_key(r, "seed", 42))
    if name in PRESETS:
        note(f"model: preset '{name}' = random weights (seed {seed}); for OpenAI's trained GPT-2 set"
             " model_name_or_path to a directory with config.json + model.safetensors")
    return load_model(name, seed=seed, cfg=cfg)


def apply_finetuning_type(model: GPTModel, r: Mapping[str, Any]) -> GPTModel:
    """Freeze / inject per finetuning_type, and load adapter_name_or_path when set."""
    kind = get_key(r, "finetuning_type", "lora")
    adapter = get_key(r, "adapter_name_or_path")
    if kind == "lora":
        rank = int(get_key(r, "lora_rank", 8))
        apply_lora(model, get_key(r, "lora_target", "all"), rank=rank, alpha=get_key(r, "lora_alpha"),
                   dropout=float(get_key(r, "lora_dropout", 0.0)), use_rslora=bool(get_key(r, "use_rslora", False)),
                   seed=int(get_key(r, "seed", 42)), additional_targets=get_key(r, "additional_target"))
        if adapter:  # continue training an adapter: same rank/alpha required
            load_adapter(model, resolve_model_path(adapter, key="adapter_name_or_path"))
        return model
    if adapter:  # full/freeze on top of an adapter: fold it into the base first (as LLaMA-Factory does)
        load_adapter(model, resolve_model_path(adapter, key="adapter_name_or_path"))
        merge_lora(model)
    if kind == "freeze":
        model.requires_grad_(False)
        for name in freeze_trainable_names(model.cfg, int(get_key(r, "freeze_trainable_layers", 2))):
            model.get_submodule(name).requires_grad_(True)
    elif kind == "full":
        model.requires_grad_(True)
    else:
        raise UserError(f"finetuning_type: '{kind}' is not one of lora, full, freeze")
    return model


def build_model(r: Mapping[str, Any]) -> GPTModel:
    """The model `train` optimises: base weights + recipe overrides + fine-tuning type (on CPU, fp32)."""
    return apply_finetuning_type(load_base(r), r)


def load_for_inference(r: Mapping[str, Any], kind: str = "base", path: str | Path | None = None,
                       device: str | torch.device | None = None) -> GPTModel:
    """Weights for generate / eval / merge, in eval mode on `device` (CUDA when available).

    kind base: the recipe's base model; adapter: the base + the LoRA adapter at `path`; model or merged: the
    checkpoint at `path` (our format or the Hugging Face layout). Which weights are current is decided by
    pipeline.runtime.layout, not here.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "base":
        model = load_base(r, dropout=False)
    elif kind == "adapter":
        model = load_base(r, dropout=False)
        load_adapter(model, path)
    else:
        model = load_model(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()
