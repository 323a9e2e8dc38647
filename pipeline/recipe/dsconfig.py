"""The DeepSpeed config: generated from the recipe, or the user's JSON with its "auto" values filled.

The optimizer and the LR scheduler are client objects built by the trainer from the recipe, so the
config has no optimizer/scheduler sections. In a user JSON, an explicit value that contradicts the
recipe (batch sizes, accumulation, clipping, precision) is a UserError naming the JSON file, the key
path, both values and the recipe key, so it is caught before launch rather than at engine init.
"""
from __future__ import annotations

import copy
import json
import os
import re
from typing import Any, Mapping

from pipeline.errors import UserError
from pipeline.recipe.load import Origin

_BIG = 1_000_000_000
# JSON path -> recipe key; an explicit JSON value must equal the recipe's.
STRICT: dict[tuple[str, ...], str] = {
    ("train_micro_batch_size_per_gpu",): "per_device_train_batch_size",
    ("gradient_accumulation_steps",): "gradient_accumulation_steps",
    ("train_batch_size",): "total_train_batch_size",
    ("gradient_clipping",): "max_grad_norm",
    ("fp16", "enabled"): "fp16",
    ("bf16", "enabled"): "bf16",
}
# JSON path -> recipe key; the JSON's value is adopted unless the recipe set the key itself (then they must agree).
ADOPTED: dict[tuple[str, ...], str] = {
    ("fp16", "loss_scale"): "loss_scale",
    ("fp16", "initial_scale_power"): "initial_scale_power",
    ("fp16", "loss_scale_window"): "loss_scale_window",
    ("fp16", "hysteresis"): "hysteresis",
    ("fp16", "min_loss_scale"): "min_loss_scale",
    ("zero_optimization", "stage"): "zero_stage",
    ("zero_optimization", "offload_optimizer", "device"): "offload_optimizer",
    ("zero_optimization", "offload_param", "device"): "offload_param",
}
_CLIENT_SECTIONS = {
    "optimizer": "the optimizer is AdamW built from the recipe: set learning_rate, weight_decay, adam_beta1, "
                 "adam_beta2 and adam_epsilon there",
    "scheduler": "the learning-rate schedule is built from the recipe: set lr_scheduler_type, warmup_ratio or "
                 "warmup_steps and min_lr_ratio there",
}

# Top-level keys of LLaMA-Factory's examples/deepspeed/ that cannot work here, and why.
_REFUSED = {
    "tensor_parallel": "tensor parallelism (autotp) is not supported: the model is not sharded by layer slices "
                       "here; spread memory with ZeRO instead (zero_optimization.stage 2 or 3, offload); remove "
                       "the 'tensor_parallel' section",
    "zero_force_ds_cpu_optimizer": "true requires DeepSpeed's compiled CPU Adam, but the optimizer is torch's AdamW "
                                   "built from the recipe (and FP8 training, which LLaMA-Factory's "
                                   "ds_z3_fp8_config.json is for, is not supported); set it to false or remove it",
}

# Sections that are JSON objects (an example each), and keys that only mean something inside a section.
_SECTIONS = {
    "zero_optimization": '"zero_optimization": {"stage": 2}',
    "fp16": '"fp16": {"enabled": "auto"}',
    "bf16": '"bf16": {"enabled": "auto"}',
    "activation_checkpointing": '"activation_checkpointing": {"partition_activations": false}',
}
_SECTION_KEYS = {
    **{key: "zero_optimization" for key in (
        "stage", "offload_optimizer", "offload_param", "overlap_comm", "contiguous_gradients", "reduce_scatter",
        "reduce_bucket_size", "allgather_partitions", "allgather_bucket_size", "round_robin_gradients",
        "sub_group_size")},
    **{key: "fp16" for key in ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                               "min_loss_scale")},
}


def one_rank_zero3_notice(values: Mapping[str, Any]) -> str | None:
    """ZeRO 3 on a single rank, parameters not offloaded: said once as training starts. Why: there is nothing
    to partition across ranks, yet every layer's weights are still gathered and released in each forward
    and backward, and LLaMA-Factory's ds_z3 configs are often copied into one-GPU runs. The plan it names is this
    run's at ZeRO 2 (its recipe and overrides, recipe.typed.run_this_for; a deepspeed JSON sets the stage in its
    file, where a zero_stage=2 override would contradict it)."""
    from pipeline.recipe.typed import run_this_for

    if values["zero_stage"] != 3 or values["world_size"] != 1 or values["offload_param"] != "none":
        return None
    plan = run_this_for("plan", values, **({} if values.get("deepspeed") else {"zero_stage": "2"}))
    return ("note: zero_stage 3 on one rank partitions nothing, yet still gathers and releases every layer's "
            "weights in each forward and backward: on an H200 it ran at 0.2-0.65x the tokens/s of ZeRO 2, "
            f"for which {plan} estimates the same memory per rank "
            "(docs/packing-and-scale.md). On one rank use zero_stage: 2, or keep 3 with offload_param: cpu to hold "
            "the weights in host memory.")


REDUCE_BUCKET_MAX = 500_000_000  # DeepSpeed's default, and LLaMA-Factory's ds_z2_config.json


def reduce_bucket(stage: int, hidden_size: int | None, trainable: int | None) -> int:
    """Elements per gradient-reduction bucket.

    ZeRO 3: hidden_size² (transformers' "auto", as in LLaMA-Factory's ZeRO-3 configs). ZeRO 1-2: overlap_comm
    is off here, so each bucket is reduced synchronously inside the backward when it fills: small buckets buy
    no overlap, only calls (about 100 a step at hidden_size², on gpt2-small's 12-block structure 64 wide; one
    bucket there: 11% fewer ops and a 12% faster CPU step, docs/packing-and-scale.md). So one bucket takes
    every trainable gradient, capped at DeepSpeed's default. DeepSpeed stages gradients in a buffer of this
    many elements (2 bytes each in bf16/fp16 ZeRO 2; 4 in fp32, or ZeRO 1's fp32 accumulation), so the cap
    bounds it at 1-2 GB, as in LLaMA-Factory's ZeRO-2 config; a LoRA run's stays at its adapters' size."""
    square = hidden_size * hidden_size if hidden_size else None
    if stage == 3 or trainable is None:
        return square or REDUCE_BUCKET_MAX
    return min(REDUCE_BUCKET_MAX, max(square or 0, trainable))


def gradient_clipping(values: Mapping[str, Any]) -> float:
    """max_grad_norm, except under layer-wise GaLore or APOLLO: LLaMA-Factory's hooks step each weight and clear its gradient
    during the backward pass, so transformers' clipping afterwards finds no gradient and clips nothing; the same
    update here is taken after the backward pass, unclipped (docs/training.md, GaLore)."""
    if any(values.get(f"use_{key}") and values.get(f"{key}_layerwise") for key in ("galore", "apollo")):
        return 0.0
    return values["max_grad_norm"]


PURE_BF16_ZERO = {"enabled": True, "bf16_master_weights_and_grads": True, "bf16_optimizer_states": True}


def bf16_section(values: Mapping[str, Any]) -> dict[str, Any]:
    """DeepSpeed's bf16 section. pure_bf16 (pipeline.recipe.precision) wants no fp32 master copy: at ZeRO 0 the
    section stays off, so DeepSpeed leaves the bf16 parameters to the client optimizer; at ZeRO 1-2 it is on with
    DeepSpeed's bf16 masters, gradients and optimizer states (its partition copy is then bf16, the parameters'
    own values, and the optimizer's moments bf16: torch's AdamW on bf16 tensors, as at ZeRO 0). A LoRA / OFT
    adapter trains in fp32 on the bf16 base (pipeline.model.adapter.upcast_adapter, PEFT's): the section stays off at
    every stage, since DeepSpeed's bf16 would cast the adapter to bf16; its ZeRO 1-2 partition copy is then fp32, as
    the adapter is."""
    from pipeline.names import trains_adapter

    if (values.get("pure_bf16") and values["zero_stage"] in (1, 2)
            and not trains_adapter(values.get("finetuning_type", "lora"))):
        return dict(PURE_BF16_ZERO)
    return {"enabled": values["bf16"]}


def generate(values: Mapping[str, Any], hidden_size: int | None = None, trainable: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for the recipe's values (world size included); `trainable`: the trainable
    parameter count where the model can be read (it sizes the ZeRO 1-2 reduce bucket)."""
    stage = values["zero_stage"]
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=False, contiguous_gradients=True, reduce_scatter=True,
                    reduce_bucket_size=reduce_bucket(stage, hidden_size, trainable),
                    allgather_bucket_size=500_000_000)
        if values["offload_optimizer"] != "none":
            zero["offload_optimizer"] = {"device": values["offload_optimizer"], "pin_memory": True}
    if stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=int(0.9 * hidden_size * hidden_size) if hidden_size else 50_000_000,
            stage3_param_persistence_threshold=10 * hidden_size if hidden_size else 100_000,
            stage3_max_live_parameters=_BIG,
            stage3_max_reuse_distance=_BIG,
            stage3_gather_16bit_weights_on_model_save=True,
        )
        if values["offload_param"] != "none":
            zero["offload_param"] = {"device": values["offload_param"], "pin_memory": True}
    config: dict[str, Any] = {
        "train_batch_size": values["per_device_train_batch_size"] * values["gradient_accumulation_steps"]
        * values["world_size"],
        "train_micro_batch_size_per_gpu": values["per_device_train_batch_size"],
        "gradient_accumulation_steps": values["gradient_accumulation_steps"],
        "gradient_clipping": gradient_clipping(values),
        "bf16": bf16_section(values),
        "fp16": {
            "enabled": values["fp16"],
            "loss_scale": values["loss_scale"],
            "initial_scale_power": values["initial_scale_power"],
            "loss_scale_window": values["loss_scale_window"],
            "hysteresis": values["hysteresis"],
            "min_loss_scale": values["min_loss_scale"],
        },
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": _BIG,
        "wall_clock_breakdown": False,
    }
    if stage >= 1 and values["offload_optimizer"] != "none":
        config["zero_force_ds_cpu_optimizer"] = False  # the trainer's torch AdamW is allowed with offload
    return config


def build_ds_config(values: Mapping[str, Any], origins: Mapping[str, Origin]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config, recipe keys adopted from the user's JSON). Raises UserError with every contradiction."""
    from pipeline.recipe.modelinfo import model_info, param_counts

    info = model_info(values.get("model_name_or_path"))
    hidden = info.n_embd if info else None
    counts = param_counts(values, info) if info else None
    trainable = counts[1] if counts else None
    path = values.get("deepspeed")
    if path is None:
        return generate(values, hidden, trainable), {}
    user, text = _read_json(path, origins.get("deepspeed"))
    problems = _nesting_problems(user, path, text)
    if problems:  # merging a misshapen config would only add confusing follow-up messages
        raise UserError(problems)
    for key, reason in _REFUSED.items():
        if key in user and user[key] not in (False, None, {}):
            problems.append(f"{_at(path, text, (key,))}: {key}: {reason}")
    for section, advice in _CLIENT_SECTIONS.items():
        if section in user:
            problems.append(f"{_at(path, text, (section,))}: {section}: {advice}; remove the '{section}' section")
    adopted = _adopt(user, values, origins, path, text, problems)
    merged_values = {**values, **adopted}
    config = _merge(generate(merged_values, hidden, trainable), user, merged_values, origins, path, text, (), problems)
    for section in _CLIENT_SECTIONS:
        config.pop(section, None)
    if problems:
        raise UserError(problems)
    return config, adopted


def _read_json(path: str, origin: Origin | None) -> tuple[dict[str, Any], str]:
    where = origin.where + ": deepspeed" if origin is not None and origin.kind in ("file", "cli") else "deepspeed"
    if not os.path.isfile(path):
        raise UserError(f"{where}: file {path!r} not found (paths are relative to the current directory "
                        f"{os.getcwd()})")
    try:
        with open(path, "rb") as handle:
            text = handle.read().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: the DeepSpeed JSON is not UTF-8; save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"{where}: cannot read {path!r}: {err.strerror}") from None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise UserError(f"{path}: duplicate key {key!r} in the DeepSpeed JSON; keep one")
            out[key] = value
        return out

    try:
        data = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    except _NonFinite as err:
        raise UserError(f"{_constant_at(path, text)}: {err.args[0]} is not a number DeepSpeed can use (JSON has no "
                        "NaN or Infinity); give a finite number or \"auto\"") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}:1:1: a DeepSpeed config must be a JSON object {{...}}, found {type(data).__name__}")
    if "bfloat16" in data and "bf16" not in data:  # DeepSpeed's older spelling of the bf16 section
        data["bf16"] = data.pop("bfloat16")
    return data, text


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str) -> Any:
    raise _NonFinite(name)


def _constant_at(path: str, text: str) -> str:
    """`file:line:col` of the first NaN / Infinity outside a string."""
    for match in re.finditer(r'"(?:[^"\\]|\\.)*"|(-?Infinity|NaN)', text):
        if match.group(1):
            pos = match.start(1)
            return f"{path}:{text.count(chr(10), 0, pos) + 1}:{pos - (text.rfind(chr(10), 0, pos) + 1) + 1}"
    return path


def _nesting_problems(user: Mapping[str, Any], path: str, text: str) -> list[str]:
    """Sections given as plain values, and section keys written at the top level (DeepSpeed ignores those)."""
    problems = []
    for key, value in user.items():
        if key in _SECTIONS and not isinstance(value, Mapping):
            problems.append(f"{_at(path, text, (key,))}: {key}: given {json.dumps(value)}, expected an object "
                            f"{{...}} (e.g. {_SECTIONS[key]})")
        section = _SECTION_KEYS.get(key) or ("zero_optimization" if key.startswith("stage3_") else None)
        if section is not None:
            problems.append(f"{_at(path, text, (key,))}: {key}: belongs inside the \"{section}\" section "
                            f"(\"{section}\": {{\"{key}\": {json.dumps(value)}}}); at the top level DeepSpeed "
                            "ignores it")
    return problems


def _at(path: str, text: str, keys: tuple[str, ...]) -> str:
    """`file:line:col` of the last key of `keys` in the JSON text (found in order), or just `file`."""
    pos = 0
    for key in keys:
        found = text.find(json.dumps(key), pos)
        if found < 0:
            return path
        pos = found
    line = text.count("\n", 0, pos) + 1
    return f"{path}:{line}:{pos - (text.rfind(chr(10), 0, pos) + 1) + 1}"


def _get(data: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(data, Mapping) or key not in data:
            return None
        data = data[key]
    return data


def _recipe_where(key: str, origins: Mapping[str, Origin]) -> str:
    origin = origins.get(key)
    if key == "total_train_batch_size":
        return "per_device_train_batch_size x gradient_accumulation_steps x world size"
    if origin is None or origin.kind in ("default", "derived"):
        return origin.kind if origin else "recipe"
    return origin.where


def _contradiction(path: str, text: str, keys: tuple[str, ...], given: Any, key: str, expected: Any,
                   origins: Mapping[str, Origin]) -> str:
    dotted = ".".join(keys)
    return (f"{_at(path, text, keys)}: {dotted} is {json.dumps(given)} but the recipe has {key}: "
            f"{json.dumps(expected)} ({_recipe_where(key, origins)}); set it to \"auto\" in {path} or make them agree")


def _adopt(user: Mapping[str, Any], values: Mapping[str, Any], origins: Mapping[str, Origin], path: str, text: str,
           problems: list[str]) -> dict[str, Any]:
    from jsonschema import Draft202012Validator

    from pipeline.recipe import spec

    adopted: dict[str, Any] = {}
    for keys, key in ADOPTED.items():
        given = _get(user, keys)
        if given is None or given == "auto" or given == values[key]:
            continue
        if key in ("offload_optimizer", "offload_param") and given == "none":
            continue
        if not Draft202012Validator(spec.properties()[key]).is_valid(given):
            problems.append(f"{_at(path, text, keys)}: {'.'.join(keys)}: given {json.dumps(given)}, expected "
                            f"{spec.describe(spec.properties()[key])}")
        elif origins[key].kind in ("file", "cli"):
            problems.append(_contradiction(path, text, keys, given, key, values[key], origins))
        else:
            adopted[key] = given
    return adopted


def _pure_bf16_contradiction(path: str, text: str, keys: tuple[str, ...], given: Any, ours: Any,
                             values: Mapping[str, Any]) -> str:
    """A bf16 section that would give DeepSpeed fp32 master copies (or other bf16 settings) under pure_bf16, or
    cast a LoRA / OFT adapter, which trains in fp32 there, to bf16."""
    from pipeline.names import trains_adapter

    wanted = json.dumps(bf16_section(values))
    why = ("the adapter trains in fp32 on the bf16 base, as PEFT holds it, and DeepSpeed's bf16 would cast it"
           if trains_adapter(values.get("finetuning_type", "lora")) else "no fp32 master copy")
    return (f"{_at(path, text, keys)}: {'.'.join(keys)}: given {json.dumps(given)}, but pure_bf16: true at ZeRO "
            f"{values['zero_stage']} needs {json.dumps(ours)} there (the bf16 section {wanted}: {why}); set it to "
            "\"auto\" or remove the bf16 section")


def _merge(generated: Mapping[str, Any], user: Mapping[str, Any], values: Mapping[str, Any],
           origins: Mapping[str, Origin], path: str, text: str, prefix: tuple[str, ...],
           problems: list[str]) -> dict[str, Any]:
    """The user's JSON over the generated config: "auto" takes the generated value, explicit values are checked."""
    out = copy.deepcopy(dict(generated))
    for key, given in user.items():
        keys = prefix + (key,)
        ours = generated.get(key)
        if isinstance(given, Mapping) and isinstance(ours, Mapping):
            out[key] = _merge(ours, given, values, origins, path, text, keys, problems)
            continue
        if given == "auto":
            if ours is None:
                problems.append(f"{_at(path, text, keys)}: {'.'.join(keys)} is \"auto\" but nothing in the recipe "
                                "fills it; give a value")
            else:
                out[key] = copy.deepcopy(ours)
            continue
        recipe_key = STRICT.get(keys)
        if keys[0] == "bf16" and values.get("pure_bf16"):
            if given != ours:
                problems.append(_pure_bf16_contradiction(path, text, keys, given, ours, values))
        elif recipe_key is not None:
            expected = values[recipe_key]
            same = given == expected and isinstance(given, bool) == isinstance(expected, bool)
            if not same:
                problems.append(_contradiction(path, text, keys, given, recipe_key, expected, origins))
        out[key] = copy.deepcopy(given)
    return out
