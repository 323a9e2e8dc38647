"""Model facts the recipe checks and `plan` need (layers, width, context, parameter counts), without torch.

A thin adapter over pipeline.model.config (read_config, count_params, trainable_tensors). When the model
cannot be read yet (e.g. a checkpoint an upstream recipe has still to produce), callers get None and skip
the check; the model stage reports a real problem when it loads the model.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.model.config import (GPTConfig, TensorSpec, built_params, context_limit, read_config,
                                   resized_vocab_size, trainable_tensors)
from pipeline.model.quant_layout import Quantization


@dataclass(frozen=True)
class ModelInfo:
    config: GPTConfig
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    context_length: int


def model_info(name_or_path: str | None) -> ModelInfo | None:
    """The model's shape, or None when it cannot be read here (not produced yet, missing, unreadable)."""
    if not name_or_path:
        return None
    try:
        cfg = read_config(_local(name_or_path))
    except Exception:  # noqa: BLE001 - any failure means "unknown here"; the model stage reports it properly
        return None
    return ModelInfo(config=cfg, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_embd=cfg.emb_dim,
                     vocab_size=cfg.vocab_size, context_length=cfg.context_length)


def stored_quantization(name_or_path: str | None) -> "Quantization | None":
    """The bitsandbytes quantization a pre-quantized checkpoint's files hold (config.json's quantization_config:
    pipeline.model.quant_layout.stored_quantization), or None: unquantized, another method, or not readable here."""
    from pipeline.model.config import config_path, read_raw
    from pipeline.model.quant_layout import stored_quantization as of_config

    if not name_or_path:
        return None
    try:
        path = config_path(_local(name_or_path))
        return of_config(read_raw(path).get("quantization_config")) if path is not None else None
    except Exception:  # noqa: BLE001 - as model_info: unknown here
        return None


def model_folder(name_or_path: str | None) -> Path | None:
    """The checkpoint folder of a path or cached hub snapshot, for the checks that read its weights; None when there
    is none here (a preset, a missing path, a snapshot not downloaded)."""
    if not name_or_path:
        return None
    try:
        folder = Path(_local(name_or_path))
    except Exception:  # noqa: BLE001 - as model_info: unknown here
        return None
    return folder if folder.is_dir() else None


def _local(name_or_path: str) -> str:
    """A hub id as its cached snapshot (checks and plan never download weights); anything else as given."""
    from pipeline.model.hub import is_hub_id, resolve_model_path

    return str(resolve_model_path(name_or_path, download=False)) if is_hub_id(name_or_path) else name_or_path


def scales_past_context(info: ModelInfo, rope_scaling: str | None, cutoff_len: int) -> bool:
    """Whether the model as the recipe builds it (the recipe key rope_scaling applied to the checkpoint's config,
    pipeline.model.rope_recipe) is dynamic NTK, whose rows may run past its context length (ModelConfig.dynamic_rope);
    False when the recipe's rope_scaling cannot apply (the rope_scaling rule says why)."""
    from pipeline.errors import UserError
    from pipeline.model.rope_recipe import recipe_rope

    try:
        return recipe_rope(info.config, rope_scaling, cutoff_len).config.dynamic_rope
    except UserError:
        return False


def recipe_length_limit(values: Mapping[str, Any], info: ModelInfo | None, dynamic: bool) -> int | None:
    """The longest row of the model the recipe trains (pipeline.model.config.context_limit): the recipe's
    context_length, else the checkpoint's; `dynamic`: the caller's reading of dynamic NTK (no bound). As far as
    known here: None for a model that cannot be read."""
    return context_limit(values.get("context_length") or (info.context_length if info else None), dynamic)


def looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith(".") or os.path.exists(name)


def recipe_tensors(values: Mapping[str, Any], info: ModelInfo) -> tuple[GPTConfig, list[TensorSpec]] | None:
    """The recipe's model config (its context_length, rm's score head, the vocabulary its added tokens grow) and the
    tensors its fine-tuning type trains, or None if unknown."""
    cfg = info.config
    if values.get("context_length"):
        cfg = cfg.replace(context_length=values["context_length"])
    if values.get("stage") == "rm":  # the score head in place of lm_head (pipeline.model.build.recipe_config)
        cfg = cfg.replace(num_labels=1)
    resize = bool(values.get("resize_vocab"))
    if (tokenizer := _new_tokens_tokenizer(values)) is not None:  # the embedding grows as model.build grows it
        cfg = cfg.replace(vocab_size=resized_vocab_size(cfg.vocab_size, tokenizer.n_vocab))
        resize = resize or bool(tokenizer.new_tokens)
    try:
        return cfg, trainable_tensors(cfg, values["finetuning_type"], values["lora_rank"], values["lora_target"],
                                      values["freeze_trainable_layers"], values.get("additional_target"),
                                      bool(values.get("use_dora")), resize_vocab=resize,
                                      use_llama_pro=bool(values.get("use_llama_pro")),
                                      freeze_modules=(values.get("freeze_trainable_modules", "all"),
                                                      values.get("freeze_extra_modules")),
                                      oft=(values.get("oft_rank", 0), values.get("oft_block_size", 32)))
    except Exception:  # noqa: BLE001 - e.g. a lora_target matching nothing: the rules report it, plan shows "?"
        return None


def param_counts(values: Mapping[str, Any], info: ModelInfo) -> tuple[int, int] | None:
    """(total parameters, trainable parameters) of the model the recipe's fine-tuning type builds (an adapter's own
    tensors included), or None if unknown."""
    found = recipe_tensors(values, info)
    if found is None:
        return None
    cfg, tensors = found
    return built_params(cfg, tensors), sum(t.numel for t in tensors)


def _new_tokens_tokenizer(values: Mapping[str, Any]) -> Any:
    """The recipe's tokenizer with its tokens added, when it adds some and the tokenizer is here (else None: then
    the counts are the checkpoint's vocabulary, as far as it is known)."""
    from pipeline.data.added_tokens import TokenNames

    try:
        return available_recipe_tokenizer(values) if TokenNames.of(values) else None
    except Exception:  # noqa: BLE001 - a malformed token key: the rules report it
        return None


def available_recipe_tokenizer(values: Mapping[str, Any]) -> Any:
    """The recipe's tokenizer (tokenizer_name_or_path, else model_name_or_path's) with its added tokens, when its
    files are here (pipeline.data.model_tokenizer.available_tokenizer); None otherwise (a preset without tokenizer, a
    model not produced or downloaded yet: the rules and the model stage report those)."""
    from types import SimpleNamespace

    from pipeline.data.added_tokens import TOKEN_KEYS
    from pipeline.data.model_tokenizer import available_tokenizer

    keys = ("model_name_or_path", "tokenizer_name_or_path", *TOKEN_KEYS)  # what a tokenizer source reads
    try:
        return available_tokenizer(SimpleNamespace(**{key: values.get(key) for key in keys}))
    except Exception:  # noqa: BLE001 - any failure means "unknown here"
        return None
