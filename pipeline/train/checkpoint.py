"""Resumable checkpoints: `checkpoint-<step>/` appears complete or not at all, and is verified before use.

    checkpoint-<step>/
      manifest.json         sha256 and size of every other file (written last)
      trainer_state.json    step, data position (epoch, batch index), tokens seen, the recipe values resume needs,
                            the objective's own state (stage dpo's BCO running mean; stage ppo's KL coefficient
                            and score moments)
      adapter/              lora: adapter_config.json + adapter_model.safetensors (PEFT layout, fp32)
      model/                full/freeze: config.json + model.safetensors (usable as model_name_or_path)
      deepspeed/            DeepSpeed's own state, per rank: optimizer / ZeRO partitions with the fp32 masters,
                            LR scheduler, loss scaler, step counters (trainable weights only)
      rng/rank-<r>.safetensors   torch, python and numpy RNG states of every rank

DeepSpeed's `save_checkpoint` / `load_checkpoint` do the per-stage work, through
`pipeline.train.safestate`'s checkpoint engine, so the files under deepspeed/ are safetensors (with DeepSpeed's
`.pt` names) and loading never unpickles. All ranks write into `.checkpoint-<step>.tmp-<host>-<pid of rank 0>/`;
rank 0 writes the manifest and renames the directory. A crash before the rename leaves only the temp directory,
removed by the next run once its owner is dead. `latest` takes the newest checkpoint whose manifest matches its files.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

from pipeline.errors import UserError, article
from pipeline.io import replace_dir, sha256_file, write_json
from pipeline.recipe.args import TrainArgs, key_at, preference_args
from pipeline.runtime import deepspeed_compat
from pipeline.runtime import dist
from pipeline.train import world_change
from pipeline.names import PREFERENCE_STAGES

FORMAT = "pipeline-checkpoint"
VERSION = 1
PREFIX = "checkpoint-"
MANIFEST = "manifest.json"
STATE = "trainer_state.json"
OBJECTIVE = "objective"  # trainer_state.json's key for the objective's state (Trainer.checkpoint_state)
DS_TAG = "deepspeed"
RNG_DIR = "rng"
LOG_WINDOW = "log_window"  # a key of the per-rank rng file: the sums of the log line under way
_NAME = re.compile(r"^checkpoint-(\d+)$")
# What a resume does when the recipe changed since the checkpoint (the table is docs/resume.md's):
# REFUSE: the saved state cannot be loaded with another value, or the data position would point at other
# batches (model, data, shapes, batch layout). APPLY: used from the resumed step on, and said so (the way a user
# lowers the learning rate mid-run; the schedule continues from the current step with the new settings).
# KEEP: the checkpoint's value stays (it lives in the optimizer's saved state), with a notice.
# Every other key (logging, saving, evaluation cadence, output) takes the new value without a word.
REFUSE = ("stage", "finetuning_type", "lora_rank", "lora_alpha", "lora_target", "use_rslora", "use_dora",
          "oft_rank", "oft_block_size",
          "additional_target", "freeze_trainable_layers", "use_llama_pro", "freeze_trainable_modules",
          "freeze_extra_modules", "zero_stage", "bf16", "fp16", "pure_bf16", "world_size",
          "per_device_train_batch_size",
          "gradient_accumulation_steps", "ppo_buffer_size", "seed", "cutoff_len", "model_name_or_path", "adapter_name_or_path",
          "context_length", "rope_scaling", "qkv_bias", "tie_word_embeddings", "dataset", "mix_strategy",
          "interleave_probs", "template", "train_on_prompt",
          "mask_history", "max_samples", "val_size", "overlength_policy", "pt_stride", "group_by_length", "packing",
          "neat_packing", "loraplus_lr_ratio", "optim", "optim_args", "use_muon", "use_galore", "galore_target", "galore_rank",
          "galore_update_interval", "galore_scale", "galore_proj_type", "galore_layerwise", "use_apollo",
          "apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale", "apollo_proj", "apollo_proj_type",
          "apollo_scale_type", "apollo_layerwise", "use_adam_mini", "use_badam", "badam_mode", "badam_start_block",
          "badam_switch_mode", "badam_switch_interval", "badam_update_ratio", "badam_mask_mode",
          "disable_shuffling", "pissa_init", "pissa_iter",
          "new_special_tokens", "add_special_tokens", "add_tokens", "new_special_tokens_config", "init_special_tokens",
          "split_special_tokens",
          "resize_vocab", "quantization_bit", "quantization_type", "double_quantization")
APPLY = ("learning_rate", "weight_decay", "lr_scheduler_type", "warmup_steps", "warmup_ratio", "min_lr_ratio",
         "max_steps", "num_train_epochs", "max_grad_norm", "dropout", "lora_dropout", "l1_lambda",
         "moe_aux_loss_coef", "neftune_noise_alpha", "label_smoothing_factor", "use_dft_loss", "use_eaft_loss", "eaft_alpha",
         "use_asft_loss", "asft_alpha",
         # stage dpo's objective: a new loss, beta or reference is a different objective from here on, so say so
         "pref_loss", "pref_beta", "pref_ftx", "dpo_label_smoothing", "simpo_gamma", "ref_model",
         "ref_model_adapters", "pref_bco_weight", "ld_alpha", "kto_chosen_weight", "kto_rejected_weight",
         # stage ppo's objective: another reward model, KL target or score treatment from here on
         "reward_model", "reward_model_type", "ppo_epochs", "ppo_target", "ppo_whiten_rewards", "ppo_score_norm")
KEEP = ("adam_beta1", "adam_beta2", "adam_epsilon")
# The generation settings: eval's alone elsewhere (taken without a word), but stage ppo's rollouts are generated
# with them (pipeline.train.ppo), so there a new value changes the responses trained on from here: APPLY
PPO_ROLLOUT = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty")
SAMPLING = ("temperature", "top_k", "top_p")  # used only when do_sample is true
DROPOUT_KEYS = ("dropout", "lora_dropout")  # APPLY keys stage dpo never uses (preference.disable_dropout)
RESUME_KEYS = REFUSE  # the name older code used
# A refused key the resolver derives from others when the recipe leaves it unset: lora_alpha is 2 x lora_rank,
# cutoff_len the model's context when shorter than the default, context_length window x factor under rope_scaling. When a source is reported, the derived value's
# own change is that report again, about a key the user never wrote, so it is not said.
DERIVED_FROM = {"lora_alpha": ("lora_rank",), "cutoff_len": ("context_length", "model_name_or_path"),
                "context_length": ("rope_scaling", "cutoff_len", "model_name_or_path")}
DATA_KEY = "training data"  # the sha256 of every built train.json, saved beside the recipe values
FILES_KEY = "training files"  # every built file the train split reads (a val.json too) -> its sha256, in order
# pt / sft since 2026-12-05: an update's loss is over all its labelled tokens (pipeline.train.loop.step_scale);
# checkpoints without the key were trained with a mean per micro-batch, averaged over micro-batches and ranks
LOSS_KEY, LOSS_RULE = "loss normalization", "the labelled tokens of the whole update"
# the pt / sft token losses that resumes changed (token_loss_changes), beside the recipe values of the checkpoint
CHANGES_KEY = "token loss changes"
# each local ref_model_adapters folder -> the sha256 of its adapter files: the key can name the same folder after
# its files were rewritten (a retrained sft run in place), which changes the reference as a new value would
ADAPTERS_KEY = "reference adapter files"


def ppo_rollout_keys(sampling: bool) -> tuple[str, ...]:
    """The generation keys stage ppo's rollouts read: greedy ones (do_sample false) read no sampling key."""
    return tuple(k for k in PPO_ROLLOUT if sampling or k not in SAMPLING)


@dataclass
class TrainState:
    """Where training stands: restored on resume, so the next batch is the one an uninterrupted run takes."""

    global_step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches of `epoch` already consumed (the same on every rank)
    tokens_seen: int = 0  # all ranks, attention-mask tokens
    trained_tokens_seen: int = 0  # all ranks, tokens with a label
    skipped_batches: int = 0  # non-finite losses dropped under nan_policy: skip

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainState":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: int(v) for k, v in data.items() if k in names})


# ---------------------------------------------------------------------------------------------- listing

def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


def step_dir(output_dir: str | Path, step: int) -> Path:
    """Where the checkpoint of `step` lives."""
    return Path(output_dir) / f"{PREFIX}{step}"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-<step> directories, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found, key=lambda p: step_of(p) or 0)


def _files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            yield path


def problems_with(path: str | Path) -> list[str]:
    """Why a checkpoint directory cannot be used ([] when its manifest matches its files)."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a directory"]
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"{path / MANIFEST} is missing (the checkpoint was not finished)"]
    except (OSError, ValueError) as err:
        return [f"{path / MANIFEST} is unreadable ({err})"]
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return [f"{path / MANIFEST} is not {article(FORMAT)} {FORMAT} manifest"]
    if manifest.get("version") != VERSION:
        return [f"{path / MANIFEST} has version {manifest.get('version')!r}; this trainer reads version {VERSION}"]
    problems = []
    for rel, info in sorted(manifest.get("files", {}).items()):
        file = path / rel
        if not file.is_file():
            problems.append(f"{file} is missing")
        elif file.stat().st_size != info.get("bytes"):
            problems.append(f"{file} has {file.stat().st_size} bytes, the manifest says {info.get('bytes')}")
        elif sha256_file(file) != info.get("sha256"):
            problems.append(f"{file} does not match its sha256 in the manifest (corrupted or modified)")
    if STATE not in manifest.get("files", {}):
        problems.append(f"{path / STATE} is not listed in the manifest")
    return problems


def read_state(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / STATE).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- resume

where = key_at  # the name train's modules use


def find_resume(value: str | None, output_dir: str | Path, at: str = "resume_from_checkpoint",
                warn: bool = True) -> Path | None:
    """The checkpoint resume_from_checkpoint (`value`; `at`: where it was set) names: None for a fresh run; a
    UserError when it cannot be used. 'latest' is the newest intact checkpoint in output_dir; `warn`: whether to
    say which damaged ones it skipped (a caller that asks again later says it then: pipeline.train.run.check_start)."""
    if value is None:
        return None
    output_dir = Path(output_dir)
    if value == "latest":
        candidates = list_checkpoints(output_dir)
        if not candidates:
            raise UserError(f"{at}: 'latest', but {output_dir} holds no checkpoint-<step>/ directory; remove "
                            "resume_from_checkpoint to start a new run")
        damaged: list[str] = []
        for path in reversed(candidates):
            problems = problems_with(path)
            if not problems:
                if damaged and warn and dist.is_main():
                    print(f"warning: skipped damaged checkpoints: {'; '.join(damaged)}; resuming from {path}",
                          file=sys.stderr)
                return path
            damaged.append(f"{path.name} ({problems[0]})")
        raise UserError(f"{at}: 'latest', but every checkpoint in {output_dir} is damaged: {'; '.join(damaged)}")
    path = Path(value)
    if not path.exists():
        available = ", ".join(p.name for p in list_checkpoints(output_dir)) or "none"
        raise UserError(f"{at}: {value!r} does not exist (checkpoints in {output_dir}: {available}; "
                        "'latest' picks the newest)")
    not_one = _not_a_checkpoint(path)
    if not_one:
        raise UserError(f"{at}: {not_one}")
    problems = problems_with(path)
    if problems:
        raise UserError([f"{at}: {path} cannot be resumed from: {p}" for p in problems])
    return path


def _not_a_checkpoint(path: Path) -> str | None:
    """Why a folder without a manifest is no checkpoint at all, when it is a run's output_dir or a folder inside a
    checkpoint (the message was "manifest.json is missing (the checkpoint was not finished)")."""
    if (path / MANIFEST).exists():
        return None
    inside = [p.name for p in list_checkpoints(path)]
    if inside:
        return (f"{path} is a run's output directory, not a checkpoint; give one of its checkpoints "
                f"({', '.join(inside)}, e.g. {path / inside[-1]}), or 'latest' for the newest intact one in output_dir")
    holder = next((p for p in path.resolve().parents if step_of(p) is not None and (p / MANIFEST).exists()), None)
    if holder is not None:
        return f"{path} is a folder inside the checkpoint {holder}; give the checkpoint itself"
    return None


def saved_recipe(r: Mapping[str, Any], loss_changes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The recipe values a checkpoint records (trainer_state.json "recipe"), for check_compatible on resume, and
    the token loss changes of the run's resumes so far (token_loss_changes), for the next resume to carry on."""
    values = {k: r[k] for k in (*REFUSE, *APPLY, *KEEP, *PPO_ROLLOUT) if k in r}
    values[DATA_KEY] = training_data(r)
    values[FILES_KEY] = training_files(r)
    values[LOSS_KEY] = LOSS_RULE
    values[ADAPTERS_KEY] = reference_adapter_files(r)
    if loss_changes:
        values[CHANGES_KEY] = loss_changes
    return values


def token_loss_changes(r: Mapping[str, Any], path: Path | None) -> list[dict[str, Any]]:
    """The changes of the pt / sft loss (names.token_loss: label_smoothing_factor, use_dft_loss, use_eaft_loss,
    eaft_alpha, use_asft_loss, asft_alpha; APPLY keys) made on resuming, oldest first, as {"step", "from", "to"}: those the checkpoint at
    `path` carries from earlier resumes, then this resume's own, after the checkpoint's step. all_results.json
    records them: a resumed run's last settings alone would name the loss of the steps before the resume too."""
    from pipeline.names import token_loss

    if path is None:
        return []
    state = read_state(path)
    saved = state.get("recipe", {})
    changes = [c for c in saved.get(CHANGES_KEY, []) if isinstance(c, dict)]
    before, now = token_loss(saved), token_loss(r)
    if saved and before != now:
        changes.append({"step": state.get("global_step"), "from": before, "to": now})
    return changes


def training_files(r: Mapping[str, Any]) -> dict[str, str | None]:
    """`<dataset>/<split>.json` -> sha256 of every built file the train split is made of, in the loader's order.

    Beside train.json (DATA_KEY), a dataset's val.json trains too when eval_dataset names other datasets
    (pipeline.data.built.training_splits): adding or dropping eval_dataset changes the rows under the same
    train.json, and a resume went on at the saved batch index of another shuffle of other rows."""
    from pipeline.data.built import read_manifest
    from pipeline.data.load import split_files
    from pipeline.recipe.args import data_args

    out: dict[str, str | None] = {}
    for file in split_files(data_args(r), "train"):
        files = (read_manifest(file.parent) or {}).get("files") or {}
        out[f"{file.parent.name}/{file.name}"] = (files.get(file.name) or {}).get("sha256")
    return out


def reference_adapter_files(r: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Each ref_model_adapters folder on disk -> {adapter file: sha256}: what the reference folded in (a hub id,
    which names a fixed revision's files, is left out)."""
    from pipeline.model.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
    from pipeline.names import split_names

    folders = [Path(name) for name in split_names(r.get("ref_model_adapters"))]
    return {str(folder): {name: sha256_file(folder / name) for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
                          if (folder / name).is_file()} for folder in folders if folder.is_dir()}


def _reference_adapter_notices(r: Mapping[str, Any], path: Path, saved: Mapping[str, Any]) -> list[str]:
    """The ref_model_adapters folders, named as before, whose files differ from those `path` was trained against:
    the reference is new from the resumed step on, as with a new ref_model_adapters value (an APPLY key)."""
    before = saved.get(ADAPTERS_KEY)
    if not isinstance(before, Mapping) or saved.get("ref_model_adapters") != r.get("ref_model_adapters"):
        return []  # a checkpoint without the record, or a new value: that change's own notice says it
    now, step = reference_adapter_files(r), read_state(path).get("global_step", "?")
    notices = []
    for folder, files in before.items():
        new = now.get(folder, {})
        differ = sorted(name for name in {*files, *new} if files.get(name) != new.get(name))
        if differ:
            notices.append(f"resume: {where(r, 'ref_model_adapters')}: {folder} changed since {path} was saved "
                           f"({', '.join(differ)}: another sha256): the reference folds in the new adapter from step "
                           f"{step} on (put the old files back to resume the same run)")
    return notices


def training_data(r: Mapping[str, Any]) -> dict[str, str | None]:
    """dataset name -> the sha256 of its built train.json (the rows the data position counts in)."""
    from pipeline.data.built import built_dir, read_manifest

    out = {}
    for name in r["dataset"] if isinstance(r["dataset"], list) else [r["dataset"]]:
        files = (read_manifest(built_dir(r["dataset_dir"], name)) or {}).get("files") or {}
        out[name] = (files.get("train.json") or {}).get("sha256")
    return out


def _comparable(key: str, value: Any, values: Mapping[str, Any]) -> Any:
    """What a resume compares of a recipe value (`values`: the recipe, or the checkpoint's saved values, it belongs to):
    the optimizer `optim` builds, not its name (the AdamW names are one optimizer and state, so switching between them
    is no change); optim_args as the keyword arguments transformers' Trainer passes that optimizer (spaces, order and
    the keys it ignores are no change: under AdamW or adafactor all of them); quantization_type and
    double_quantization only under quantization_bit 4; every other value as it is."""
    from pipeline.model.optimizer_state import effective_optim_args, optimizer_named

    if key in ("quantization_type", "double_quantization") and values.get("quantization_bit") != 4:
        return None  # only a 4-bit base reads them (the recipe notices say so): not a change of the model without it
    if key == "optim" and isinstance(value, str):
        return optimizer_named(value)
    if key == "optim_args" and isinstance(value, str):
        try:
            return effective_optim_args(str(values.get("optim", "")), value)
        except ValueError:  # refused at the key before a resume gets here; compared as written if not
            return value
    return value


def _show(value: Any) -> str:
    return json.dumps(value)


def check_compatible(r: Mapping[str, Any], path: Path) -> list[str]:
    """Refuse a resume whose recipe differs from the checkpoint's where the saved state depends on it; returns
    the notices for the keys that changed and are applied or kept (see REFUSE, APPLY, KEEP)."""
    state = read_state(path)
    if state.get("save_only_model"):
        weights = path / ("adapter" if (path / "adapter").is_dir() else "model")
        raise UserError(f"{where(r, 'resume_from_checkpoint')}: {path} was saved with save_only_model: true: it "
                        "holds the weights only, without the optimizer, scheduler and RNG state a resume needs, so "
                        f"resuming from it is refused. Start a new run from its weights ({weights} as "
                        f"{'adapter_name_or_path' if weights.name == 'adapter' else 'model_name_or_path'}), or "
                        "train with save_only_model: false to get resumable checkpoints")
    saved = state.get("recipe", {})
    changed = [k for k in saved if k in r and _comparable(k, saved[k], saved) != _comparable(k, r[k], r)]
    change = resumed_world_change(r, path, saved)  # another rank count: its own rules, batch keys included
    refused = [k for k in changed if k in REFUSE and not (change and k in world_change.BATCH_KEYS)]
    source = getattr(r, "source", lambda key: "default")
    problems = [_refused(r, key, saved[key], path) for key in refused
                if not (source(key) == "derived" and set(DERIVED_FROM.get(key, ())) & set(refused))]
    if change:
        problems += world_change.problems(
            change, path, int(state.get("batch_in_epoch", 0)), stage=r["stage"], asft=bool(r.get("use_asft_loss")),
            group_by_length=bool(r.get("group_by_length")), disable_shuffling=bool(r.get("disable_shuffling")),
            offload_optimizer=r.get("offload_optimizer", "none"),
            accumulation_at=where(r, "gradient_accumulation_steps"),
            bco=r["stage"] == "dpo" and preference_args(r).loss_config().adds_bco)
    if r.get("pissa_init") and saved and "pissa_init" not in saved:  # saved before PiSSA existed here: without it
        problems.append(f"{where(r, 'pissa_init')} is true but {path} was trained without PiSSA (its LoRA started "
                        "from the default init on the original base), so its weights belong to another model; remove "
                        f"pissa_init to resume it, or start a new run")
    step = state.get("global_step")
    if "max_steps" in changed and r["max_steps"] is not None and isinstance(step, int) and r["max_steps"] <= step:
        # applying it would say "applied from step N on" and then "done" without a step trained, exit 0
        problems.append(f"{where(r, 'max_steps')} {r['max_steps']} is not after {path}'s step {step}: nothing to "
                        f"train; resume with max_steps above {step} (it was {_show(saved['max_steps'])})")
    if DATA_KEY in saved:
        from pipeline.data.built import built_dir

        now = training_data(r)
        problems += [f"{where(r, 'dataset')}: the built training rows of '{name}' are not the ones {path} was "
                     f"trained on ({built_dir(r['dataset_dir'], name)}/train.json was rebuilt from other sources "
                     "or settings), so "
                     "its data position would point at other rows; resume with the data it was trained on, or "
                     f"start a new run from {path}/adapter or {path}/model"
                     for name in now if name in saved[DATA_KEY] and saved[DATA_KEY][name] != now[name]]
    problems += _training_files_problems(r, path, saved.get(FILES_KEY))
    if problems:
        raise UserError(problems)
    inert = DROPOUT_KEYS if r.get("stage") in PREFERENCE_STAGES else ()  # dpo / kto train without dropout (as TRL)
    applied = (*APPLY, *ppo_rollout_keys(bool(r.get("do_sample")))) if r.get("stage") == "ppo" else APPLY
    notices = [change.notice()] if change else []
    notices += [f"resume: {where(r, k)} changed from {_show(saved[k])} to {_show(r[k])}: applied from step "
               f"{state.get('global_step', '?')} on" for k in changed if k in applied and k not in inert]
    notices += _reference_adapter_notices(r, path, saved)
    notices += [f"resume: {where(r, k)} changed from {_show(saved[k])} to {_show(r[k])}: no effect, stage "
                f"{r.get('stage')} trains without dropout" for k in changed if k in inert]
    notices += [f"resume: {where(r, k)} changed from {_show(saved[k])} to {_show(r[k])}: ignored, the "
                "checkpoint's optimizer state keeps its value (start a new run to change it)"
                for k in changed if k in KEEP]
    pooled = r.get("gradient_accumulation_steps", 1) > 1 or r.get("world_size", 1) > 1
    if saved and LOSS_KEY not in saved and r.get("stage") in ("pt", "sft") and pooled:
        notices.append(f"resume: {path} was trained by an earlier version, whose {r['stage']} loss was a mean per "
                       f"micro-batch, averaged over the accumulation steps and ranks; from step "
                       f"{state.get('global_step', '?')} on, an update's loss is the mean over all its trained tokens "
                       "(docs/training.md), so the loss curve may shift slightly there")
    return notices


def check_schedule(r: Mapping[str, Any], path: Path) -> None:
    """Refuse a resume whose schedule, as derived from the data (r["total_steps"]), ends before the checkpoint.

    check_compatible catches a lowered max_steps before the data is read; num_train_epochs (or max_steps: null)
    gives the step count only now. Left alone, the loop ran no step, the final export replaced output_dir/adapter
    (or model) with this older checkpoint's weights, the log lost its later lines, and the run said "done" with
    exit 0. Ending exactly at the checkpoint with the schedule unchanged is a resume after a stop at the last
    step: it finishes the export."""
    state = read_state(path)
    step, total = state.get("global_step"), r["total_steps"]
    saved = state.get("recipe", {})
    changed = [k for k in ("max_steps", "num_train_epochs") if k in saved and saved[k] != r[k]]
    if not isinstance(step, int) or total > step or (total == step and not changed):
        return
    key = "max_steps" if r["max_steps"] is not None else "num_train_epochs"
    raise UserError(f"{where(r, key)}: the schedule now ends at step {total} ({key} {_show(r[key])}), which is not "
                    f"after {path}'s step {step}: nothing to train (and the final weights would be replaced by that "
                    f"older checkpoint's); resume with a schedule that ends after step {step} (max_steps above {step} "
                    "or more num_train_epochs)")


def _refused(r: Mapping[str, Any], key: str, saved: Any, path: Path) -> str:
    """The message for a refused key (world_size, which the launch decides, has pipeline.train.world_change's)."""
    return f"{where(r, key)} is {_show(r[key])} but {path} was trained with {_show(saved)}; resume with the same " \
           f"value (or start a new run from {path}/adapter or {path}/model)"


def _training_files_problems(r: Mapping[str, Any], path: Path, saved: Mapping[str, Any] | None) -> list[str]:
    """Why the recipe's train split is not the one `path` was trained on ([] when it is, or when the checkpoint
    predates FILES_KEY). A rebuilt train.json is DATA_KEY's message already."""
    if not isinstance(saved, Mapping):
        return []
    now = training_files(r)
    advice = (f"its data position would point at other rows; resume with the data it was trained on, or start a new "
              f"run from {path}/adapter or {path}/model")
    if list(saved) != list(now):
        return [f"{where(r, 'eval_dataset')}: {path} was trained on {', '.join(saved) or 'nothing'}, the recipe now "
                f"trains on {', '.join(now) or 'nothing'} (a dataset's val split trains too when eval_dataset names "
                f"other datasets); {advice}"]
    return [f"{where(r, 'dataset')}: the built rows of {name} are not the ones {path} was trained on (rebuilt from "
            f"other sources or settings); {advice}"
            for name in now if not name.endswith("/train.json") and saved[name] != now[name]]


def apply_changes(engine: Any, r: Mapping[str, Any], path: Path, scheduler: Any = None) -> None:
    """After load: the recipe's learning rate, weight decay and schedule replace the checkpoint's. `scheduler`: the
    run's LR schedule where DeepSpeed does not hold it (stage ppo steps it once per PPO step).

    DeepSpeed restores the optimizer's param groups (lr, initial_lr, weight_decay) and the LambdaLR's base_lrs
    from the checkpoint; the schedule's shape (kind, warmup, total steps, floor) is the recipe's already, since
    the lambda is built from it. With nothing of APPLY changed nothing is touched (bitwise resume).
    """
    saved = read_state(path).get("recipe", {})
    if not any(k in saved and saved[k] != r[k] for k in APPLY):
        return
    from pipeline.recipe.args import train_args
    from pipeline.train.optim import train_groups

    scheduler = scheduler or engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    wanted = train_groups(engine.module, train_args(r))  # the optimizer's groups, in its order
    if len(wanted) != len(groups):
        raise RuntimeError(f"{len(groups)} optimizer groups restored from {path}, {len(wanted)} expected")
    scheduler.base_lrs = [float(g["lr"]) for g in wanted]
    for index, (group, settings) in enumerate(zip(groups, wanted)):
        group["initial_lr"] = float(settings["lr"])  # LoRA+: each group keeps its own multiple of learning_rate
        group["weight_decay"] = float(settings["weight_decay"])
        group["lr"] = scheduler.base_lrs[index] * scheduler.lr_lambdas[index](scheduler.last_epoch)


# ---------------------------------------------------------------------------------------------- RNG

def _rng_state() -> dict[str, Any]:
    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ---------------------------------------------------------------------------------------------- save / load

def attach(engine: Any) -> None:
    """Prepare a DeepSpeed engine for these checkpoints.

    Its checkpoint engine becomes the safetensors one (never pickle). Its module_state_dict learns to leave
    out frozen weights reached through a second name: DeepSpeed drops frozen parameters by their first name
    only, so a frozen tied output head (lm_head.weight = wte.weight) was written into every LoRA checkpoint.
    """
    from pipeline.train.safestate import load_state, save_state

    deepspeed_compat.use_checkpoint_engine(engine, deepspeed_compat.checkpoint_engine(save_state, load_state))
    deepspeed_compat.exclude_frozen_aliases(engine)


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Belt and braces: any torch.load DeepSpeed might still reach runs with weights_only=True."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def _fsync_tree(root: Path) -> None:
    for path in _files(root):
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def save(engine: Any, train: TrainArgs, state: TrainState, exporter: Any, recipe: Mapping[str, Any],
         log_window: Mapping[str, Any] | None = None, objective: Mapping[str, Any] | None = None) -> Path:
    """Write checkpoint-<step>/ (every rank must call this). Returns its path. `recipe` (saved_recipe) is stored
    beside the step so that a resume can tell which settings changed; `log_window` (this rank's sums since the
    last log line, pipeline.train.loop.Window.sums) beside this rank's RNG state; `objective` (the objective's
    state, the same on every rank: saved_objective) beside the step."""
    output_dir = Path(train.output_dir)
    final = step_dir(output_dir, state.global_step)
    tmp = output_dir / f".{final.name}.tmp-{owner()}"
    if dist.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    try:
        _write(engine, train, state, exporter, recipe, log_window, objective, tmp, final)
    except Exception as err:
        if not _out_of_space(err):
            raise
        if dist.is_main():  # the half-written checkpoint would keep the space the user is about to free
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, UserError):
            raise
        free = ""
        with contextlib.suppress(OSError):
            free = f" ({shutil.disk_usage(output_dir).free / 1e6:,.1f} MB free there)"
        raise UserError(f"{getattr(err, 'filename', None) or tmp}: no space left on device while saving {final.name}"
                        f"{free}; the half-written copy was removed and the earlier checkpoints are intact. Free "
                        "some space, then continue with resume_from_checkpoint=latest") from None
    dist.barrier()
    return final


def _out_of_space(err: BaseException) -> bool:
    """A full disk, as the OS, safetensors or pipeline.io's own message says it."""
    from pipeline.io import disk_full

    return disk_full(err) or (isinstance(err, UserError) and "no space left on device" in str(err))


def _write(engine: Any, train: TrainArgs, state: TrainState, exporter: Any, recipe: Mapping[str, Any],
           log_window: Mapping[str, Any] | None, objective: Mapping[str, Any] | None, tmp: Path, final: Path) -> None:
    """save's writes into `tmp`, then the manifest and the rename to `final` (rank 0)."""
    from pipeline.train.safestate import save_state

    output_dir = final.parent
    only_model = bool(train.save_only_model)
    if not only_model:  # save_only_model: the weights only (no optimizer, scheduler, RNG): not resumable
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state={}, save_latest=False,
                               exclude_frozen_parameters=True)
        save_state({**_rng_state(), **({LOG_WINDOW: dict(log_window)} if log_window else {})},
                   tmp / RNG_DIR / f"rank-{dist.rank()}.safetensors")
    exporter.write(tmp)
    dist.barrier()
    if dist.is_main():
        for script in deepspeed_compat.HELPER_SCRIPTS:  # DeepSpeed's helpers cannot read these files
            (tmp / script).unlink(missing_ok=True)
        write_json(tmp / STATE, {**state.to_dict(), "recipe": dict(recipe),
                                 **({OBJECTIVE: dict(objective)} if objective else {}),
                                 **({"save_only_model": True} if only_model else {})})
        files = {str(p.relative_to(tmp)): {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in _files(tmp)}
        write_json(tmp / MANIFEST, {"format": FORMAT, "version": VERSION, "step": state.global_step, "files": files})
        _fsync_tree(tmp)
        # a re-run reaching the same step replaces the old checkpoint: the old or the new one is always there
        replace_dir(tmp, final, output_dir / f".{final.name}.old-{owner()}")
        prune(output_dir, train.save_total_limit, keep=final)


def prune(output_dir: Path, limit: int | None, keep: Path) -> list[Path]:
    """Delete the oldest checkpoints beyond `limit` (never `keep`); returns what was removed."""
    if not limit:
        return []
    checkpoints = [p for p in list_checkpoints(output_dir) if p != keep]
    doomed = checkpoints[: max(0, len(checkpoints) + 1 - limit)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def resumed_world_change(r: Mapping[str, Any], path: Path,
                         saved: Mapping[str, Any] | None = None) -> world_change.WorldChange | None:
    """How the rank count of this resume differs from `path`'s (None: the same); `saved`: its recorded recipe values
    when already read. check_compatible decides whether it can be resharded."""
    saved = read_state(path).get("recipe", {}) if saved is None else saved
    layout = tuple(int(r.get(key, 1)) for key in world_change.BATCH_KEYS)  # 1: a plain dict without them (tests)
    return world_change.world_change(saved, layout, r)  # type: ignore[arg-type]


def load(engine: Any, path: Path, change: world_change.WorldChange | None = None) -> TrainState:
    """Restore DeepSpeed's state, this rank's RNG and the data position (every rank must call this). `change`: the
    checkpoint was written by another number of ranks (resumed_world_change): the ZeRO partitions are rebuilt for
    this one and the data position counted in this run's micro-batches; a rank the checkpoint had not keeps the RNG
    state seed_everything gave it (dropout draws on another rank count are not the uninterrupted run's anyway)."""
    from pipeline.train.safestate import StateFileError, load_state

    if change:
        problem = deepspeed_compat.reshard_problem(engine)
        if problem:
            raise UserError(change.refusal(path, problem))
    resharded = deepspeed_compat.resharded_loads(engine, change.saved_world) if change else contextlib.nullcontext()
    try:
        with _weights_only_loads(), resharded:
            loaded, _ = engine.load_checkpoint(str(path), tag=DS_TAG, load_module_strict=False,
                                               load_optimizer_states=True, load_lr_scheduler_states=True)
        if loaded is None:
            raise UserError(f"{path}/{DS_TAG}: DeepSpeed found no state to load; the checkpoint is incomplete")
        rng_file = path / RNG_DIR / f"rank-{dist.rank()}.safetensors"
        if not rng_file.is_file() and not (change and dist.rank() >= change.saved_world):
            raise UserError(f"{rng_file} is missing: the checkpoint was written by fewer ranks")
        if rng_file.is_file():
            _set_rng_state(load_state(rng_file))
    except StateFileError as err:
        raise UserError(f"{err.path}: {err.reason}; this trainer writes and reads only its own safetensors state, "
                        f"so {path} cannot be resumed from. Resume from another checkpoint "
                        "(resume_from_checkpoint: <output_dir>/checkpoint-<step>), or start over with "
                        "overwrite_output_dir: true") from None
    state = TrainState.from_dict(read_state(path))
    if change:
        state.batch_in_epoch = change.position(state.batch_in_epoch)
    return state


def saved_objective(path: Path) -> dict[str, Any]:
    """The objective's state saved with `path` ({}: none, or a checkpoint written before it was kept)."""
    return dict(read_state(path).get(OBJECTIVE, {}))


def saved_log_window(path: Path) -> dict[str, Any] | None:
    """This rank's log-window sums saved with `path` (None: checkpoints written before they were kept)."""
    from pipeline.train.safestate import load_state

    return load_state(path / RNG_DIR / f"rank-{dist.rank()}.safetensors").get(LOG_WINDOW)


def saved_log_windows(path: Path, ranks: int) -> list[dict[str, Any] | None]:
    """Every rank's log-window sums saved with `path` (written by `ranks` ranks), for a resume on another rank
    count (pipeline.train.loop.Window.regrouped)."""
    from pipeline.train.safestate import load_state

    return [load_state(path / RNG_DIR / f"rank-{rank}.safetensors").get(LOG_WINDOW) for rank in range(ranks)]


_OWNER: str | None = None


def owner() -> str:
    """`<host>-<pid>` of rank 0, the same on every rank: the name of this run's temp checkpoint folders, so that
    start-up deletes only those of dead runs. The first call is a collective (every rank calls save)."""
    global _OWNER
    if _OWNER is None:
        from pipeline.io import _HOST

        mine = [float(c) for c in f"{_HOST}-{os.getpid()}".encode("ascii").ljust(48, b"\0")]
        summed = dist.all_sum(mine if dist.is_main() else [0.0] * len(mine))
        _OWNER = bytes(int(v) for v in summed).rstrip(b"\0").decode("ascii")
    return _OWNER


_TEMP = re.compile(rf"^\.({PREFIX}\d+)\.(tmp|old)(?:-(.+)-(\d+))?$")


def _stale(host: str | None, pid: str | None) -> bool:
    """A temp folder's owner is gone: dead on this host, or this very process (start-up comes before any save
    of its own, so it is an earlier in-process run's), or named for another host or by an older version of this
    code while this run holds the output_dir lock (see pipeline.lock)."""
    from pipeline.io import _HOST, _alive

    if host == _HOST and pid is not None:
        return int(pid) == os.getpid() or not _alive(int(pid))
    return True


def clean_stale(output_dir: str | Path) -> None:
    """Tidy up after a run killed while saving (rank 0).

    Temp directories of dead owners go; a live run's (one that ignored the lock) stay. A
    `.checkpoint-<step>.old-<owner>` is the previous copy of a checkpoint being replaced (see save): if the kill
    fell between its two renames (file systems without an atomic swap), `checkpoint-<step>` is missing and the
    .old copy, when it passes its manifest, is put back instead of deleted.
    """
    root = Path(output_dir)
    if not root.is_dir():
        return
    for path in sorted(root.iterdir()):
        match = _TEMP.match(path.name)
        if not match or not _stale(match.group(3), match.group(4)):
            continue
        final = root / match.group(1)
        if match.group(2) == "old" and not final.exists() and not problems_with(path):
            os.replace(path, final)
        else:
            shutil.rmtree(path, ignore_errors=True)
