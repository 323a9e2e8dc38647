"""Where a recipe's path keys point inside a run's output_dir: a model folder as given or a run's merged/ (else
model/), an adapter folder as given or a run's adapter/, and reward_model under its reward_model_type. One rule for
resolve (adapter paths), plan (sizes), the ppo rule and train's load; files only, no torch."""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def run_model(path: str) -> str:
    """A model folder as given, or a run's output_dir's merged/ (else model/): what a full reward_model names, for
    plan here and for train's load (reward_folder)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    found = (os.path.join(path, sub) for sub in ("merged", "model"))
    return next((sub for sub in found if os.path.isfile(os.path.join(sub, "config.json"))), path)


def run_adapter(path: str) -> str:
    """An adapter folder as given, or a run's output_dir's adapter/ (LLaMA-Factory keeps the adapter in output_dir;
    we keep it in output_dir/adapter/)."""
    if (not os.path.isfile(os.path.join(path, ADAPTER_CONFIG))
            and os.path.isfile(os.path.join(path, "adapter", ADAPTER_CONFIG))):
        return os.path.join(path, "adapter")
    return path


def reward_folder(path: str, kind: str) -> Path:
    """reward_model as the folder to load (a hub id from the offline cache): under reward_model_type lora an adapter
    folder as given or a stage rm run's output_dir's adapter/ (run_adapter), under full a model folder as given or a
    run's merged/ or model/ (run_model). The rule, plan and train's load read it here, without torch."""
    from pipeline.model.hub import resolve_model_path

    folder = run_adapter(resolve_model_path(path, key="reward_model"))
    if kind == "lora":
        if all(os.path.isfile(os.path.join(folder, f)) for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)):
            return Path(folder)
        what = ("a LoRA reward adapter (adapter_config.json + adapter_model.safetensors) or a stage rm LoRA run's "
                "output_dir")
    else:
        folder = run_model(resolve_model_path(path, key="reward_model"))
        if os.path.isfile(os.path.join(folder, "config.json")):
            return Path(folder)
        what = "a reward model folder (config.json) or a stage rm run's output_dir with merged/ or model/"
    raise UserError(f"reward_model: {path!r} holds no {'adapter' if kind == 'lora' else 'model'}; expected {what} "
                    f"(reward_model_type: {kind})")
