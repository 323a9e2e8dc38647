"""Rules on the model a run starts from: model_name_or_path exists (a preset, a folder, a hub id), model_revision,
adapter_name_or_path (there, its method, its tensors fitting the model), and the context it gives (cutoff_len,
context_length, rope_scaling).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pipeline.errors import article
from pipeline.recipe.rules.core import Context, rule

# The commands that load model_name_or_path and adapter_name_or_path now: each must exist (or be fetched) before
# anything loads; validate / plan / the others leave a missing one to the upstream recipe that make builds first.
LOADS_MODEL_NOW = ("train", "merge", "eval", "generate", "chat", "export")


def written_by(ctx: Context, path: str) -> str:
    """` (recipes/sft.yaml writes it: run `make train RECIPE=recipes/sft.yaml` (python -m pipeline train
    recipes/sft.yaml) first)` when a recipe in scope (pipeline.recipe.siblings, make's upstream search) writes `path`,
    else "": what a message about a folder that is not there yet adds (pipeline.model.hub.missing_here). The
    upstream's command carries none of this command's overrides: they set this recipe's values (its output_dir ...),
    and make runs an upstream with ARGS= too. Where the upstream's output_dir holds its finished run and `path` is
    gone from it all the same (its adapter/ or checkpoint-<step> deleted), the command is rerun.train_again's, the
    python -m form with --retrain-finished (typed.finished_here), without which train refuses that output_dir;
    make's form would say "Nothing to be done" (its train stamp is current)."""
    from pipeline.recipe.siblings import output_dir_of, producer, run_checkpoint, unsaved_step
    from pipeline.recipe.typed import finished_here
    from pipeline.rerun import make_runs_here, run_this, train_again

    found = producer(Path(ctx.recipe_file), path)
    if found is None:
        return ""
    recipe, goal = found
    step = run_checkpoint(path, recipe) if goal == "train" else None
    why = unsaved_step(recipe, step) if step is not None else None
    if why:  # make does not train it for this (pipeline.recipe.deps._upstream)
        return (f" (a checkpoint of {recipe}'s run, which saves no step {step}: {why}; name a checkpoint-<step> "
                "that is there, or its final adapter/)")
    out = output_dir_of(recipe)
    if finished_here(goal, str(recipe), {"output_dir": out}):
        make = "; `make train` leaves a finished run as it is until the recipe or its ARGS change" \
            if make_runs_here() else ""
        return (f" ({recipe} writes it, and its finished run in {out} is there without it: run "
                f"{train_again(str(recipe))} first{make})")
    return f" ({recipe} writes it: run {run_this(goal, str(recipe))} first)"


def loads_model_now(ctx: Context) -> bool:
    """Whether this command loads model_name_or_path and adapter_name_or_path now. Not export without export_dir:
    export refuses that recipe first (pipeline.merge.export_run), and `make export` runs it before the upstreams
    that would make those folders, so a missing one is no mistake to report there."""
    return ctx.command in LOADS_MODEL_NOW and not (ctx.command == "export" and not ctx.values["export_dir"])


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
    from pipeline.model.hub import is_hub_id, missing_here, resolve_model_path

    if is_hub_id(name):  # fetched (or found in the HF cache) by the commands that load the model now
        if loads_model_now(ctx):
            try:
                name = str(resolve_model_path(name, writer=written_by(ctx, name)))
            except UserError as err:
                return [("model_name_or_path", m.removeprefix("model_name_or_path: ")) for m in err.messages]
        else:
            return []
    if looks_like_path(name) and not os.path.exists(name):
        if loads_model_now(ctx):
            return [("model_name_or_path", missing_here(name, written_by(ctx, name)))]
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
    from pipeline.model.hub import cache_dir, download_command, is_hub_id, local_only

    if not is_hub_id(name) or local_only(name):  # models/gpt2: never `hf download models/gpt2 --revision ...`
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


@rule("adapter_name_or_path")
def adapter_exists(ctx: Context) -> list[tuple[str, str]]:
    """The commands that load the adapter now (export too: a merge recipe naming a run not trained yet) need its
    folder; validate and plan check it where it exists (see folders_to_check)."""
    path = ctx.values["adapter_name_or_path"]
    paths = folders_to_check([] if path is None else [path], loads_model_now(ctx))
    return [problem for path in paths for problem in adapter_folder_problems(ctx, "adapter_name_or_path", path)]


def folders_to_check(paths: list[str], loads_now: bool) -> list[str]:
    """The adapter folders a rule checks: every one for a command that loads them now; else only those that exist,
    as a missing one may be an upstream recipe's output that make builds first (and a hub id, no existing path, is
    never downloaded by validate or plan)."""
    return paths if loads_now else [path for path in paths if os.path.exists(path)]


def adapter_folder_problems(ctx: Context, key: str, path: str) -> list[tuple[str, str]]:
    """An adapter folder recipe key `key` names (a folder or a hub id, fetched here) must be there and hold
    adapter_config.json: the check every key that loads an adapter (adapter_name_or_path, ref_model_adapters)
    makes alike."""
    from pipeline.errors import UserError
    from pipeline.model.hub import missing_here, resolve_model_path

    writer = written_by(ctx, path)
    try:
        path = str(resolve_model_path(path, key=key, writer=writer))
    except UserError as err:
        return [(key, m.removeprefix(f"{key}: ")) for m in err.messages]
    if not os.path.exists(path):
        return [(key, f"{missing_here(path, writer)}; expected an adapter directory (LoRA or OFT: "
                      f"e.g. saves/<recipe>/adapter){pissa_converted_hint(path)}")]
    if not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return [(key, f"{path!r} holds no adapter_config.json; expected an adapter directory (LoRA or OFT: e.g. "
                      "saves/<recipe>/adapter)")]
    return []


def pissa_converted_hint(path: str) -> str:
    """Where a run of this pipeline keeps what LLaMA-Factory 0.9.5 writes to output_dir/pissa_converted (pissa_convert:
    true): its adapter/ always holds the converted PiSSA adapter (the x-no-effect of pissa_convert), so a merge recipe
    copied from LLaMA-Factory names a folder that is not there."""
    run = os.path.dirname(os.path.normpath(path))
    if os.path.basename(os.path.normpath(path)) != "pissa_converted" or \
            not os.path.isfile(os.path.join(run, "adapter", "adapter_config.json")):
        return ""
    return (f". This pipeline writes the converted PiSSA adapter (LLaMA-Factory's output_dir/pissa_converted) to"
            f" output_dir/adapter: set adapter_name_or_path: {run}")


@rule("adapter_name_or_path", "finetuning_type", "lora_rank", "lora_alpha", "use_rslora", "use_dora", "oft_rank",
      "oft_block_size", "do_train", "task", "dataset", commands=("train", "validate"))
def adapter_is_the_method(ctx: Context) -> list[tuple[str, str]]:
    """train under lora / oft continues adapter_name_or_path with the recipe's method and settings
    (pipeline.model.lora.load_adapter loads it into the recipe's adapter modules): a LoRA adapter under oft, or an
    OFT one under lora, or one trained with another r / lora_alpha / use_rslora / use_dora (OFT: r,
    oft_block_size), would otherwise stop train after the model is built, naming the adapter's file but not the
    recipe's key (an sft run at lora_rank 16 continued by a dpo recipe left at the default 8 did). full / freeze
    fold either into the base; merge / eval / generate load the adapter as its own config says (LLaMA-Factory's
    merge and inference recipes leave finetuning_type at lora for an OFT adapter too). validate says it too when the
    recipe trains (do_train), before make's train stage: it reported the recipe OK and train refused it. Neither
    says it when do_train is false: train then only evaluates, loading the adapter as its config says (LLaMA-Factory's
    extras/nlg_eval predict recipe of an adapter, lora_rank left out: `make eval` of it stopped at the train stage).
    Nor for a recipe that trains nothing whatever do_train says: LLaMA-Factory's eval recipe (task: eval runs it; train
    refuses task) and its merge recipe (no dataset: export runs it; the missing dataset is validate's one message,
    with the export that runs it), which leave lora_rank out too: `make validate` of the eval recipe refused it.
    A missing or unreadable adapter_config.json is adapter_exists's (or the load's) to say."""
    from pipeline.names import trains_adapter

    path, kind = ctx.values["adapter_name_or_path"], ctx.values["finetuning_type"]
    trains = ctx.values["do_train"] and ctx.values["task"] is None and ctx.values["dataset"] is not None
    if path is None or not trains_adapter(kind) or not trains:
        return []
    try:
        from pipeline.model.hub import resolve_model_path

        folder = resolve_model_path(path, key="adapter_name_or_path", download=False)  # adapter_exists fetched it
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        theirs = str(config.get("peft_type", "LORA")) if isinstance(config, dict) else None
    except Exception:  # missing, unreadable: adapter_exists or the load says so
        return []
    method = {"LORA": "lora", "OFT": "oft"}.get(theirs)
    if method is None:
        return []
    if method == kind:
        return adapter_settings_problems(ctx, path, folder)
    named = {"lora": "a LoRA", "oft": "an OFT"}
    return [("adapter_name_or_path", f"given {path!r}, {named[method]} adapter (peft_type {theirs} in its "
                                     f"adapter_config.json), but finetuning_type is {kind}, which continues "
                                     f"{named[kind].split()[-1]} adapters only; set finetuning_type: {method} to "
                                     "continue it (or full / freeze to fold it into the base model)")]


def adapter_settings_problems(ctx: Context, path: str, folder: Path) -> list[tuple[str, str]]:
    """Each recipe key whose value differs from the setting adapter_name_or_path (at `folder`) was trained with, at
    that key: the comparison the load makes (pipeline.model.lora.differing_settings). A lora_alpha derived from
    lora_rank (null) is not named when the adapter's alpha is the one the adapter's r derives: setting lora_rank
    fixes both. An adapter_config.json the load refuses (a required key missing) is the load's to say."""
    from pipeline.errors import UserError
    from pipeline.model.config import default_lora_alpha
    from pipeline.model.lora import LinearWithLoRA, differing_settings, read_adapter_config
    from pipeline.model.oft import LinearWithOFT

    try:
        config = read_adapter_config(folder)
    except UserError:
        return []

    keys = (LinearWithLoRA if ctx.values["finetuning_type"] == "lora" else LinearWithOFT).RECIPE_KEYS
    ours = {key: ctx.values[recipe_key] for key, recipe_key in keys.items()}
    differ = differing_settings(keys, config, ours)
    if ("r" in differ and "lora_alpha" in differ and ctx.origins["lora_alpha"].kind == "derived"
            and config.get("lora_alpha") == default_lora_alpha(config.get("r"))):
        differ.remove("lora_alpha")
    problems = []
    for key in differ:
        recipe_key = keys[key]
        theirs = json.dumps(False if config.get(key) is None else config[key])  # absent: off, as the load reads it
        problems.append((recipe_key, f"{ctx.given(recipe_key)}, but adapter_name_or_path {path!r} was trained with {key} {theirs} "
                                     "(its adapter_config.json), and training continues an adapter with the settings "
                                     f"it was trained with; set {recipe_key}: {theirs}"))
    return problems


@rule("cutoff_len", "context_length", "model_name_or_path", "rope_scaling")
def cutoff_within_context(ctx: Context) -> list[tuple[str, str]]:
    """cutoff_len past the model's context length is refused, except under dynamic NTK (a checkpoint whose
    config.json has rope_scaling dynamic: our merged/ of a `rope_scaling: dynamic` run, LLaMA-Factory's export of
    one), which transformers rescales past it with no limit; the model does as well (pipeline.model.rope), and
    notices.dynamic_context_notice says so. A sliding window bounds nothing: its layers attend to the last window
    positions of a row of any length (pipeline.model.attention.windowed)."""
    from pipeline.recipe.modelinfo import model_info, recipe_length_limit, scales_past_context

    info = model_info(ctx.values["model_name_or_path"])
    cutoff = ctx.values["cutoff_len"]
    dynamic = info is not None and scales_past_context(info, ctx.values["rope_scaling"], cutoff)
    context = recipe_length_limit(ctx.values, info, dynamic)
    if context and cutoff > context:
        return [("cutoff_len", f"given {cutoff}, expected at most {context} (the model's "
                               f"context length); {_longer_rows_fix(ctx, info)}")]
    return []


def _longer_rows_fix(ctx: Context, info: Any) -> str:
    """What lets this model take longer rows. A preset's random weights have any context_length; a checkpoint's do
    not: GPT-2's learned positions end at its n_positions (context_length past it passed validate, then train refused
    the checkpoint's wpe), and rotary positions are stretched with rope_scaling, LLaMA-Factory's way (configure_rope),
    where the family's transformers class takes the recipe's rope types (Phi-3 runs only its own LongRoPE)."""
    from pipeline.model.families import DEFAULT_ROPE_TYPES
    from pipeline.recipe.modelinfo import model_folder

    if info is None or model_folder(ctx.values["model_name_or_path"]) is None:
        return "lower cutoff_len or raise context_length"
    cfg = info.config
    if cfg.positions != "rope":
        return (f"lower cutoff_len: the checkpoint's learned positions end at {info.context_length} ({article(cfg.family)} {cfg.family} "
                "model cannot be stretched: rope_scaling needs rotary positions)")
    if cfg.hf.rope_types and "linear" not in cfg.hf.rope_types:
        return "lower cutoff_len"
    kinds = [k for k in ("linear", "dynamic", "yarn") if k in (cfg.hf.rope_types or DEFAULT_ROPE_TYPES)]
    return (f"lower cutoff_len, or set rope_scaling: {kinds[0]} (or {', '.join(kinds[1:])}), which stretches the "
            "checkpoint's positions to cutoff_len as LLaMA-Factory does")


@rule("rope_scaling", "context_length", "cutoff_len", "model_name_or_path")
def rope_scaling_applies(ctx: Context) -> list[tuple[str, str]]:
    """rope_scaling sets the context length itself (window x factor), so an explicit one contradicts it; a model
    without rotary positions is refused with the reason (pipeline.model.rope_recipe)."""
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


@rule("adapter_name_or_path", "model_name_or_path", commands=LOADS_MODEL_NOW)
def adapter_fits_model(ctx: Context) -> list[tuple[str, str]]:
    """An adapter trained on another model size would otherwise stop the command only when it loads (eval: after
    scoring the base), with one shape error per tensor naming the adapter's file, not the recipe's key."""
    path = ctx.values["adapter_name_or_path"]
    if path is None:
        return []
    return adapter_overlap_problems("adapter_name_or_path", path) or adapter_shape_problems(
        "adapter_name_or_path", path, "model_name_or_path", ctx.values["model_name_or_path"])


def adapter_overlap_problems(key: str, adapter: str) -> list[tuple[str, str]]:
    """An adapter whose file adapts modules its modules_to_save trains in full (pipeline.model.config.
    adapted_and_saved: this pipeline's earlier LoRA runs wrote such), refused at `key` before anything loads; read
    from the safetensors header and adapter_config.json alone, skipped where they are not on disk (the load checks
    it again then)."""
    from pipeline.model.config import adapted_and_saved, adapted_and_saved_message
    from pipeline.model.families import BY_MODEL_TYPE, GPT2
    from pipeline.model.safetensors_header import safetensors_shapes
    from pipeline.names import ADAPTER_WEIGHTS

    folder = _local_folder(adapter, key)
    if folder is None:
        return []
    saved = _config(folder, "adapter_config.json").get("modules_to_save") or []
    found = adapted_and_saved(safetensors_shapes(folder / ADAPTER_WEIGHTS), saved if isinstance(saved, list) else [])
    if not found:
        return []
    family = next((f for f in BY_MODEL_TYPE.values() if any(m.startswith(f.prefix) for m in found)), GPT2)
    return [(key, adapted_and_saved_message(f"given {adapter!r}, which", found, family))]


def adapter_shape_problems(key: str, adapter: str, model_key: str, model: str,
                           advice: str | None = None) -> list[tuple[str, str]]:
    """One message when the LoRA or OFT tensors of adapter folder `adapter` (recipe key `key`) do not fit the linear
    layers of checkpoint `model` (recipe key `model_key`): the first mismatching tensor with both shapes, the two
    hidden sizes when they tell, and `advice` (what to do; by default: the model the adapter was trained on, or a new
    adapter). Read from the safetensors headers alone (no tensor data) and adapter_config.json; skipped (an empty
    list) where either is not on disk as a safetensors checkpoint, or the adapter is neither (its load says what is
    wrong with it then)."""
    from pipeline.names import ADAPTER_WEIGHTS
    from pipeline.model.safetensors_header import safetensors_shapes

    folders = [_local_folder(name, k) for name, k in ((adapter, key), (model, model_key))]
    if None in folders:
        return []
    theirs, ours = safetensors_shapes(folders[0] / ADAPTER_WEIGHTS), checkpoint_shapes(folders[1])
    if not theirs or not ours:
        return []
    conv1d, config = _stores_conv1d(folders[1]), _config(folders[0], "adapter_config.json")
    sizes: dict[int, set[int]] = {}  # the model's dimension -> the adapter's at the same place
    first = None
    for name in sorted(theirs):
        fit = _lora_expected(name, theirs[name], ours, conv1d) or _oft_expected(name, theirs[name], ours, config)
        if fit is None:
            continue
        expected, mine, given = fit
        sizes.setdefault(mine, set()).add(given)
        if first is None and list(expected) != theirs[name]:
            first = (name, expected)
    if first is None:
        return []
    name, expected = first
    hidden = _hidden_size(folders[1])
    told = sizes.get(hidden, set()) - {hidden} if hidden else set()
    why = (f"trained on a model with hidden size {told.pop()}; this model has {hidden}" if len(told) == 1
           else "trained on another model size")
    advice = advice or f"set {model_key} to the model the adapter was trained on, or train an adapter on this one"
    return [(key, f"given {adapter!r}, whose tensor '{name}' has shape {theirs[name]} but {model} expects "
                  f"{list(expected)} there: {why}; {advice}")]


def _local_folder(name: str, key: str) -> Path | None:
    """The directory `name` (a path or a cached hub snapshot, never downloaded here), or None."""
    from pipeline.errors import UserError
    from pipeline.model.hub import resolve_model_path

    try:
        folder = resolve_model_path(name, key=key, download=False)
    except (UserError, OSError, ValueError):
        return None
    return folder if folder.is_dir() else None


# what an adapter tensor's expected shape is computed from: (the expected shape, the model's dimension it depends
# on, the adapter's dimension in its place), e.g. a LoRA A's ((rank, in), in, its in)
Fit = tuple[tuple[int, ...], int, int]


def _adapted_weight(name: str, part: str, model: dict[str, list[int]]) -> list[int] | None:
    """The 2-d weight shape in checkpoint `model` of the module PEFT's adapter tensor `name` (base_model.model.
    <module><part>) adapts; None where it holds none, or for the vocabulary rows (embeddings, head), which added
    tokens grow (the load explains those)."""
    from pipeline.names import PEFT_PREFIX, VOCAB_ROWS

    if not (name.startswith(PEFT_PREFIX) and name.endswith(part)):
        return None
    module = name[len(PEFT_PREFIX):-len(part)]
    if f"{module}.weight".endswith(VOCAB_ROWS):
        return None
    return next((model[k] for k in (f"{module}.weight", f"{module.partition('.')[2]}.weight")
                 if len(model.get(k, ())) == 2), None)


def _lora_expected(name: str, shape: list[int], model: dict[str, list[int]], conv1d: bool) -> Fit | None:
    """For a LoRA tensor (PEFT's <module>.lora_A / lora_B.weight, rank x in / out x rank) of a 2-d weight the
    checkpoint holds: the shape that layer expects, keeping the adapter's rank; None for any other tensor."""
    for part, a in ((".lora_A.weight", True), (".lora_B.weight", False)):
        weight = _adapted_weight(name, part, model) if len(shape) == 2 else None
        if weight is not None:
            out, inn = reversed(weight) if conv1d else weight
            return ((shape[0], inn), inn, shape[1]) if a else ((out, shape[1]), out, shape[0])
    return None


def _oft_expected(name: str, shape: list[int], model: dict[str, list[int]], config: dict) -> Fit | None:
    """For an OFT tensor (PEFT's <module>.oft_R.weight: one row per block of the layer's inputs, each the upper
    triangle of a block_size x block_size skew-symmetric matrix, pipeline.model.oft) of a Linear weight the
    checkpoint holds: the shape PEFT builds for that layer from the adapter's r / oft_block_size (a size that does
    not divide the inputs moved as PEFT moves it); None for any other tensor or an unusable config. The adapter's
    inputs are its blocks x the block size its rows' length tells."""
    from pipeline.errors import UserError
    from pipeline.model.config import oft_blocks

    weight = _adapted_weight(name, ".oft_R.weight", model) if len(shape) == 2 else None
    rank, size = config.get("r", 0), config.get("oft_block_size", 0)
    if weight is None or not (isinstance(rank, int) and isinstance(size, int)):
        return None
    try:
        blocks, size = oft_blocks(weight[1], rank, size)
    except UserError:
        return None
    given = (1 + math.isqrt(1 + 8 * shape[1])) // 2  # the block size whose upper triangle has shape[1] numbers
    return (blocks, size * (size - 1) // 2), weight[1], shape[0] * given


def checkpoint_shapes(folder: Path) -> dict[str, list[int]]:
    """Each tensor's shape in a safetensors checkpoint folder (its files as the loader finds them:
    pipeline.model.safetensors_header.shard_files), headers only (a bitsandbytes 4-bit weight's left out:
    quant_layout.header_shapes); {} when it has none."""
    from pipeline.errors import UserError
    from pipeline.model.quant_layout import header_shapes
    from pipeline.model.safetensors_header import safetensors_shapes, shard_files

    try:
        files = shard_files(folder)
    except UserError:
        return {}
    return header_shapes({k: v for file in files for k, v in safetensors_shapes(file).items()})


def _config(folder: Path, file: str = "config.json") -> dict:
    try:
        config = json.loads((folder / file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _stores_conv1d(folder: Path) -> bool:
    """Whether the checkpoint's family stores its linear weights as Conv1D, in x out (GPT-2), the transpose of
    nn.Linear's out x in."""
    from pipeline.model.families import BY_MODEL_TYPE

    family = BY_MODEL_TYPE.get(_config(folder).get("model_type"))
    return bool(family and family.conv1d)


def _hidden_size(folder: Path) -> int | None:
    config = _config(folder)
    size = config.get("hidden_size", config.get("n_embd"))
    return size if isinstance(size, int) else None


@rule("stage", "model_name_or_path")
def reward_class_exists(ctx: Context) -> list[tuple[str, str]]:
    """Stage rm writes its model as the family's XForSequenceClassification; a family transformers has none for
    (GraniteForCausalLM in transformers 5.24) is refused before training rather than at the export after it."""
    if ctx.values["stage"] != "rm":
        return []
    from pipeline.model.families import reward_refusal
    from pipeline.recipe.modelinfo import model_info

    info = model_info(ctx.values["model_name_or_path"])
    if info is None or info.config.hf.reward_architecture:
        return []
    why, instead = reward_refusal(info.config.hf)
    return [("stage", f"given 'rm', but {why}, so the reward model could not be written or read back; train the"
                      f" reward model on {instead}")]
