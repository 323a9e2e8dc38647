"""Every shipped recipe resolves, validates and plans, in-process and through the CLI (`python -m pipeline`; main(argv)
in this process for all but two recipes: the commands' work is the same, the interpreter start is saved).

The data are built into a temporary copy of datasets/ (dataset_dir=... override), so the test never
writes into the working tree. fp16 recipes target GPUs: resolving them assumes CUDA, and on a machine
without it the CLI must refuse them with the 'use bf16 on CPU' message.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import UserError
from pipeline.recipe import resolve, rules

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "recipes").rglob("*.yaml"))


def _ids(path: str) -> str:
    return path.removeprefix("recipes/").removesuffix(".yaml")


def _chain_value(recipe: str, key: str):
    """A key's value as written in the recipe or the files it extends (read here with plain YAML)."""
    path = REPO / recipe
    while True:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if key in data:
            return data[key]
        if not data.get("extends"):
            return None
        path = path.parent / data["extends"]


FP16 = [r for r in RECIPES if _chain_value(r, "fp16")]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """datasets/ (registry and raw files, not build/) copied to a temporary folder."""
    target = tmp_path_factory.mktemp("data") / "datasets"
    target.mkdir()
    shutil.copy(REPO / "datasets" / "dataset_info.json", target)
    shutil.copytree(REPO / "datasets" / "raw", target / "raw")
    return target


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name paths relative to the repository root (deepspeed JSON, saves/)


def test_the_shipped_set():
    expected = {"recipes/demo_pt.yaml", "recipes/demo_sft.yaml", "recipes/demo_sharegpt_csv.yaml"}
    assert expected <= set(RECIPES)
    assert len([r for r in RECIPES if r.startswith("recipes/examples/")]) >= 7
    assert FP16, "an fp16 example for pre-Ampere GPUs"
    assert any(_chain_value(r, "extends") for r in RECIPES), "an example that uses extends"


@pytest.mark.parametrize("recipe", RECIPES, ids=_ids)
def test_resolves_for_every_command(recipe, in_repo, monkeypatch):
    monkeypatch.setattr(rules.core, "cuda_available", lambda: True)  # as on the GPU machine the examples target
    for command in ("validate", "plan"):
        r = resolve(recipe, command=command)
        assert r["dataset"] and r["output_dir"] == f"saves/{Path(recipe).stem}"
    model = r["model_name_or_path"]
    for command in ("train", "eval"):
        if "/" in model and not (REPO / model).exists():
            # a model another recipe (or the user) provides: the commands that load it say so, and only that
            with pytest.raises(UserError) as err:
                resolve(recipe, command=command)
            assert len(err.value.messages) == 1 and "model_name_or_path" in err.value.messages[0]
            assert f"'{model}'" in err.value.messages[0]
            # a folder under models/ (where docs/training.md downloads checkpoints) is missing here, not a hub id
            local = model.split("/")[0] in ("models", "saves")
            assert ("does not exist here" if local else "neither a local directory nor a cached hub snapshot") in \
                err.value.messages[0], err.value.messages
        else:
            resolve(recipe, command=command)


def test_fp16_recipes_on_a_cpu_machine_say_use_bf16(in_repo, monkeypatch):
    monkeypatch.setattr(rules.core, "cuda_available", lambda: False)
    for recipe in FP16:
        with pytest.raises(UserError) as err:
            resolve(recipe, command="train")
        assert any("use bf16 on CPU" in m and "fp16" in m for m in err.value.messages), err.value.messages
        resolve(recipe, command="plan")  # planning for another machine still works


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def _in_process(*args: str) -> subprocess.CompletedProcess:
    """What _cli returns, from main(argv) in this process: the same command without an interpreter start."""
    from tests.reliability.rel_helpers import run_main

    done = run_main(list(args), REPO)
    return subprocess.CompletedProcess(args, done.code, done.out, done.err)


# a fresh `python -m pipeline` for the first recipe and the first fp16 one (the refusal as a user sees it); the
# others run the same commands in-process
AS_TYPED = {RECIPES[0], *FP16[:1]}


@pytest.mark.parametrize("recipe", RECIPES, ids=_ids)
def test_build_validate_plan_through_the_cli(recipe, data_dir):
    override = f"dataset_dir={data_dir}"
    cli = _cli if recipe in AS_TYPED else _in_process
    build = cli("build", recipe, override)
    assert build.returncode == 0, build.stderr
    validate = cli("validate", recipe, override)
    if recipe in FP16 and not rules.core.cuda_available():
        assert validate.returncode == 2 and "use bf16 on CPU" in validate.stderr, validate.stderr
        assert "Traceback" not in validate.stderr
    else:
        assert validate.returncode == 0, validate.stderr
        assert "recipe: OK" in validate.stdout and "data: OK" in validate.stdout
    plan = cli("plan", recipe, override)
    assert plan.returncode == 0, plan.stderr
    assert "[derived]" in plan.stdout and "[deepspeed]" in plan.stdout


def _train_rows(data_dir: Path, names: list[str]) -> int:
    """Every row of the datasets: the examples evaluate on eval_dataset (demo_test), so the val splits train too."""
    total = 0
    for name in names:
        manifest = json.loads((data_dir / "build" / name / "manifest.json").read_text(encoding="utf-8"))
        total += manifest["splits"]["train"] + manifest["splits"]["val"]
    return total


@pytest.mark.parametrize("recipe, world_size, global_batch", [
    ("recipes/examples/gpt2_lora_base.yaml", 1, 32),
    ("recipes/examples/gpt2_small_lora_sft.yaml", 1, 32),
    ("recipes/examples/gpt2_small_lora_sft_8gpu.yaml", 8, 128),
    ("recipes/examples/gpt2_medium_lora_sft_8gpu.yaml", 8, 128),
    ("recipes/examples/gpt2_large_full_sft_zero3.yaml", 8, 128),
])
def test_global_batch_and_steps_as_the_comments_say(recipe, world_size, global_batch, data_dir, in_repo,
                                                   monkeypatch):
    """The batch arithmetic in each example's comments, and its step counts from the built data."""
    monkeypatch.setattr(rules.core, "cuda_available", lambda: True)
    # in-process: test_build_validate_plan_through_the_cli builds as typed
    assert _in_process("build", recipe, f"dataset_dir={data_dir}").returncode == 0
    env = {"WORLD_SIZE": str(world_size), "RANK": "0", "LOCAL_RANK": "0"}
    r = resolve(recipe, [f"dataset_dir={data_dir}"], command="plan", env=env)
    assert r["total_train_batch_size"] == global_batch
    assert r.ds_config["train_batch_size"] == global_batch
    assert r["eval_dataset"] == ["demo_test"] and "demo_test" not in r["dataset"]
    n = _train_rows(data_dir, r["dataset"])
    assert r["num_train_examples"] == n
    micro, accum = r["per_device_train_batch_size"], r["gradient_accumulation_steps"]
    per_epoch = n // (micro * world_size) // accum  # the last partial micro-batch is dropped
    assert r["total_steps"] == math.ceil(r["num_train_epochs"] * per_epoch)


def test_deepspeed_settings_of_the_examples(in_repo, monkeypatch):
    monkeypatch.setattr(rules.core, "cuda_available", lambda: True)
    zero = {r: resolve(r, command="plan").ds_config["zero_optimization"] for r in RECIPES}
    assert zero["recipes/examples/gpt2_small_lora_sft_8gpu.yaml"]["stage"] == 2
    assert zero["recipes/examples/gpt2_medium_lora_sft_8gpu.yaml"]["stage"] == 2
    z3 = zero["recipes/examples/gpt2_large_full_sft_zero3.yaml"]
    assert z3["stage"] == 3
    assert z3["offload_optimizer"]["device"] == "cpu" and z3["offload_param"]["device"] == "cpu"
    fp16 = resolve(FP16[0], command="plan").ds_config["fp16"]
    assert fp16["enabled"] is True and fp16["loss_scale"] == 0 and fp16["initial_scale_power"] == 16


def test_demo_chain(in_repo):
    """demo_sft starts from demo_pt's output and evaluates on the held-out set, never on its training data."""
    pt, sft = resolve("recipes/demo_pt.yaml", command="plan"), resolve("recipes/demo_sft.yaml", command="plan")
    assert pt["stage"] == "pt" and pt["finetuning_type"] == "full" and pt["output_dir"] == "saves/demo_pt"
    assert sft["model_name_or_path"] == "saves/demo_pt/model"
    assert sft["stage"] == "sft" and sft["finetuning_type"] == "lora" and sft["output_dir"] == "saves/demo_sft"
    assert sft["eval_dataset"] == ["demo_test"] and "demo_test" not in sft["dataset"]
    registry = json.loads((REPO / "datasets" / "dataset_info.json").read_text(encoding="utf-8"))
    formats = {registry[name]["formatting"] for name in sft["dataset"]}
    suffixes = {Path(registry[name]["file_name"]).suffix for name in sft["dataset"]}
    assert formats == {"alpaca", "sharegpt"} and suffixes == {".jsonl", ".json", ".csv"}
