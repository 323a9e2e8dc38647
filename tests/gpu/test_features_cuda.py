"""The features of the last sessions on a GPU, each as a user runs it (CUDA only; bench/gpu_check.sh runs them on a
lent GPU, PIPELINE_TEST_DEVICE=cpu on a CPU: tests/gpu/conftest.py).

The CPU suite checks each feature against its reference on gloo and fp32 / emulated bf16; none of them had run on
CUDA. Here each runs once, on tiny shapes: stage ppo (one LoRA step in bf16: rollouts, the reward model, the value
head), LLaMA-Factory's ASFT loss in a LoRA run under pure_bf16 (the adapter trained in fp32 on the bf16 base),
`generate` with beam search and with dynamic NTK past the model's window, and a two-rank run's clean exit on NCCL
(two GPUs needed: NCCL refuses two ranks on one device). The training runs are `python -m pipeline train` as typed;
the two `generate` commands run in this process (the same main(), without an interpreter's start: tests/gpu has
two minutes on an H100 in all, and the older files take most of them).

The recipes are LLaMA-Factory's examples in a LLaMA-Factory-like working copy (tests/compat), pointed at a tiny Llama
written by transformers' save_pretrained. Golden values come from transformers and PEFT on the same device: PEFT
loading each written adapter gives our trained model's logits, transformers' generate(num_beams=...) and its dynamic
rope give the text `generate` prints, LLaMA-Factory's ASFT loss (re-typed from its source in tests/train/test_asft.py)
over transformers' logits gives step 1's loss. A training run must also show the GPU busy in its profiled step
(PIPELINE_PROFILE), or it could have passed on the CPU.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.harness import assert_close, pipeline

LLAMA3 = "template=llama3"  # the tiny Llama's tokenizer holds Llama 3's markup, not the examples' Qwen templates
FAST = ["dataloader_num_workers=0", "overwrite_cache=true", "logging_steps=1", "save_steps=1000", "plot_loss=false",
        "warmup_ratio=0"]
PROBE = [[3, 17, 42, 99, 120, 7, 64, 5]]  # token ids of the tiny Llama's 384-token vocabulary, for logits


@pytest.fixture(scope="module")
def work(tmp_path_factory, device) -> tuple[Path, Path]:
    """(the tiny Llama, a LLaMA-Factory-like working copy whose examples name it), with stage ppo's removed
    example and one_prompt data (tests/compat/test_ppo_example.py) and a reward model saved by transformers."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    import torch
    import transformers

    from tests.compat.test_ppo_example import checkout

    root = tmp_path_factory.mktemp("features")
    base, copy = checkout(root)
    torch.manual_seed(0)
    transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).save_pretrained(root / "rm")
    return base, copy


def train(copy: Path, recipe: str, overrides: list[str], env: dict[str, str]) -> tuple[Path, list[dict[str, Any]]]:
    """`python -m pipeline train RECIPE OVERRIDES` in the working copy, step 1 profiled; (its output_dir, the log)."""
    out = copy / "profile.json"
    out.unlink(missing_ok=True)
    done = pipeline("train", recipe, *overrides, cwd=copy, env={**env, "PIPELINE_PROFILE": f"{out}:1:1"})
    run = copy / next(line.split(":", 1)[1].strip() for line in (copy / recipe).read_text().splitlines()
                      if line.startswith("output_dir:"))
    assert done.returncode == 0 and (run / "all_results.json").is_file()
    return run, [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]


def assert_ran_on(device: str, copy: Path) -> None:
    """On CUDA the profiled step ran kernels on the GPU (a run that fell back to the CPU has none)."""
    profile = json.loads((copy / "profile.json").read_text())
    assert profile["steps"] == [1, 1]
    if device == "cuda":
        assert profile["device_busy_ms"] > 0, profile


def peft_logits(base: Path, adapter: Path, device: str, dtype: Any) -> tuple[Any, Any]:
    """(the base's, base + adapter's) logits of PROBE in transformers + PEFT on `device`: the base read in `dtype`
    (bf16: rounded as a pure_bf16 run holds it), then computed in fp32 with the adapter's fp32 values."""
    import peft
    import torch
    import transformers

    ids = torch.tensor(PROBE, device=device)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=dtype).float().to(device).eval()
    with torch.no_grad():
        plain = model(ids).logits.float()
        adapted = peft.PeftModel.from_pretrained(model, adapter).eval()
        return plain, adapted(ids).logits.float()


def our_logits(copy: Path, recipe: str, overrides: list[str], device: str, dtype: Any) -> Any:
    """Our trained model as `generate --model adapter` loads it, in `dtype` on `device`, then computed in fp32 (as
    peft_logits): the logits of PROBE."""
    import torch

    from pipeline.chat import chosen_weights
    from pipeline.model.build import load_for_inference
    from pipeline.recipe import resolve
    from pipeline.recipe.args import recipe_args
    from pipeline.runtime.layout import RunLayout
    from tests.acceptance.harness import cli_env

    here = Path.cwd()
    os.chdir(copy)
    try:
        r = resolve(Path(recipe), overrides, command="generate", env=cli_env(WORLD_SIZE="1"))
        model, finetune = recipe_args(r)
        weights = chosen_weights(RunLayout.of(r["output_dir"]), finetune, "adapter")
        ours = load_for_inference(model, weights.kind, weights.path, device=device, dtype=dtype)
    finally:
        os.chdir(here)
    with torch.no_grad():
        return ours.float()(torch.tensor(PROBE, device=device))


def test_ppo_one_lora_step_in_bf16(work, device, device_env):
    """LLaMA-Factory's llama3_lora_ppo example, one PPO step in bf16 against a transformers-saved reward model: the
    rollout's KL to the reference is 0 (the policy is its base before the update, on the same device and dtype), the
    step's reward and losses are finite, and the adapter written beside TRL's value head loads in PEFT with our
    trained model's logits, moved from the base's."""
    import torch

    base, copy = work
    recipe = "examples/train_lora/llama3_lora_ppo.yaml"
    used = ["max_steps=1", "dataset=one_prompt", "max_new_tokens=5", "gradient_accumulation_steps=1", "ppo_epochs=1",
            "learning_rate=1e-2", f"reward_model={copy.parent / 'rm'}", "reward_model_type=full", "bf16=true", *FAST]
    run, log = train(copy, recipe, used, device_env)
    assert_ran_on(device, copy)
    step = log[0]
    assert step["step"] == 1 and step["kl"] == 0.0, step
    assert all(math.isfinite(step[key]) for key in ("loss", "reward", "loss/value")), step
    from safetensors.torch import load_file

    head = load_file(run / "adapter" / "value_head.safetensors")
    assert {k: tuple(v.shape) for k, v in head.items()} == {"v_head.summary.weight": (1, 32),
                                                            "v_head.summary.bias": (1,)}
    plain, theirs = peft_logits(base, run / "adapter", device, torch.float32)
    assert_close(theirs, our_logits(copy, recipe, used, device, torch.float32))
    assert (theirs - plain).abs().max() > 1e-4 * plain.abs().max()  # the step moved the adapter


def test_asft_lora_under_pure_bf16(work, device, device_env):
    """LLaMA-Factory's extras/asft example (asft_alpha 0.05, ZeRO 0) as a LoRA run under pure_bf16, two steps.

    ASFT: step 1's logged loss is LLaMA-Factory's asft_loss_func over transformers' logits of the step's batch, the
    policy and the reference both the starting model (LoRA's B starts at 0: the KL term is 0, the loss the DFT
    part), within bf16's rounding of the fp32 golden. pure_bf16: the bf16 base trains a LoRA adapter held in fp32
    (PEFT's cast_adapter_dtype): the written adapter is fp32 with values no bf16 could hold, and transformers' base
    read in bf16 with it in PEFT on the same device gives our trained model's logits (as `generate --model adapter`
    loads it: the bf16 base, the fp32 adapter), both computed in fp32 so that the two forwards' own bf16 rounding
    (a few percent on this model) cannot hide a wrong adapter."""
    import torch
    from safetensors.torch import load_file

    from tests.acceptance.test_asft_cli import step_loss

    base, copy = work
    recipe = "examples/extras/asft/qwen2_full_asft.yaml"
    used = [LLAMA3, "finetuning_type=lora", "pure_bf16=true", "bf16=false", "dataset=identity", "max_samples=8",
            "cutoff_len=256", "max_steps=2", "gradient_accumulation_steps=1", "per_device_train_batch_size=4",
            "learning_rate=5e-2", *FAST]
    run, log = train(copy, recipe, used, device_env)
    assert_ran_on(device, copy)
    golden = step_loss(base, base, first_batch(copy, recipe, used), 0.05)
    assert log[0]["loss"] == pytest.approx(golden, rel=3e-2), (log[0], golden)
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert any(not torch.equal(t, t.bfloat16().float()) for name, t in tensors.items() if "lora_B" in name)
    plain, theirs = peft_logits(base, run / "adapter", device, torch.bfloat16)
    assert_close(theirs, our_logits(copy, recipe, used, device, torch.bfloat16))
    assert (theirs - plain).abs().max() > 1e-2 * plain.abs().max()  # the adapter moved the model


def first_batch(copy: Path, recipe: str, overrides: list[str]) -> dict[str, Any]:
    """The first training micro-batch the run's loader yields (its rows, shuffled by the recipe's seed)."""
    from pipeline.data.loaders import make_loader
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args
    from tests.acceptance.harness import cli_env

    here = Path.cwd()
    os.chdir(copy)
    try:
        data = data_args(resolve(Path(recipe), overrides, command="train", env=cli_env(WORLD_SIZE="1")))
        return next(make_loader(data, "train", rank=0, world_size=1, epoch=0, shuffle=True).iter_from(0))
    finally:
        os.chdir(here)


@pytest.fixture
def in_process(device, monkeypatch):
    """`python -m pipeline ARGS` run in this process (tests.reliability.rel_helpers.run_main: no interpreter start,
    no torch import: seconds of the GPU check's budget), on `device` (the CPU: CUDA hidden from it)."""
    import torch

    from tests.reliability.rel_helpers import run_main

    if device == "cpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def run(*argv: str, cwd: Path) -> str:
        done = run_main([*argv], cwd)
        assert done.code == 0, done.err[-3000:]
        return done.out
    return run


def test_generate_beam_search_equals_transformers(tmp_path, device, in_process):
    """`python -m pipeline generate` with LLaMA-Factory's num_beams / length_penalty on a transformers GPT-2 answers
    what transformers' generate(num_beams=3, length_penalty=0.5) answers on the same device (the CPU suite's check,
    tests/model/test_beam_search.py, on the device)."""
    pytest.importorskip("transformers")
    from tests.model.test_beam_search import generate_cli_beams_equal_transformers

    generate_cli_beams_equal_transformers(tmp_path, in_process, device)


def test_generate_with_dynamic_ntk_past_the_window_equals_transformers(tmp_path, device, in_process):
    """A Llama whose config.json has dynamic NTK over 16 positions: `python -m pipeline generate` runs 30 tokens past
    its window (the frequencies rescaled at each step past it, the cached keys keeping theirs) and prints what
    transformers' greedy generate (with its cache) gives on the same device."""
    transformers = pytest.importorskip("transformers")
    import torch

    from tests.acceptance.harness import write_hf_checkpoint

    ref = write_hf_checkpoint(tmp_path / "base", "llama", small_vocab=True, noise=0.3, max_position_embeddings=16,
                              rope_scaling={"rope_type": "dynamic", "factor": 2.0}).to(device).eval()
    (tmp_path / "r.yaml").write_text(f"model_name_or_path: {tmp_path / 'base'}\nmax_new_tokens: 30\n"
                                     f"do_sample: false\noutput_dir: {tmp_path / 'out'}\n", encoding="utf-8")
    text = "the cat sat on a mat"
    printed = in_process("generate", "r.yaml", "--model", "base", "--raw", "--prompt", text, cwd=tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "base")
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        new = ref.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=tok.eos_token_id)[0, ids.shape[1]:]
    assert ids.shape[1] + len(new) > 16 + 8, "the answer must run well past the window of 16"
    assert printed == tok.decode(new, skip_special_tokens=True) + "\n"


def test_two_ranks_end_cleanly(work, device, device_env):
    """Two ranks launched as LLaMA-Factory users do (`deepspeed --num_gpus 2`), one LoRA step under ZeRO 2: both
    leave with exit 0 after the end-of-run barrier (pipeline.runtime.dist.end_process), no abort on the way out,
    and on NCCL its own C-level log lines (NCCL_DEBUG=INFO) reach the output, flushed before os._exit."""
    import torch

    from tests.ports import run_on_free_port

    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip(f"two NCCL ranks need two GPUs (NCCL refuses two ranks on one device); "
                    f"{torch.cuda.device_count()} here")
    _, copy = work
    used = [LLAMA3, "dataset=identity", "max_samples=8", "cutoff_len=256", "max_steps=1", "zero_stage=2",
            "gradient_accumulation_steps=1", "output_dir=saves/two_ranks", "bf16=true", *FAST]
    launcher = str(Path(os.sys.executable).with_name("deepspeed"))
    if not Path(launcher).is_file():
        launcher = shutil.which("deepspeed") or launcher
    proc = run_on_free_port(lambda port: [launcher, "--num_gpus", "2", "--master_port", port, "--module", "pipeline",
                                          "train", "examples/train_lora/qwen3_lora_sft.yaml", *used],
                            cwd=copy, env={**device_env, "NCCL_DEBUG": "INFO"}, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "terminate called" not in output and "Traceback" not in output, output[-4000:]
    assert json.loads((copy / "saves/two_ranks/all_results.json").read_text())["global_step"] == 1
    if device == "cuda":
        assert "NCCL INFO" in output, output[-4000:]
