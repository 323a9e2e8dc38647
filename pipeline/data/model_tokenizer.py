"""The tokenizer of a model: a GPT-2 preset, a checkpoint directory, or a hub id (resolved offline-first).

Apart from pipeline.data.tokenizer (the Tokenizer itself) because finding a model's tokenizer needs the
model's presets and the hub (pipeline.model.config, pipeline.model.hub), and pipeline.model.config needs
the Tokenizer: kept in one module, the two would import each other.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Protocol

from pipeline.data.tokenizer import Tokenizer, gpt2
from pipeline.data.tokenizer_files import read_tokenizer, saved_split_special_tokens
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


def load_tokenizer(model_name_or_path: str | Path, key: str = "model_name_or_path") -> Tokenizer:
    """The tokenizer of a model: a GPT-2 preset, a checkpoint directory, or a hub id (resolved offline-first).

    `key` is the recipe key that named it, for the messages."""
    name = str(model_name_or_path)
    if is_gpt2_preset(name):
        return gpt2()
    if name in PRESETS:
        family = getattr(PRESETS[name], "family", "")
        raise UserError(f"{key}: preset '{name}' has no tokenizer (presets are shapes with random weights); set "
                        f"tokenizer_name_or_path to a checkpoint directory or hub id of the {family} family whose "
                        f"tokenizer to use (e.g. {PRESET_TOKENIZER_EXAMPLE.get(family, 'ORG/NAME')}), or point "
                        "model_name_or_path at a checkpoint")
    path = Path(name)
    if not path.is_dir():
        from pipeline.model.hub import resolve_model_path

        path = resolve_model_path(name, key=key)
        if not path.is_dir():
            raise UserError(f"{key}: directory '{name}' not found; if another recipe produces it, run that one "
                            "first")
    return read_tokenizer(path)


# A hub id named in the message about a preset of each family (its checkpoints share one vocabulary).
PRESET_TOKENIZER_EXAMPLE = {"llama": "meta-llama/Llama-3.2-1B", "qwen2": "Qwen/Qwen2.5-0.5B",
                            "qwen3": "Qwen/Qwen3-0.6B", "qwen3_moe": "Qwen/Qwen3-30B-A3B"}
PRESET_TOKENIZER_EXAMPLE.update(mixtral="mistralai/Mixtral-8x7B-v0.1", qwen2_moe="Qwen/Qwen1.5-MoE-A2.7B")
PRESET_TOKENIZER_EXAMPLE["gemma3"] = "google/gemma-3-1b-it"
PRESET_TOKENIZER_EXAMPLE.update(granite="ibm-granite/granite-3.3-8b-instruct", olmo2="allenai/OLMo-2-1124-7B")
PRESET_TOKENIZER_EXAMPLE.update(mistral="mistralai/Mistral-7B-v0.1", glm4="THUDM/GLM-4-9B-0414",
                                # phi-4 and Phi-4-mini have different vocabularies: the preset's own
                                phi3="microsoft/phi-4 for phi-4, microsoft/Phi-4-mini-instruct for phi-4-mini")
PRESET_TOKENIZER_EXAMPLE["gpt_oss"] = "openai/gpt-oss-20b"  # -20b and -120b: one vocabulary (o200k_harmony)
PRESET_TOKENIZER_EXAMPLE["glm4_moe"] = "zai-org/GLM-4.5-Air"
PRESET_TOKENIZER_EXAMPLE["deepseek_v3"] = ("deepseek-ai/DeepSeek-V3 for deepseek-v3, moonshotai/Moonlight-16B-A3B for "
                                           "moonlight-16b-a3b")  # two vocabularies


def _source(args: HasModel) -> tuple[str, str]:
    """(name, the key that names it) of a DataArgs / ModelArgs group's tokenizer."""
    named = getattr(args, "tokenizer_name_or_path", None)
    return (str(named), "tokenizer_name_or_path") if named else (str(args.model_name_or_path), "model_name_or_path")


def recipe_tokenizer(args: HasModel) -> Tokenizer:
    """The recipe's tokenizer: tokenizer_name_or_path of a DataArgs (pipeline.recipe.deps.tokenizer_source), else the
    tokenizer of the base model (model_name_or_path of a DataArgs or ModelArgs), with the group's
    add_tokens and new_special_tokens added (every stage encodes and decodes with the same ids)."""
    return with_new_tokens(load_tokenizer(*_source(args)), args)


def with_new_tokens(tokenizer: Tokenizer, args: object) -> Tokenizer:
    """`tokenizer` with the tokens of an argument group (DataArgs, ModelArgs) added (pipeline.data.added_tokens),
    and with split_special_tokens every special token literal in user text (Tokenizer.split_special)."""
    from pipeline.data.added_tokens import TokenNames, group_value

    names = TokenNames.of(args)
    tokenizer = tokenizer.with_tokens(names.plain, names.special)
    return tokenizer.split_special() if group_value(args, "split_special_tokens") else tokenizer


def checkpoint_split_special_tokens(values: Mapping[str, Any]) -> tuple[Path, bool] | None:
    """(the folder, its value) where the tokenizer a recipe's values name (tokenizer_name_or_path, else
    model_name_or_path: a checkpoint directory, or a hub id's cached snapshot) has split_special_tokens in its
    tokenizer_config.json: a run's export with the key, or a tokenizer saved by LLaMA-Factory with it. None for a
    preset, a model not here (yet) and a file without the key (or unreadable: the command that loads the tokenizer
    says why). pipeline.recipe.resolve gives it to a recipe that does not write the key, as AutoTokenizer takes the
    file's value where from_pretrained is given none."""
    from pipeline.model.hub import is_hub_id, resolve_model_path

    name = values.get("tokenizer_name_or_path") or values.get("model_name_or_path")
    if not isinstance(name, str) or is_gpt2_preset(name) or name in PRESETS:
        return None
    try:
        path = resolve_model_path(name, download=False) if is_hub_id(name) else Path(name)
        saved = saved_split_special_tokens(path) if path.is_dir() else None
    except UserError:
        return None
    return None if saved is None else (path, saved)


def available_tokenizer(args: HasModel) -> Tokenizer | None:
    """The recipe's tokenizer when its files are on this machine; None for a hub id not yet cached, or a model
    directory that does not exist yet and that no recipe next to this one produces.

    `build` and `validate` run before a hub model is downloaded (a user checks the data first, and the weights
    can be gigabytes) and before an upstream recipe has trained: their token statistics are then left out
    rather than computed with another model's tokenizer, and the commands that load the model (train, eval,
    ...) fetch it or say what to run.
    """
    from pipeline.model.hub import is_hub_id, resolve_model_path

    name, key = _source(args)
    if is_hub_id(name):
        try:
            tokenizer = load_tokenizer(resolve_model_path(name, key=key, download=False), key)
        except UserError:
            return None
    elif name not in PRESETS and name != "gpt2" and not Path(name).exists():
        return None
    else:
        tokenizer = load_tokenizer(name, key)
    return with_new_tokens(tokenizer, args)
