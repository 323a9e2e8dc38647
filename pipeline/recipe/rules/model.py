"""Rules on the model a run starts from: model_name_or_path exists (a preset, a folder, a hub id), model_revision,
adapter_name_or_path, and the context it gives (cutoff_len, context_length, rope_scaling).
"""
from __future__ import annotations

import json
import os

from pipeline.recipe.rules.core import Context, rule


@rule("model_name_or_path")
def model_exists(ctx: Context) -> list[tuple[str, str]]:
    """A bare name must be a preset; a missing path may be produced by an upstream recipe, so it is an error
    only for the commands that load the model now."""
    from pipeline.recipe.modelinfo import looks_like_path

    name = ctx.values["model_name_or_path"]
    try:
        from pipeline.model.config import read_config
    except ImportError:
        return []
    from pipeline.errors import UserError
    from pipeline.model.hub import is_hub_id, resolve_model_path

    if is_hub_id(name):  # fetched (or found in the HF cache) by the commands that load the model now
        if ctx.command in ("train", "merge", "eval", "generate"):
            try:
                name = str(resolve_model_path(name))
            except UserError as err:
                return [("model_name_or_path", m.removeprefix("model_name_or_path: ")) for m in err.messages]
        else:
            return []
    if looks_like_path(name) and not os.path.exists(name):
        if ctx.command in ("train", "merge", "eval", "generate"):
            return [("model_name_or_path", f"directory {name!r} not found; if another recipe produces it, "
                                           "run that one first")]
        return []
    try:
        read_config(name)
    except UserError as err:
        return [("model_name_or_path", m.removeprefix("model_name_or_path: ")) for m in err.messages]
    return []


@rule("model_revision", "model_name_or_path")
def main_revision_only(ctx: Context) -> list[tuple[str, str]]:
    """Every model lookup resolves refs/main; rather than load main while the recipe names another revision, point
    the user at the snapshot folder of the one they want (a directory works wherever a hub id does)."""
    revision, name = ctx.values["model_revision"], ctx.values["model_name_or_path"]
    if revision == "main":
        return []
    from pipeline.model.hub import cache_dir, download_command, is_hub_id

    if not is_hub_id(name):
        return [("model_revision", f"given {revision!r}, but model_name_or_path {name!r} is not a hub id (a "
                                   "directory or preset has no revisions): remove model_revision")]
    repo = cache_dir() / f"models--{name.replace('/', '--')}"
    ref = repo / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    unsupported = f"given {revision!r}: revisions other than main are not supported yet; "
    if snapshot.is_dir():
        return [("model_revision", f"{unsupported}it is in the HF cache: set model_name_or_path to its snapshot "
                                   f"folder, {snapshot}, and remove model_revision")]
    return [("model_revision", f"{unsupported}download it with `{download_command(name, revision)}` and set "
                               f"model_name_or_path to its snapshot folder, {repo / 'snapshots'}/<commit> (the "
                               f"commit is in {ref} once downloaded), then remove model_revision")]


@rule("adapter_name_or_path", commands=("train", "merge", "eval", "generate"))
def adapter_exists(ctx: Context) -> list[tuple[str, str]]:
    path = ctx.values["adapter_name_or_path"]
    return [] if path is None else adapter_folder_problems("adapter_name_or_path", path)


def adapter_folder_problems(key: str, path: str) -> list[tuple[str, str]]:
    """An adapter folder recipe key `key` names (a folder or a hub id, fetched here) must hold adapter_config.json:
    the check every key that loads an adapter (adapter_name_or_path, ref_model_adapters) makes alike."""
    from pipeline.errors import UserError
    from pipeline.model.hub import resolve_model_path

    try:
        path = str(resolve_model_path(path, key=key))
    except UserError as err:
        return [(key, m.removeprefix(f"{key}: ")) for m in err.messages]
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return [(key, f"{path!r} holds no adapter_config.json; expected an adapter directory (LoRA or OFT: e.g. "
                      "saves/<recipe>/adapter)")]
    return []


@rule("adapter_name_or_path", "finetuning_type", commands=("train",))
def adapter_is_the_method(ctx: Context) -> list[tuple[str, str]]:
    """train under lora / oft continues adapter_name_or_path with the recipe's method (pipeline.model.lora.load_adapter
    loads it into the recipe's adapter modules): a LoRA adapter under oft, or an OFT one under lora, would otherwise
    stop train after the model is built, naming the adapter's file but not the recipe's key. full / freeze fold
    either into the base; merge / eval / generate load the adapter as its own config says (LLaMA-Factory's merge
    and inference recipes leave finetuning_type at lora for an OFT adapter too). A missing or unreadable
    adapter_config.json is adapter_exists's (or the load's) to say."""
    from pipeline.names import trains_adapter

    path, kind = ctx.values["adapter_name_or_path"], ctx.values["finetuning_type"]
    if path is None or not trains_adapter(kind):
        return []
    try:
        from pipeline.model.hub import resolve_model_path

        folder = resolve_model_path(path, key="adapter_name_or_path", download=False)  # adapter_exists fetched it
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        theirs = str(config.get("peft_type", "LORA")) if isinstance(config, dict) else None
    except Exception:  # missing, unreadable: adapter_exists or the load says so
        return []
    method = {"LORA": "lora", "OFT": "oft"}.get(theirs)
    if method is None or method == kind:
        return []
    named = {"lora": "a LoRA", "oft": "an OFT"}
    return [("adapter_name_or_path", f"given {path!r}, {named[method]} adapter (peft_type {theirs} in its "
                                     f"adapter_config.json), but finetuning_type is {kind}, which continues "
                                     f"{named[kind].split()[-1]} adapters only; set finetuning_type: {method} to "
                                     "continue it (or full / freeze to fold it into the base model)")]


@rule("cutoff_len", "context_length", "model_name_or_path")
def cutoff_within_context(ctx: Context) -> list[tuple[str, str]]:
    context = ctx.values["context_length"]
    if context is None:
        from pipeline.recipe.modelinfo import model_info

        info = model_info(ctx.values["model_name_or_path"])
        context = info.context_length if info else None
    if context is not None and ctx.values["cutoff_len"] > context:
        return [("cutoff_len", f"given {ctx.values['cutoff_len']}, expected at most {context} (the model's "
                               "context length); lower cutoff_len or raise context_length")]
    return []


@rule("rope_scaling", "context_length", "cutoff_len", "model_name_or_path")
def rope_scaling_applies(ctx: Context) -> list[tuple[str, str]]:
    """rope_scaling sets the context length itself (window x factor), so an explicit one contradicts it; dynamic
    NTK and a model without rotary positions are refused with the reason (pipeline.model.rope_recipe)."""
    kind = ctx.values["rope_scaling"]
    if kind is None:
        return []
    if ctx.origins["context_length"].kind in ("file", "cli"):
        where = ctx.origins["context_length"].where
        return [("rope_scaling", f"given {kind!r} together with context_length {ctx.values['context_length']} (at "
                                 f"{where}): rope_scaling derives the context length from cutoff_len (window x "
                                 "ceil(cutoff_len / window)); remove context_length, or rope_scaling")]
    from pipeline.errors import UserError
    from pipeline.model.rope_recipe import recipe_rope
    from pipeline.recipe.modelinfo import model_info

    info = model_info(ctx.values["model_name_or_path"])
    try:
        recipe_rope(info.config, kind, ctx.values["cutoff_len"]) if info else None
    except UserError as err:
        return [("rope_scaling", m.removeprefix("rope_scaling: ")) for m in err.messages]
    return []
