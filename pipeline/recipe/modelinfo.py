"""Model facts the recipe checks and `plan` need (layers, width, context, parameter counts), without torch.

A thin adapter over pipeline.model.config (read_config, count_params, trainable_params); when that
module or the model is not available yet (e.g. a checkpoint produced by an upstream recipe), callers
get None and skip the check.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class ModelInfo:
    config: Any  # pipeline.model.config.GPTConfig
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int
    context_length: int


def _field(cfg: Any, *names: str) -> int:
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return int(value)
    raise AttributeError(names[0])


def presets() -> list[str] | None:
    try:
        from pipeline.model.config import PRESETS
    except ImportError:
        return None
    return list(PRESETS)


def model_info(name_or_path: str | None) -> ModelInfo | None:
    """The model's shape, or None when it cannot be read here (not built yet, missing, model code absent)."""
    if not name_or_path:
        return None
    try:
        from pipeline.model.config import read_config
    except ImportError:
        return None
    try:
        cfg = read_config(name_or_path)
        return ModelInfo(
            config=cfg,
            n_layer=_field(cfg, "n_layer", "n_layers", "num_hidden_layers"),
            n_head=_field(cfg, "n_head", "n_heads", "num_attention_heads"),
            n_embd=_field(cfg, "n_embd", "emb_dim", "hidden_size"),
            vocab_size=_field(cfg, "vocab_size"),
            context_length=_field(cfg, "context_length", "block_size", "n_positions", "n_ctx"),
        )
    except Exception:  # noqa: BLE001 - any failure means "unknown here"; the model stage reports it properly
        return None


def looks_like_path(name: str) -> bool:
    return os.sep in name or "/" in name or name.startswith(".") or os.path.exists(name)


def param_counts(values: Mapping[str, Any], info: ModelInfo) -> tuple[int, int] | None:
    """(total parameters, trainable parameters) for the recipe's fine-tuning type, or None if unknown."""
    try:
        from pipeline.model.config import count_params, trainable_params
    except ImportError:
        return None
    cfg = info.config
    if values.get("context_length"):
        try:
            import dataclasses

            cfg = dataclasses.replace(cfg, **{_ctx_name(cfg): values["context_length"]})
        except (TypeError, ValueError):
            pass
    try:
        total = int(count_params(cfg))
        trainable = int(trainable_params(cfg, values["finetuning_type"], values["lora_rank"], values["lora_target"],
                                         values["freeze_trainable_layers"], values.get("additional_target")))
    except Exception:  # noqa: BLE001
        return None
    return total, trainable


def _ctx_name(cfg: Any) -> str:
    for name in ("context_length", "block_size", "n_positions", "n_ctx"):
        if hasattr(cfg, name):
            return name
    raise ValueError("no context field")
