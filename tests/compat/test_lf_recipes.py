"""LLaMA-Factory's recipes through our CLI: train_lora (model line changed only), merge_lora, inference, DeepSpeed.

The recipes under tests/compat/lf_examples/ are our own files with the keys LLaMA-Factory documents in its
examples/. Golden values come from transformers and PEFT (the merged model must equal PEFT's merge of the
adapter we wrote onto the checkpoint transformers wrote).

The LoRA sft -> merge_lora -> inference path runs every command as typed; elsewhere build, plan and validate (and
refusals decided by the recipe rules) run main(argv) in this process once their command ran as typed here
(as_typed=False: the same code and messages, no interpreter start). Training runs stay typed.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.acceptance.harness import pipeline, refused, write_hf_checkpoint
from tests.compat.conftest import LF_DATA

EXAMPLES = Path(__file__).with_name("lf_examples")


def template_override() -> list[str]:
    """qwen3_nothink once the chat templates land; until then the ChatML template it is built on."""
    schema = json.loads((Path(__file__).resolve().parents[2] / "pipeline/recipe/schema/recipe.schema.json")
                        .read_text("utf-8"))
    return [] if "qwen3_nothink" in json.dumps(schema["properties"]["template"]) else ["template=chatml"]


PROBE = [[5, 68, 75, 110, 201, 17, 300, 2, 90, 13]]  # token ids of qwen3_checkpoint's vocabulary, for the logits


def qwen3_checkpoint(directory: Path) -> None:
    """A tiny Qwen3 by save_pretrained: a 2,048-token context (the recipes' cutoff_len) and a 384-token tokenizer in
    Qwen3's format with its ChatML markup (the recipes' qwen3 templates need it). The real 152k-token vocabulary only
    cost time here (each of the LoRA run's 48 micro-batches and the full run's against a 152k-row bf16 head);
    tests/acceptance/test_family_paths.py's qwen3 session trains through it."""
    write_hf_checkpoint(directory, "qwen3", small_vocab=True, max_position_embeddings=2048)


def lf_checkout(tmp_path: Path, model: str) -> Path:
    """A LLaMA-Factory-like working copy: data/, examples/ with model_name_or_path set to `model`."""
    shutil.copytree(LF_DATA, tmp_path / "data")
    shutil.copytree(EXAMPLES, tmp_path / "examples")
    for recipe in (tmp_path / "examples").rglob("*.yaml"):
        lines = recipe.read_text("utf-8").splitlines(keepends=True)
        recipe.write_text("".join(f"model_name_or_path: {model}\n" if line.startswith("model_name_or_path:")
                                  else line for line in lines), "utf-8")
    return tmp_path


def _token_table(stdout: str) -> list[str]:
    """validate's per-dataset token statistics (the rows under its `dataset split rows tokens ...` header)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("dataset ") and " tokens " in line)
    return lines[start + 1:start + 5]


@pytest.mark.slow
def test_lora_sft_then_merge_lora_then_inference(tmp_path):
    """LLaMA-Factory's layout through make: `make export` of examples/merge_lora/qwen3_lora_sft.yaml trains the
    examples/train_lora recipe whose output_dir its adapter_name_or_path names first (make searched the merge
    recipe's own folder only, and exported an adapter that was not there), and validate / build of a recipe in a
    third folder that trains from the export tokenize with the chain's root before anything ran."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tests.acceptance.harness import cli_env, make, make_stages, refused_before_any_stage, scratch_repo

    ckpt = tmp_path / "ckpt"
    qwen3_checkpoint(ckpt)
    work = scratch_repo(lf_checkout(tmp_path / "lf", str(ckpt)))
    extra = template_override()
    env = cli_env(MAKEFLAGS="", MAKELEVEL="")
    merge = "examples/merge_lora/qwen3_lora_sft.yaml"
    goal = ["export", f"RECIPE={merge}", f"ARGS={' '.join(extra)}", f"VENV={work / 'venv'}"]

    # LLaMA-Factory's two merge_lora examples write one export_dir: one message naming both, nothing run
    refused = make(*goal, cwd=work, env=env, expect=2)  # found before any stage: our message, make's stop line
    errors = refused_before_any_stage(refused)
    assert errors == [f"error: {merge}:10:13: export_dir: saves/qwen3_sft_merged is also written by another recipe "
                      "(examples/merge_lora/qwen3_full_sft.yaml has export_dir: saves/qwen3_sft_merged): each "
                      "export replaces the whole folder, so one deletes the other's model, and make could hand a "
                      "recipe that starts from it the other recipe's export; give each recipe its own export_dir, "
                      "e.g. export_dir: saves/qwen3_lora_sft_export"], refused.stderr
    assert not (work / "saves").exists()
    full = work / "examples/merge_lora/qwen3_full_sft.yaml"
    full.write_text(full.read_text("utf-8").replace("saves/qwen3_sft_merged", "saves/qwen3_full_merged"), "utf-8")

    # a recipe in a third folder training from the export: checked before anything ran, with the root's tokenizer
    sft = "examples/train_lora/qwen3_lora_sft.yaml"
    later = "examples/train_full/qwen3_from_merged.yaml"
    (work / later).write_text((work / sft).read_text("utf-8").replace(f"model_name_or_path: {ckpt}",
                                                                        "model_name_or_path: saves/qwen3_sft_merged")
                              .replace("saves/qwen3-4b/lora/sft", "saves/qwen3-4b/lora/from_merged"), "utf-8")
    pipeline("build", later, *extra, cwd=work, as_typed=False)
    checked = pipeline("validate", later, *extra, cwd=work, as_typed=False)
    assert "unknown key" not in checked.stderr and "note:" not in checked.stdout, checked.stdout  # token lengths
    assert checked.stderr.count("trust_remote_code: accepted; no remote code ever runs here") == 1

    # make -n says what make export will run, and runs none of it
    planned = make("-n", *goal, cwd=work, env=env)
    assert make_stages(planned) == [("build", sft), ("validate", sft), ("train", sft), ("export", merge)], planned.stdout
    assert not (work / "saves").exists()

    made = make(*goal, cwd=work, env=env, timeout=600)
    assert make_stages(made) == [("build", sft), ("validate", sft), ("train", sft), ("export", merge)], made.stdout
    assert _token_table(made.stdout) == _token_table(checked.stdout)  # the same tokenizer (and data) as the chain's
    assert make_stages(make(*goal, cwd=work, env=env)) == []  # nothing stale
    assert make_stages(make("-n", *goal, cwd=work, env=env)) == []  # and -n lists nothing, the upstream's included
    run = work / "saves/qwen3-4b/lora/sft"
    results = json.loads((run / "all_results.json").read_text("utf-8"))
    assert results["global_step"] == 6  # 21 train rows / (1 x 8) = 2 steps per epoch x 3 epochs
    assert (run / "training_loss.png").is_file()

    # merge_lora: adapter_name_or_path names the run's output_dir, as LLaMA-Factory's does
    # it names no dataset: the verification's note said "`make data` builds it", which has nothing to build for it
    assert "merge: the recipe names no dataset, so the verification runs on fixed pseudo-random tokens" \
        in made.stderr and "make data" not in made.stderr
    merged = transformers.AutoModelForCausalLM.from_pretrained(work / "saves/qwen3_sft_merged").eval()
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    reference = peft.PeftModel.from_pretrained(base, run / "adapter").merge_and_unload().eval()
    ids = torch.tensor(PROBE)
    with torch.no_grad():
        got, want = merged(ids).logits, reference(ids).logits
        plain = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, plain, atol=1e-4)  # the adapter changed something

    # inference: generate / chat with the base + the run's adapter
    answer = pipeline("chat", "examples/inference/qwen3_lora_sft.yaml", *extra, "max_new_tokens=4",
                      "--prompt", "hi", cwd=work)
    assert answer.returncode == 0


@pytest.mark.slow
def test_full_sft_then_export_then_inference(tmp_path):
    """train_full (ZeRO-3 JSON), then merge_lora/inference recipes whose model_name_or_path is the run's output_dir."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ckpt = tmp_path / "ckpt"
    qwen3_checkpoint(ckpt)
    work = lf_checkout(tmp_path / "lf", str(ckpt))
    for recipe in ("merge_lora/qwen3_full_sft.yaml", "inference/qwen3_full_sft.yaml"):  # their model line is the run
        path = work / "examples" / recipe
        path.write_text((EXAMPLES / recipe).read_text("utf-8"), "utf-8")
    extra = template_override()
    sft = "examples/train_full/qwen3_full_sft.yaml"
    pipeline("build", sft, *extra, cwd=work)
    # two steps of the recipe's three epochs (a command-line override, as a user shortens a run): the epochs and
    # their step count are test_lora_sft_then_merge_lora_then_inference's; what this run proves (the ZeRO-3 JSON,
    # the export and inference recipes on its output_dir) needs no more steps than one epoch's 10
    pipeline("train", sft, *extra, "max_steps=2", cwd=work, timeout=900)
    assert json.loads((work / "saves/qwen3-4b/full/sft/ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    pipeline("export", "examples/merge_lora/qwen3_full_sft.yaml", *extra, cwd=work)
    exported = transformers.AutoModelForCausalLM.from_pretrained(work / "saves/qwen3_sft_merged").eval()
    from pipeline.model.weights import load_model

    ours = load_model(work / "saves/qwen3-4b/full/sft/model").eval()
    ids = torch.tensor(PROBE)
    with torch.no_grad():
        got, want = exported(ids).logits, ours(ids)
        base = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()(ids).logits
    assert torch.allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(got, base, atol=1e-5)  # training changed the weights
    pipeline("chat", "examples/inference/qwen3_full_sft.yaml", *extra, "max_new_tokens=3", "--prompt", "hi", cwd=work)


# LLaMA-Factory's DeepSpeed JSONs we accept. Each offload file is its stage's plain file plus offload_* keys (the z0
# file is the z2 file at stage 0), so training the two offload files puts every key of the five through DeepSpeed;
# the other three are planned (the stage and the "auto" values read from the file), their stages trained by
# tests/acceptance/test_matrix.py's zero_stage rows.
DS_TRAINED = ["ds_z2_offload_config.json", "ds_z3_offload_config.json"]
DS_PLANNED = ["ds_z0_config.json", "ds_z2_config.json", "ds_z3_config.json"]


def tiny_recipe(work: Path, name: str = "r.yaml", **keys) -> str:
    values = {"model_name_or_path": "tiny", "stage": "sft", "do_train": True, "finetuning_type": "lora",
              "lora_target": "all", "dataset": "alpaca_en_demo", "template": "alpaca", "cutoff_len": 64,
              "output_dir": "saves/tiny", "logging_steps": 1, "per_device_train_batch_size": 2,
              "learning_rate": 1e-3, "max_steps": 1, "bf16": False, "plot_loss": False, **keys}
    (work / name).write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()), "utf-8")
    return name


def _json_stage(work: Path, config: str) -> int:
    return json.loads((work / "examples/deepspeed" / config).read_text("utf-8"))["zero_optimization"]["stage"]


def test_the_trained_deepspeed_files_hold_every_key_of_the_planned_ones():
    """What lets DS_PLANNED go untrained: each planned file's keys are a trained file's, at the same values."""
    def flat(config: str) -> dict:
        def walk(d: dict, prefix: str = "") -> dict:
            out = {}
            for key, value in d.items():
                out.update(walk(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
            return out
        return walk(json.loads((EXAMPLES / "deepspeed" / config).read_text("utf-8")))

    for config in DS_PLANNED:
        planned = {k: v for k, v in flat(config).items() if k != "zero_optimization.stage"}
        assert any(planned.items() <= flat(t).items() for t in DS_TRAINED), config


@pytest.mark.slow
@pytest.mark.parametrize("config", DS_TRAINED)
def test_deepspeed_examples_run(tmp_path, config):
    work = lf_checkout(tmp_path, "tiny")
    recipe = tiny_recipe(work, deepspeed=f"examples/deepspeed/{config}")
    pipeline("build", recipe, cwd=work, as_typed=False)
    pipeline("train", recipe, cwd=work)
    used = json.loads((work / "saves/tiny/ds_config.json").read_text("utf-8"))
    assert used["zero_optimization"]["stage"] == _json_stage(work, config)
    assert used["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert used["train_micro_batch_size_per_gpu"] == 2  # "auto" filled from the recipe
    assert (work / "saves/tiny/adapter/adapter_model.safetensors").is_file()


@pytest.mark.parametrize("config", DS_PLANNED)
def test_deepspeed_examples_plan(tmp_path, config):
    """plan prints the DeepSpeed JSON train hands DeepSpeed: the file's stage, its "auto" values filled."""
    work = lf_checkout(tmp_path, "tiny")
    recipe = tiny_recipe(work, deepspeed=f"examples/deepspeed/{config}")
    shown = pipeline("plan", recipe, cwd=work, as_typed=config == DS_PLANNED[0]).stdout
    start = shown.index("\n{", shown.index("[deepspeed]")) + 1
    used = json.loads(shown[start:shown.index("\n}\n", start) + 2])
    assert used["zero_optimization"]["stage"] == _json_stage(work, config)
    assert used["train_micro_batch_size_per_gpu"] == 2 and used["gradient_accumulation_steps"] == 1


@pytest.mark.parametrize("config, reason", [
    ("ds_z2_autotp_config.json", "tensor parallelism (autotp) is not supported"),
    ("ds_z3_fp8_config.json", "zero_force_ds_cpu_optimizer"),
])
def test_deepspeed_examples_refused_with_reason(tmp_path, config, reason):
    work = lf_checkout(tmp_path, "tiny")
    failed = pipeline("validate", tiny_recipe(work, deepspeed=f"examples/deepspeed/{config}"), cwd=work, expect=2,
                      as_typed=config == "ds_z2_autotp_config.json")
    assert reason in failed.stderr and "Traceback" not in failed.stderr


@dataclass(frozen=True)
class ReportedRun:
    work: Path
    recipe: str
    env: dict[str, str]  # the CLI's environment with the wandb stand-in on PYTHONPATH
    stderr: str  # what train said
    wandb_calls: Path  # what the stand-in recorded, one JSON object a line


@pytest.fixture(scope="module")
def reported_run(tmp_path_factory) -> ReportedRun:
    """A 2-step tiny LoRA run reporting to tensorboard and to wandb (offline, a stand-in: WANDB_STUB), with
    save_only_model and an eval each step, trained as typed once for the file: the tensorboard, wandb and do_predict
    tests check it (separate training runs only cost test time)."""
    from tests.acceptance.harness import REPO, cli_env

    root = tmp_path_factory.mktemp("reported_run")
    (root / "stub").mkdir()
    (root / "stub" / "wandb.py").write_text(WANDB_STUB, "utf-8")
    env = cli_env(PYTHONPATH=f"{root / 'stub'}:{REPO}", WANDB_MODE="offline", WANDB_STUB_LOG=str(root / "wandb.jsonl"))
    work = lf_checkout(root / "lf", "tiny")
    recipe = tiny_recipe(work, report_to=["tensorboard", "wandb"], run_name="tiny-demo", save_only_model=True,
                         save_steps=1, max_steps=2, eval_strategy="steps", eval_steps=1, dataloader_num_workers=1,
                         ddp_timeout=600, preprocessing_num_workers=2, tokenized_path="saves/tokenized",
                         use_reentrant_gc=False)
    pipeline("build", recipe, cwd=work, env=env, as_typed=False)
    stderr = pipeline("train", recipe, cwd=work, env=env).stderr
    return ReportedRun(work, recipe, env, stderr, root / "wandb.jsonl")


@pytest.mark.slow  # ~15-45 s: trains through the CLI
def test_recipe_keys_tensorboard_save_only_model_and_notices(reported_run):
    work, recipe = reported_run.work, reported_run.recipe
    assert "tokenized_path: accepted without effect" in reported_run.stderr
    assert "use_reentrant_gc: accepted without effect" in reported_run.stderr
    run = work / "saves/tiny"
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text("utf-8").splitlines()]
    assert [rec["step"] for rec in log if "eval_loss" in rec] == [1, 2]  # eval_strategy steps, eval_steps 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "runs")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]
    assert [e.step for e in events.Scalars("eval/loss")] == [1, 2]
    assert abs(events.Scalars("train/loss")[-1].value - log[-1]["loss"]) < 1e-5
    ckpt = run / "checkpoint-2"
    assert (ckpt / "adapter/adapter_model.safetensors").is_file() and not (ckpt / "deepspeed").exists()
    env = {**reported_run.env, "WANDB_STUB_LOG": str(work.parent / "refused-resume.jsonl")}  # not the run's record
    failed = pipeline("train", recipe, "resume_from_checkpoint=latest", cwd=work, env=env, expect=2)
    assert "was saved with save_only_model: true" in failed.stderr and "resuming from it is refused" in failed.stderr


@pytest.mark.slow  # ~15-45 s: trains through the CLI twice
def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):
    """Resumed from checkpoint-1, steps 2 and 3 are trained again; tensorboard showed both versions of them
    (trainer_log.jsonl was cut back, the event files were not): the writer now purges after the resumed step."""
    work = lf_checkout(tmp_path, "tiny")
    recipe = tiny_recipe(work, report_to="tensorboard", save_steps=1, max_steps=3, logging_steps=1)
    pipeline("build", recipe, cwd=work, as_typed=False)
    pipeline("train", recipe, cwd=work)
    run = work / "saves/tiny"
    pipeline("train", recipe, f"resume_from_checkpoint={run / 'checkpoint-1'}", cwd=work)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(run / "runs")).Reload().Scalars("train/loss")
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text("utf-8").splitlines()]
    assert [e.step for e in scalars] == [rec["step"] for rec in log if "loss" in rec] == [1, 2, 3]
    assert [round(e.value, 5) for e in scalars] == [round(rec["loss"], 5) for rec in log if "loss" in rec]


@pytest.mark.slow  # ~15-45 s: predicts through the CLI
def test_do_train_false_with_do_predict_evaluates(tmp_path, reported_run):
    """A trained run's recipe with do_train=false and do_predict=true evaluates its adapter (a copy of the file's
    reported run: the recipe, its built data and its adapter)."""
    work = tmp_path / "lf"
    shutil.copytree(reported_run.work, work, symlinks=True)
    recipe, env = reported_run.recipe, {**reported_run.env, "WANDB_STUB_LOG": str(tmp_path / "wandb.jsonl")}
    keys = ("max_eval_samples=2", "max_new_tokens=2", "eval_base=false")
    pipeline("train", recipe, "do_train=false", "do_predict=true", *keys, cwd=work, env=env)
    metrics = json.loads((work / "saves/tiny/eval/metrics.json").read_text("utf-8"))
    assert metrics["n_examples"] == 2 and "tuned" in metrics["results"]
    assert (work / "saves/tiny/eval/predictions.jsonl").is_file()
    failed = pipeline("train", recipe, "do_train=false", *keys, cwd=work, env=env, expect=2,
                      as_typed=False)  # refused by the rules
    assert "the train command would do nothing" in failed.stderr


def test_unknown_keys_and_refused_values(tmp_path):
    work = lf_checkout(tmp_path, "tiny")
    recipe = tiny_recipe(work, do_trian=True, use_unsloth=True, export_legacy_format=True,
                         export_quantization_bit=4, streaming=True, buffer_size=128)
    failed = pipeline("validate", recipe, cwd=work, expect=2, as_typed=False)
    lines = failed.stderr.splitlines()
    assert any("do_trian: unknown key (did you mean 'do_train'?)" in m for m in lines)
    assert any(m.endswith("use_unsloth: unknown key") for m in lines)  # nothing close: no suggestion
    assert any("export_legacy_format: true asks for pickled .bin weights, which are refused" in m for m in lines)
    assert any("export_quantization_bit: quantized export (GPTQ/AWQ) is not supported" in m for m in lines)
    assert any("streaming: true iterates the raw data lazily during training, which is not implemented" in m
               for m in lines)
    assert not any("buffer_size" in m for m in lines if m.startswith("error"))
    done = pipeline("validate", tiny_recipe(work, streaming=False, buffer_size=128), cwd=work, expect=None,
                    as_typed=False)  # not built
    assert "buffer_size: accepted without effect: LLaMA-Factory's shuffle buffer for streaming" in done.stderr
    failed = pipeline("train", tiny_recipe(work, report_to="wandb"), cwd=work, expect=None)
    try:
        import wandb  # noqa: F401
    except ImportError:
        assert failed.returncode == 2 and "wandb is not installed" in failed.stderr


def test_gradient_checkpointing_alias(tmp_path, monkeypatch):
    from pipeline.errors import UserError
    from pipeline.recipe import resolve

    work = lf_checkout(tmp_path, "tiny")
    monkeypatch.chdir(work)
    recipe = work / tiny_recipe(work, gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    r = resolve(recipe)
    assert r["disable_gradient_checkpointing"] is False and r.source("disable_gradient_checkpointing") == "derived"
    assert resolve(recipe, ["gradient_checkpointing=false"])["disable_gradient_checkpointing"] is True
    with pytest.raises(UserError) as err:
        resolve(recipe, ["disable_gradient_checkpointing=true", "gradient_checkpointing=true"])
    assert "they are the same switch inverted" in err.value.messages[0]



def test_cosine_with_min_lr_and_its_kwargs_follow_transformers(tmp_path, monkeypatch):
    """lr_scheduler_type: cosine_with_min_lr with lr_scheduler_kwargs (min_lr_rate, or min_lr: an absolute floor)
    gives transformers' own schedule step by step (its get_scheduler is the reference); the floor is min_lr_ratio,
    derived. Arguments no schedule here reads, or two floors, are refused as transformers refuses them."""
    import dataclasses

    import torch
    transformers = pytest.importorskip("transformers")
    from pipeline.errors import UserError
    from pipeline.recipe import resolve
    from pipeline.recipe.args import train_args
    from pipeline.train.schedule import make_scheduler

    work = lf_checkout(tmp_path, "tiny")
    monkeypatch.chdir(work)

    def lrs(scheduler, optimizer) -> list[float]:
        seen = []
        for _ in range(10):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return seen

    for kwargs, ratio in (({"min_lr_rate": 0.1}, 0.1), ({"min_lr": 2e-4}, 0.2), ('{"min_lr_rate": 0.3}', 0.3)):
        r = resolve(work / tiny_recipe(work, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs=kwargs))
        assert r["min_lr_ratio"] == pytest.approx(ratio) and r.source("min_lr_ratio") == "derived"
        args = dataclasses.replace(train_args(r), total_steps=10, num_warmup_steps=2)
        ours = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        theirs = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=args.learning_rate)
        given = kwargs if isinstance(kwargs, dict) else json.loads(kwargs)
        reference = transformers.get_scheduler("cosine_with_min_lr", theirs, num_warmup_steps=2,
                                               num_training_steps=10, scheduler_specific_kwargs=given)
        assert lrs(make_scheduler(ours, args), ours) == pytest.approx(lrs(reference, theirs), rel=1e-12, abs=1e-15)
    for keys, message in (({"lr_scheduler_kwargs": {"min_lr_rate": 0.1}}, ("only lr_scheduler_type: "
                           "cosine_with_min_lr reads scheduler arguments here (min_lr_rate or min_lr), but "
                           "lr_scheduler_type is linear")),
                          ({"lr_scheduler_type": "cosine_with_min_lr",
                            "lr_scheduler_kwargs": {"min_lr_rate": 0.1, "min_lr": 1e-4}}, "set exactly one of"),
                          ({"lr_scheduler_type": "cosine_with_min_lr"}, "cosine_with_min_lr needs its floor"),
                          ({"lr_scheduler_type": "cosine_with_min_lr", "lr_scheduler_kwargs": {"min_lr_rate": 0.1},
                            "min_lr_ratio": 0.2}, "min_lr_ratio: is 0.2 but lr_scheduler_kwargs give a floor of 0.1")):
        with pytest.raises(UserError) as err:
            resolve(work / tiny_recipe(work, **keys))
        assert any(message in m for m in err.value.messages), err.value.messages

WANDB_STUB = '''
"""A stand-in for wandb (not installed here): records what the trainer sends."""
import json, os

class _Run:
    def __init__(self, **kwargs):
        self.path = os.environ["WANDB_STUB_LOG"]
        self._write({"init": {k: v for k, v in kwargs.items() if k != "config"}, "mode": os.environ.get("WANDB_MODE"),
                     "config_keys": sorted(kwargs.get("config", {}))})
    def _write(self, record):
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\\n")
    def log(self, values, step=None):
        self._write({"log": values, "step": step})
    def finish(self):
        self._write({"finish": True})

def init(**kwargs):
    return _Run(**kwargs)
'''


@pytest.mark.slow  # ~15-45 s: trains through the CLI
def test_report_to_wandb_offline(reported_run):
    calls = [json.loads(line) for line in reported_run.wandb_calls.read_text("utf-8").splitlines()]
    assert calls[0]["mode"] == "offline" and calls[0]["init"]["dir"] == "saves/tiny"
    assert calls[0]["init"]["name"] == "tiny-demo"  # run_name (else output_dir's folder name)
    assert "learning_rate" in calls[0]["config_keys"]
    logged = [c for c in calls if "log" in c]
    assert [c["step"] for c in logged] == [1, 2] and "train/loss" in logged[0]["log"]
    assert "eval/loss" in logged[-1]["log"] and calls[-1] == {"finish": True}


def test_eval_due():
    from pipeline.recipe.args import train_args
    from pipeline.recipe.evaluation import eval_due, evaluates

    base = {"eval_steps": None, "logging_steps": 2, "steps_per_epoch": 3, "do_eval": None, "eval_strategy": None}
    due = lambda **k: [s for s in range(1, 7) if eval_due(train_args({**base, **k}), s, s == 6)]  # noqa: E731
    assert due() == [6]
    assert due(eval_steps=4) == [4, 6]
    assert due(eval_strategy="steps") == [2, 4, 6]  # every logging_steps without eval_steps
    assert due(eval_strategy="epoch") == [3, 6]
    assert due(eval_strategy="no") == [6] and due(eval_strategy="no", do_eval=False) == []
    assert due(eval_steps=4, do_eval=False) == [4]
    # evaluates(): whether any step of the run is due (train asks for the val split only then)
    for keys in ({}, {"eval_strategy": "no", "do_eval": False}, {"eval_steps": 4, "do_eval": False},
                 {"eval_steps": 7, "do_eval": False}, {"eval_strategy": "steps", "do_eval": False},
                 {"eval_strategy": "epoch", "do_eval": False, "steps_per_epoch": 9}):
        assert evaluates(train_args({**base, "total_steps": 6, **keys})) == bool(due(**keys)), keys



# What a LLaMA-Factory user's own recipe adds to the example (transformers' TrainingArguments and more), as they
# write it: "no" quoted, since LLaMA-Factory's YAML reader takes a bare no for false.
USERS_KEYS = """
### the user's additions
optim: adamw_torch_fused
save_strategy: "no"
logging_strategy: epoch
run_name: qwen3-lora-demo
tf32: true
include_num_input_tokens_seen: true
use_fast_tokenizer: true
dataloader_pin_memory: true
disable_shuffling: true
split: train
"""


def test_a_users_lora_recipe_with_trainer_keys_validates_trains_and_loads_in_peft(tmp_path):
    """examples/train_lora/qwen3_lora_sft.yaml plus the keys users' recipes carry: validate prints one notice per key
    without effect here; train honours save_strategy "no" (no checkpoint at save_steps 1, only the final one) and
    logging_strategy epoch (no line per logging_steps 1: the epoch is longer than the run, so only the last step's,
    with tokens_seen); the adapter loads in PEFT."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ckpt = tmp_path / "ckpt"
    write_hf_checkpoint(ckpt, "qwen3", small_vocab=True)
    work = lf_checkout(tmp_path / "lf", str(ckpt))
    sft = work / "examples/train_lora/qwen3_lora_sft.yaml"
    sft.write_text(sft.read_text("utf-8") + USERS_KEYS, "utf-8")
    args = ("examples/train_lora/qwen3_lora_sft.yaml", *template_override(), "dataset=alpaca_en_demo",
            "cutoff_len=128", "max_steps=2", "gradient_accumulation_steps=1", "dataloader_num_workers=0",
            "logging_steps=1", "save_steps=1", "bf16=false")
    pipeline("build", *args, cwd=work, as_typed=False)
    checked = pipeline("validate", *args, cwd=work, as_typed=False)
    notices = [line for line in checked.stderr.splitlines() if "accepted without effect" in line]
    assert sorted(line.split(": ")[2] for line in notices) == sorted(
        ["dataloader_pin_memory", "include_num_input_tokens_seen", "run_name", "tf32", "use_fast_tokenizer"]), notices
    assert "unknown key" not in checked.stderr and "optim" not in checked.stderr
    trained = pipeline("train", *args, cwd=work)
    assert trained.stderr.count("tf32: accepted without effect") == 1
    run = work / "saves/qwen3-4b/lora/sft"
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text("utf-8").splitlines()]
    steps = [record for record in log if "loss" in record]
    assert [r["step"] for r in steps] == [2] and steps[0]["tokens_seen"] > 0 and steps[0]["epoch"] < 1
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]  # save_steps 1 but "no"
    base = transformers.AutoModelForCausalLM.from_pretrained(ckpt).eval()
    tuned = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(ckpt), run / "adapter")
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert not torch.allclose(tuned.eval()(ids).logits, base(ids).logits, atol=1e-6)

def test_save_and_logging_strategies():
    """transformers' save_strategy / logging_strategy (steps, epoch, no) over 6 steps of 3 per epoch; save_steps and
    logging_steps only count under steps, as in transformers."""
    from pipeline.recipe.evaluation import periodic_due

    def due(strategy: str, every: int) -> list[int]:
        return [s for s in range(1, 7) if periodic_due(strategy, every, s, 3)]

    assert due("steps", 2) == [2, 4, 6] and due("steps", 4) == [4]
    assert due("epoch", 2) == [3, 6] and due("no", 2) == []

# `make export` on a LLaMA-Factory merge_lora recipe (adapter_name_or_path: a run's output_dir, export_dir, export_*
# keys): tests/acceptance/test_make_upstreams.py, where make exports it as the upstream of a recipe training on it.


def test_a_qwen_recipe_without_template_hears_that_alpaca_formats_its_data(tmp_path):
    """LLaMA-Factory reads the tokenizer's chat template when `template` is unset; ours defaults to alpaca. A ported
    recipe that leaves it out is told, naming the family's own template; set (to anything) or GPT-2: quiet."""
    from tests.acceptance.harness import write_hf_checkpoint

    write_hf_checkpoint(tmp_path / "qwen", "qwen3", small_vocab=True)
    (tmp_path / "r.yaml").write_text("model_name_or_path: qwen\nstage: sft\ndataset: d\nmax_steps: 1\n", "utf-8")
    told = pipeline("plan", "r.yaml", cwd=tmp_path, expect=None).stderr
    assert ("notice: template: not set, so the default 'alpaca' (the book's Alpaca prompt) formats the data for "
            "this qwen3 model, whose own chat format is template: qwen3") in told
    for quiet in (["template=alpaca"], ["model_name_or_path=tiny"]):
        assert "notice: template" not in pipeline("plan", "r.yaml", *quiet, cwd=tmp_path, expect=None,
                                                  as_typed=False).stderr


def test_a_recipe_key_typed_as_an_option_is_told_the_key_value_form(tmp_path):
    """llamafactory-cli takes a recipe's keys as options in its argv form (`--max_steps 2`, HfArgumentParser) and as
    key=value after a YAML; here overrides are key=value only, and argparse alone said "unrecognized arguments"."""
    work = lf_checkout(tmp_path, "tiny")
    recipe = "examples/train_lora/qwen3_lora_sft.yaml"
    stderr = refused("train", recipe, "--max_steps", "2", "max_samples=16", cwd=work)
    assert "--max_steps 2: recipe keys are given as key=value after the recipe" in stderr
    assert "write max_steps=2" in stderr and "unrecognized" not in stderr
    for typed, write in ((["--learning_rate=1e-5"], "learning_rate=1e-5"), (["--do_predict"], "do_predict=true"),
                         (["--lora-rank", "16"], "lora_rank=16")):
        stderr = refused("validate", recipe, *typed, cwd=work, as_typed=False)
        assert f"write {write}" in stderr, stderr
    assert "unrecognized arguments: --fast" in refused("validate", recipe, "--fast", cwd=work, as_typed=False)
    assert not (work / "saves").exists() and not (work / "data/build").exists()


def test_identity_placeholders_are_trained_as_written_as_in_llama_factory(tmp_path):
    """LLaMA-Factory fills nothing into identity.json's {{name}} / {{author}} (its user edits the file, as
    docs/coming-from-llama-factory.md tells ours to); the build keeps them as written."""
    work = lf_checkout(tmp_path, "tiny")
    pipeline("build", tiny_recipe(work, dataset="identity", val_size=0), cwd=work, as_typed=False)
    built = (work / "data/build/identity/train.json").read_text("utf-8")
    assert built.count("{{name}}") == built.count("{{author}}") == 8  # our fixture's rows, counted by hand
