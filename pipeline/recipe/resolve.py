"""One immutable Resolved recipe: defaults <- extends chain <- recipe <- CLI overrides <- derived values.

Step arithmetic (the trainer's contract; `derive_steps` redoes it once the exact example count is known):

    total_train_batch_size = per_device_train_batch_size * gradient_accumulation_steps * world_size  # one update
    batches_per_rank       = floor(num_train_examples / (per_device_train_batch_size * world_size))  # drop_last
    steps_per_epoch        = floor(batches_per_rank / batches_per_step)   # optimizer steps (stage ppo: PPO steps)
    batches_per_step       = gradient_accumulation_steps, x ppo_buffer_size under stage ppo
    total_steps            = max_steps if set, else ceil(num_train_epochs * steps_per_epoch)
    num_warmup_steps       = warmup_steps if set, else ceil(warmup_ratio * total_steps) if set, else 0

`num_train_examples` is the sum of `splits.train` (and, with `eval_dataset`, `splits.val` of the datasets it does
not name) over the built manifests of `dataset` (sft) when every
one exists, else null (and then the step counts that need it are null too). For `stage: pt` it is null
here: the trainer counts windows after tokenizing and calls `derive_steps`.
"""
from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from pipeline.data.args import LLAMAFACTORY_DATASET_DIR, ROW_FORMS, data_form
from pipeline.errors import UserError, did_you_mean
from pipeline.model.config import default_lora_alpha
from pipeline.names import split_names
from pipeline.recipe import lr_kwargs, spec
from pipeline.recipe.steps import batches_per_step
from pipeline.recipe.precision import default_export_dtype
from pipeline.recipe.check import DERIVED_KEYS, check_schema
from pipeline.recipe.load import DEFAULT, DERIVED, Entry, Origin, load_chain, parse_overrides_partial
from pipeline.recipe.run_folders import run_adapter
from pipeline.recipe.started import finished_by, header, read_started

_LIST_KEYS = ("dataset", "eval_dataset", "lora_target", "additional_target",  # LLaMA-Factory: comma strings
              "oft_target")
# LLaMA-Factory's split_arg takes a comma string or a YAML list for these too; the comma string is their one form here
# (plan, the freeze rules and resume's comparison read it)
_JOINED_KEYS = ("freeze_trainable_modules", "freeze_extra_modules")
# LLaMA-Factory's merge and inference recipes name no dataset; deps: `make export` reads an export recipe's deps
# (the commands that need the data, build first, still say the dataset is missing)
NO_DATA_COMMANDS = ("export", "generate", "chat", "deps")
# a recipe with `task` (LLaMA-Factory's eval recipe: a multiple-choice benchmark, pipeline.evaluate.choice) names no
# dataset either: eval runs it, validate checks it and its task folder, plan says how eval runs it
# (pipeline.recipe.benchmark); the other commands still ask for a dataset
BENCHMARK_COMMANDS = ("eval", "validate", "plan")


class Resolved(Mapping[str, Any]):
    """Every recipe key with a value and a provenance. Read `r["key"]` or `r.key`; change with `r.replace()`."""

    __slots__ = ("_values", "_origins", "_recipe_path", "_files", "_ds_config")

    def __init__(self, values: Mapping[str, Any], origins: Mapping[str, Origin], recipe_path: str | Path,
                 files: Iterable[str] = (), ds_config: Mapping[str, Any] | None = None):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_origins", dict(origins))
        object.__setattr__(self, "_recipe_path", Path(recipe_path))
        object.__setattr__(self, "_files", tuple(files) or (str(recipe_path),))
        object.__setattr__(self, "_ds_config", copy.deepcopy(dict(ds_config or {})))

    # Mapping ---------------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        return copy.deepcopy(value) if isinstance(value, (list, dict)) else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the recipe has no key {name!r}{did_you_mean(name, self._values)}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Resolved is immutable; use r.replace(key=value)")

    def __reduce__(self):
        return (Resolved, (self._values, self._origins, self._recipe_path, self._files, self._ds_config))

    def __repr__(self) -> str:
        return f"Resolved({self._recipe_path}, {len(self._values)} keys)"

    # Provenance and friends --------------------------------------------------------------------------
    def source(self, key: str) -> str:
        """`default`, `recipes/x.yaml:12`, `cli` or `derived`."""
        return self._origins[key].provenance

    def origin(self, key: str) -> Origin:
        return self._origins[key]

    @property
    def recipe_path(self) -> Path:
        return self._recipe_path

    @property
    def files(self) -> tuple[str, ...]:
        """The recipe and every file it extends (the recipe first)."""
        return self._files

    @property
    def ds_config(self) -> dict[str, Any]:
        """The DeepSpeed config (a copy): generated from the recipe, or the user's JSON with "auto" filled."""
        return copy.deepcopy(self._ds_config)

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._values)

    def replace(self, **changes: Any) -> "Resolved":
        """A new Resolved with `changes` (provenance `derived`); the DeepSpeed config is rebuilt from them."""
        unknown = [k for k in changes if k not in self._values]
        if unknown:
            raise KeyError(f"unknown recipe keys {unknown}{did_you_mean(unknown[0], self._values)}")
        values = {**self._values, **changes}
        origins = {**self._origins, **{k: DERIVED for k in changes}}
        from pipeline.recipe.dsconfig import build_ds_config

        ds, adopted = build_ds_config(values, origins)
        values.update(adopted)
        origins.update({k: DERIVED for k in adopted})
        return Resolved(values, origins, self._recipe_path, self._files, ds)


def resolve(path: str | os.PathLike[str], overrides: Iterable[str] = (), *, command: str | None = None,
            env: Mapping[str, str] = os.environ, built: bool = False) -> Resolved:
    """Load, merge, validate and derive. Raises UserError listing every problem found. `built`: train or eval
    has just run the build that overwrite_cache asks for, so the counts on disk are the ones it will read."""
    recipe_file = os.fspath(path)
    messages: list[tuple[tuple, str]] = []
    chain = None
    try:
        chain = load_chain(recipe_file)
    except UserError as err:
        messages.extend(err.messages)
    cli, cli_errors = parse_overrides_partial(overrides)
    if chain is None:
        raise UserError(messages + cli_errors)

    merged: dict[str, Entry] = {}
    for i, layer in enumerate(chain.layers + [cli]):
        top = i >= len(chain.layers) - 1
        _merge_layer(merged, {k: e for k, e in layer.items() if top or k != "extends"})

    benchmark = "task" in merged and merged["task"].value is not None and command in BENCHMARK_COMMANDS
    problems, bad = check_schema(merged, recipe_file,
                                 optional=("dataset",) if command in NO_DATA_COMMANDS or benchmark else ())
    problems += [((0, *where), message) for where, message in chain.problems]  # duplicate keys, in file order
    problems += [((1, "", 0, i), m) for i, m in enumerate(cli_errors)]
    values = spec.defaults()
    origins: dict[str, Origin] = {key: DEFAULT for key in values}
    props = spec.properties()
    for key, entry in merged.items():
        if key in props and key not in bad:
            values[key], origins[key] = _normalise(key, entry.value, props[key]), entry.origin
    problems += _derive(values, origins, recipe_file, env, bad)

    from pipeline.recipe import rules

    problems += rules.run(values, origins, recipe_file, command, bad, built)
    ds: dict[str, Any] = {}
    if not ({"deepspeed", "per_device_train_batch_size", "gradient_accumulation_steps"} & bad):
        from pipeline.recipe.dsconfig import build_ds_config

        try:
            ds, adopted = build_ds_config(values, origins)
            values.update(adopted)
            origins.update({k: DERIVED for k in adopted})
        except UserError as err:
            problems += [((2, "", 0, 0), m) for m in err.messages]
    if problems:
        problems.sort(key=lambda p: (p[0][0], chain.files.index(p[0][1]) if p[0][1] in chain.files else -1,
                                     *p[0][2:]))
        raise UserError(list(dict.fromkeys(m for _, m in problems)))
    return Resolved(values, origins, recipe_file, chain.files, ds)


def _merge_layer(merged: dict[str, Entry], layer: Mapping[str, Entry]) -> None:
    """Lay `layer` over `merged`. A null over an inherited value of a key that takes no null removes it, so
    the default applies: that is how a recipe that extends another takes a key back out (`lora_rank:`
    under `finetuning_type: full`). A null with nothing to remove stays, and the schema check reports it."""
    props = spec.properties()
    for key, entry in layer.items():
        prop = props.get(key)
        if entry.value is None and key in merged and prop is not None and not spec.allows_type(prop, "null"):
            del merged[key]
        else:
            merged[key] = entry


def _normalise(key: str, value: Any, prop: dict[str, Any]) -> Any:
    """1e3 for an integer key becomes 1000; comma strings of names become lists; a boolean becomes what the key's
    x-boolean-means says (transformers' resume_from_checkpoint=True is 'latest')."""
    if isinstance(value, bool) and "x-boolean-means" in prop:
        return prop["x-boolean-means"][json.dumps(value)]
    if isinstance(value, float) and value.is_integer() and spec.is_integer_key(prop):
        return int(value)
    if key in _LIST_KEYS and isinstance(value, str):
        return split_names(value)
    if key in _JOINED_KEYS and isinstance(value, list):
        return ",".join(value)
    return value


def comma_form(key: str, value: Any) -> str | None:
    """`value` as LLaMA-Factory's comma string (dataset=a,b), which _normalise reads back as this same list, where `key`
    takes it; else None. A list written back for a message's command line so takes no nested quoting in make's
    ARGS='...' (its JSON, dataset=["a", "b"], does)."""
    if key not in _LIST_KEYS or not isinstance(value, list) or not value:
        return None
    if not all(isinstance(v, str) and v and v == v.strip() and "," not in v for v in value):
        return None
    joined = ",".join(value)
    return joined if _reads_back(joined) else None


def _env_int(env: Mapping[str, str], name: str, default: int, minimum: int) -> tuple[int, str | None]:
    raw = env.get(name)
    if raw is None or raw == "":
        return default, None
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        return default, f"environment {name}={raw!r}: expected an integer >= {minimum} (set by the launcher)"
    return value, None


def _derive(values: dict[str, Any], origins: dict[str, Origin], recipe_file: str, env: Mapping[str, str],
            bad: set[str]) -> list[tuple[tuple, str]]:
    """Fill the derived keys in place; returns problems with the launcher environment."""
    problems = []
    for key, name, default, minimum in (("world_size", "WORLD_SIZE", 1, 1), ("rank", "RANK", 0, 0),
                                        ("local_rank", "LOCAL_RANK", 0, 0)):
        values[key], problem = _env_int(env, name, default, minimum)
        origins[key] = DERIVED
        if problem:
            problems.append(((1, "", 0, 0), problem))
    if values["rank"] >= values["world_size"] and not problems:
        problems.append(((1, "", 0, 0), f"environment RANK={values['rank']} is not below "
                                        f"WORLD_SIZE={values['world_size']}"))
    if (origins["dataset_dir"].kind == "default" and "dataset_dir" not in bad
            and not os.path.isfile(os.path.join(values["dataset_dir"], "dataset_info.json"))
            and os.path.isfile(os.path.join(LLAMAFACTORY_DATASET_DIR, "dataset_info.json"))):
        values["dataset_dir"], origins["dataset_dir"] = LLAMAFACTORY_DATASET_DIR, DERIVED  # a LLaMA-Factory checkout
    if (values.get("gradient_checkpointing") is not None and origins["disable_gradient_checkpointing"].kind == "default"
            and "gradient_checkpointing" not in bad):  # transformers' name for the same switch, inverted
        values["disable_gradient_checkpointing"] = not values["gradient_checkpointing"]
        origins["disable_gradient_checkpointing"] = DERIVED
    if origins["min_lr_ratio"].kind == "default" and not {"lr_scheduler_type", "lr_scheduler_kwargs"} & bad:
        try:  # cosine_with_min_lr's floor, as transformers' lr_scheduler_kwargs give it (rule scheduler_kwargs)
            ratio = lr_kwargs.floor_ratio(values["lr_scheduler_type"], values["lr_scheduler_kwargs"],
                                          values["learning_rate"])
        except (ValueError, TypeError):
            ratio = None
        if ratio is not None:
            values["min_lr_ratio"], origins["min_lr_ratio"] = ratio, DERIVED
    if values["stage"] == "ppo" and origins["val_size"].kind == "default" and "stage" not in bad:
        values["val_size"], origins["val_size"] = 0.0, DERIVED  # PPO evaluates nothing: every prompt trains
    for key in ("model_name_or_path", "ref_model"):  # dpo's ref_model takes the same forms
        model = values.get(key)
        if (isinstance(model, str) and key not in bad and os.path.isdir(model)
                and not os.path.isfile(os.path.join(model, "config.json"))
                and os.path.isfile(os.path.join(model, "model", "config.json"))):
            # a full/freeze run's output_dir (LLaMA-Factory writes the model there; we write output_dir/model/)
            values[key], origins[key] = os.path.join(model, "model"), origins[key].derived()
    for key in ("adapter_name_or_path", "ref_model_adapters"):  # the reference's adapters take the same forms
        given = values.get(key)
        if isinstance(given, str) and key not in bad:
            paths = split_names(given) if key == "ref_model_adapters" else [given]  # several: folded in order
            folders = [run_adapter(path) for path in paths]
            if folders != paths:  # ref_model_adapters keeps its line: its stage / ref_model rules speak there
                values[key] = ",".join(folders)
                origins[key] = origins[key].derived() if key == "adapter_name_or_path" else origins[key]
    if origins["split_special_tokens"].kind == "default" and not {"model_name_or_path", "tokenizer_name_or_path"} & bad:
        from pipeline.data.model_tokenizer import checkpoint_split_special_tokens

        saved = checkpoint_split_special_tokens(values)  # the checkpoint's setting, as AutoTokenizer reads it there
        if saved is not None:
            values["split_special_tokens"], origins["split_special_tokens"] = saved[1], DERIVED
    if values["output_dir"] is None:
        values["output_dir"], origins["output_dir"] = os.path.join("saves", Path(recipe_file).stem), DERIVED
    if (origins["export_dtype"].kind == "default" and not {"pure_bf16", "finetuning_type"} & bad
            and default_export_dtype(values) != values["export_dtype"]):  # a pure_bf16 run's bf16 model/
        values["export_dtype"], origins["export_dtype"] = default_export_dtype(values), DERIVED
    if values["lora_alpha"] is None and "lora_rank" not in bad:
        values["lora_alpha"], origins["lora_alpha"] = default_lora_alpha(values["lora_rank"]), DERIVED
    for key in _LIST_KEYS:
        values[key] = _normalise(key, values[key], spec.properties()[key])
    if (origins["cutoff_len"].kind == "default" and values["rope_scaling"] is None
            and not {"model_name_or_path", "context_length"} & bad):
        from pipeline.recipe.modelinfo import model_info, recipe_length_limit

        # the default never exceeds the model, nor its context under dynamic NTK (a default relies on no rescaling)
        limit = recipe_length_limit(values, model_info(values["model_name_or_path"]), False)
        if limit is not None and limit < values["cutoff_len"]:
            values["cutoff_len"], origins["cutoff_len"] = limit, DERIVED
    _derive_rope_context(values, origins, bad)
    _derive_stored_quantization(values, origins, bad)
    if {"per_device_train_batch_size", "gradient_accumulation_steps"} & bad:
        values["total_train_batch_size"] = None
    else:
        values["total_train_batch_size"] = (values["per_device_train_batch_size"]
                                            * values["gradient_accumulation_steps"] * values["world_size"])
    origins["total_train_batch_size"] = DERIVED
    n = None if {"dataset", "dataset_dir", "stage"} & bad else count_train_examples(values)
    _derive_steps_into(values, origins, n, bad)
    return problems


def _derive_rope_context(values: dict[str, Any], origins: dict[str, Origin], bad: set[str]) -> None:
    """rope_scaling raises the context length to window x factor (pipeline.model.rope_recipe, LLaMA-Factory's
    configure_rope): derive it into context_length so that the cutoff check, plan and the memory estimate see
    it. Left alone when the model cannot be read here, or when the scaling cannot apply (rule rope_scaling)."""
    if values["rope_scaling"] is None or values["context_length"] is not None or \
            {"rope_scaling", "cutoff_len", "model_name_or_path"} & bad:
        return
    from pipeline.model.rope_recipe import recipe_rope
    from pipeline.recipe.modelinfo import model_info

    info = model_info(values["model_name_or_path"])
    try:
        plan = recipe_rope(info.config, values["rope_scaling"], values["cutoff_len"]) if info else None
    except UserError:
        return
    if plan is not None and plan.applied:
        values["context_length"], origins["context_length"] = plan.config.context_length, DERIVED


def _derive_stored_quantization(values: dict[str, Any], origins: dict[str, Origin], bad: set[str]) -> None:
    """A pre-quantized bitsandbytes checkpoint (the hub's unsloth/*-bnb-4bit) is a QLoRA base as it is stored:
    the quantization keys the recipe leaves at their defaults take the checkpoint's values (LLaMA-Factory trains QLoRA
    on it with quantization_bit unset), so that every rule, plan's byte count, eval and resume see the quantized base
    QLoRA's keys describe; one the recipe sets otherwise is refused by the rule stored_quantization_matches. Left alone
    where the config cannot be read here (the model stage says why) or the family reader refuses it (a MoE)."""
    if "model_name_or_path" in bad:
        return
    from pipeline.model.quant_layout import stored_keys
    from pipeline.recipe.modelinfo import model_info, stored_quantization

    stored = stored_quantization(values["model_name_or_path"])
    if stored is None or model_info(values["model_name_or_path"]) is None:
        return
    for key, value in stored_keys(stored):
        if origins[key].kind == "default" and key not in bad:
            values[key], origins[key] = value, DERIVED


def count_train_examples(values: Mapping[str, Any]) -> int | None:
    """Sum of the trained splits (`data.built.training_splits`) over the built manifests of `dataset` (stages sft,
    dpo, kto, rm), or None when any is missing."""
    if data_form(values.get("stage")) not in ROW_FORMS or not values.get("dataset"):
        return None
    from pipeline.data.built import built_dir, read_manifest, training_splits

    lengths = []
    for name in values["dataset"]:
        manifest = read_manifest(built_dir(values["dataset_dir"], name))
        try:
            lengths.append(sum(int(manifest["splits"][s])  # type: ignore[index]
                               for s in training_splits(name, values.get("eval_dataset") or [])))
        except (TypeError, KeyError, ValueError):
            return None
    strategy = values.get("mix_strategy", "concat")
    if strategy == "concat" or len(lengths) < 2:
        return sum(lengths)
    return mixed_count(lengths, values.get("interleave_probs"), values.get("seed"), strategy)


def mixed_count(lengths: list[int], probs: Any, seed: int | None, strategy: str) -> int | None:
    """The training rows an interleave mix_strategy gives datasets of these lengths (pipeline.data.mix), or None
    when interleave_probs cannot mix them (rules.data.interleave_probs_valid says why) or a dataset has no rows."""
    from pipeline.data.mix import interleave_order, parse_probs, probs_problem

    try:
        parsed = parse_probs(probs)
    except ValueError:
        return None
    if min(lengths) < 1 or (parsed is not None and probs_problem(parsed, len(lengths), strategy)):
        return None
    return len(interleave_order(lengths, parsed, seed, strategy))


def _derive_steps_into(values: dict[str, Any], origins: dict[str, Origin], n: int | None,
                       bad: set[str] = frozenset()) -> None:
    needed = {"per_device_train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_steps",
              "warmup_ratio", "warmup_steps", "stage", "ppo_buffer_size"}
    steps_per_epoch = total = warmup = None
    if not needed & bad:
        if n is not None:
            batches_per_rank = n // (values["per_device_train_batch_size"] * values["world_size"])  # train drops the last partial batch
            steps_per_epoch = batches_per_rank // batches_per_step(values)
        if values["max_steps"] is not None:
            total = values["max_steps"]
        elif values["num_train_epochs"] is not None and steps_per_epoch is not None:
            total = math.ceil(values["num_train_epochs"] * steps_per_epoch)
        if values["warmup_steps"] is not None:
            warmup = values["warmup_steps"]
        elif values["warmup_ratio"] is not None:
            warmup = math.ceil(values["warmup_ratio"] * total) if total is not None else None
        else:
            warmup = 0
    for key, value in (("num_train_examples", n), ("steps_per_epoch", steps_per_epoch), ("total_steps", total),
                       ("num_warmup_steps", warmup)):
        values[key], origins[key] = value, DERIVED


def derive_steps(r: Resolved, num_train_examples: int) -> Resolved:
    """The same Resolved with step counts recomputed from the exact number of training examples (or windows)."""
    values, origins = r.to_dict(), {k: r.origin(k) for k in r}
    _derive_steps_into(values, origins, int(num_train_examples))
    changed = {k: values[k] for k in ("num_train_examples", "steps_per_epoch", "total_steps", "num_warmup_steps")}
    return r.replace(**changed)


def resolved_yaml(r: Resolved) -> str:
    """Every value with its provenance as a comment, grouped like the schema (for output_dir/resolved.yaml)."""
    lines = [*header(r.recipe_path), "# value  # provenance: default | file:line | cli | derived"]
    shown = set()
    for group, keys in spec.groups().items():
        lines.append(f"\n# --- {group} ---")
        for key in keys:
            lines.append(_yaml_line(r, key))
            shown.add(key)
    lines.append("\n# --- derived ---")
    for key in DERIVED_KEYS:
        lines.append(_yaml_line(r, key))
        shown.add(key)
    rest = [k for k in r if k not in shown]
    for key in rest:
        lines.append(_yaml_line(r, key))
    return "\n".join(lines) + "\n"


def _yaml_line(r: Resolved, key: str) -> str:
    return f"{key}: {_flow(r[key])}  # {r.source(key)}"


def recorded_command(text: str) -> tuple[str, tuple[str, ...], str | None] | None:
    """(recipe, command-line overrides, folder) of the run whose resolved.yaml is `text` (resolved_yaml's format: its
    first lines name the recipe and the folder it was typed in, a `# cli` value came from the command line), for a
    message that says how to run that run again (an adapter merged away from its run folder: pipeline.merge, through
    rerun.run_this). The recipe as typed, and the folder to type it in when it is not this one (Started.typed_in:
    the recipe's relative paths are relative to it), else None. The overrides are written back as key=value (a list
    as its comma string where the key takes one, a string as is where it reads back as that string, else the
    value's JSON, which is YAML flow syntax too); None when `text` is no resolved.yaml."""
    import yaml

    started = read_started(text)
    if started is None:
        return None
    overrides = []
    for line in text.splitlines()[1:]:
        key, colon, shown = line.partition(": ")
        if not colon or not shown.endswith("  # cli"):
            continue
        flow = shown.removesuffix("  # cli")
        try:
            value = yaml.safe_load(flow)
        except yaml.YAMLError:
            return None
        plain = value if isinstance(value, str) and _reads_back(value) else None
        overrides.append(f"{key}={comma_form(key, value) or plain or flow}")
    return started.recipe, tuple(overrides), started.typed_in()


def recorded_finished(text: str) -> bool:
    """Whether the run whose resolved.yaml is `text` finished in its output_dir (as recorded, relative to the folder
    it was started in) and is its recipe's there (recipe.started.finished_by): the command recorded_command gives
    trains it again only with --retrain-finished (rerun.run_this's `finished`). The output_dir recorded, not the
    folder `text` was read from: a run's resolved.yaml copied beside a checkpoint elsewhere names the same run."""
    import yaml

    started = read_started(text)
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    output_dir = values.get("output_dir") if isinstance(values, dict) else None
    if started is None or not output_dir:
        return False
    return finished_by(Path(started.folder or os.curdir) / str(output_dir), started.path())


def _reads_back(text: str) -> bool:
    """Whether `text`, unquoted, is read as that same string (not a number, a boolean, a list, ...)."""
    import yaml

    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def _flow(value: Any) -> str:
    """JSON is YAML flow syntax and quotes every string (so 'yes' stays a string); floats get a '.' so that
    YAML 1.1 readers (PyYAML's safe_load) read 1e-08 as a number too."""
    if isinstance(value, float):
        text = json.dumps(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent if exponent[0] in '+-' else '+' + exponent}"
        return text
    if isinstance(value, list):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))}: {_flow(v)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=False)
