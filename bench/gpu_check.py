"""GPU check: a few training steps per (model shape x precision x ZeRO stage), a merge verification, one JSON.

Run by bench/gpu_check.sh on a CUDA machine after `make setup` with a CUDA torch (see that script), or
directly: `.venv/bin/python -m bench.gpu_check --out gpu_check.json`. Every run is the user's path:
`python -m pipeline train RECIPE` in a subprocess on a generated recipe and synthetic Alpaca-like data
(random weights: nothing is downloaded). Figures per run, from the run's own trainer_log.jsonl:

- tokens/s: median over the logged steps after the first two (compilation, allocator warm-up) and before the
  last two, which torch.profiler watches (the profile's JSON);
- MFU: model FLOPs per token x tokens/s / the GPU's peak dense bf16/fp16 FLOP/s. Model FLOPs per token
  (PaLM's convention, full fine-tuning): 6 N + 12 L q T, N = parameters in matmuls (the output head
  included, the embedding lookup not), L layers, q = heads x head_dim, T the mean real tokens per row (an upper
  bound for neat-packed rows, whose attention spans one example); the peak comes from a
  table of datasheet figures by GPU name (dense, no sparsity), and a measured bf16 matmul peak is reported
  beside it.

The suite's CUDA-only tests (tests/gpu: the varlen kernel against each example run alone; the user's path
from transformers-written checkpoints through train and merge to transformers and PEFT; stage ppo, ASFT under
pure_bf16, beam search and dynamic NTK generation, two NCCL ranks' exit) run first, with pytest, within a third
of the budget; the JSON keeps the files run, each test's outcome (also those done before a timeout), the slowest
phases and each skipped test's reason.

Packing (issue 17's speed target, on the GPU): our unpacked LoRA run (group_by_length, the default) against
our neat-packed one on the first model, at each --packing-batches size, useful tokens/s each (real tokens,
never padding: the trainer's own count). The packed run takes the rows that carry about the tokens of the
unpacked batch, measured from the unpacked run itself (its real tokens per example), so both do the same
work a step; the ratio is the packed run's tokens/s over the unpacked one's (target 1.3).

Peers (the issue's side-by-side benchmark, on the GPU): bench/packing.py as `make bench` runs it on the CPU,
in one call - ours unpacked, ours neat_packing, transformers + PEFT padded as LLaMA-Factory runs it by
default, and transformers + PEFT with LLaMA-Factory's neat packing reproduced - on the Alpaca-like and the
book-like rows (gpt2-small widths, 4 blocks, LoRA r16, bf16, cutoff 512: the CPU benchmark's shapes, so
the two machines compare). Its packing.json goes beside --out; the JSON's `peers` keeps the ratios and the
targets (1.3x our unpacked run, 3x transformers + PEFT padded).

--only picks sections (tests, matrix, merge, throughput, packing; peers only when named), so that a second
call on the same machine can spend its time where the first ran out. The whole check keeps to --budget-s
(default 420 s, so that setup + check stay within 8 minutes on a cached pip): runs left when it is spent are
reported as skipped, never silently dropped. fp16 on a machine without CUDA is skipped with its reason
(DeepSpeed refuses it on CPU); a model preset this checkout does not have (qwen3-0.6b before the
family-generic decoder landed) likewise.

--allow-cpu runs the same code on a CPU (bf16 only) so the tests can exercise it end to end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# Dense (no sparsity) peak tensor FLOP/s for bf16/fp16 inputs, from the vendors' datasheets; matched by
# substring of torch.cuda.get_device_name(), first match wins (so "H100 PCIe" is listed before "H100").
PEAK_TFLOPS: list[tuple[str, float]] = [
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("GH200", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("A10G", 125.0), ("A10", 125.0), ("L40S", 362.0),
    ("L40", 181.0), ("L4", 121.0), ("A6000", 155.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
    ("V100", 125.0), ("T4", 65.0),
]
MODELS = ("gpt2-small", "qwen3-0.6b")
CUDA_TESTS = "tests/gpu"  # the real varlen kernel against each example alone; the user's path on CUDA
LAST_CUDA_TESTS = "test_features_cuda.py"  # ppo, ASFT, pure_bf16, beams, dynamic NTK, NCCL: run after the rest
# tokens/s is the median of the logged steps after WARMUP_STEPS (compilation, allocator warm-up). torch.profiler
# (PIPELINE_PROFILE, pipeline/train/step_profile.py) watches the last PROFILE_COUNT steps of each run, so that
# every timed step comes before it: a profiler can slow the steps after it (kineto keeps CUPTI's callbacks
# installed unless TEARDOWN_CUPTI=1, pytorch/pytorch#144455), and the second lease timed the two steps right
# after its profiled ones.
WARMUP_STEPS, PROFILE_COUNT = 2, 2
PRECISIONS = ("bf16", "fp16")
ZERO_STAGES = (2, 3)
SECTIONS = ("tests", "matrix", "merge", "throughput", "packing", "peers")
DEFAULT_SECTIONS = SECTIONS[:-1]  # peers is a benchmark of minutes: run when named (--only peers)
PACKING_STEPS = 16  # more than --steps: an unpacked run's batches vary in length, its median needs more of them
PACKING_TARGET = 1.3  # issue 17: neat_packing useful tokens/s >= 1.3x our unpacked run


@dataclass
class Run:
    model: str
    precision: str
    zero_stage: int
    batch: int | None = None  # a throughput or packing run's batch; None: --batch
    lora: bool = False  # a packing run: LoRA r16, as the CPU packing benchmark
    packing: str = "neat"  # neat (neat_packing rows of cutoff_len) | none (one example a row, group_by_length)
    steps: int | None = None  # None: --steps
    status: str = "pending"  # ok | failed | skipped | unfinished (the budget ran out during it)
    reason: str | None = None
    tokens_per_s: float | None = None
    mfu: float | None = None
    loss_first: float | None = None
    loss_last: float | None = None
    loss_scale: float | None = None
    seconds: float | None = None
    stderr_tail: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        kind = f"-lora-{'unpacked' if self.packing == 'none' else 'neat'}" if self.lora else ""
        return f"{self.model}-{self.precision}-zero{self.zero_stage}{kind}" + (f"-b{self.batch}" if self.batch else "")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON of results")
    p.add_argument("--workdir", type=Path, default=None, help="where recipes, data and runs go (default: a temp dir)")
    p.add_argument("--models", default=",".join(MODELS), help="model presets, comma-separated")
    p.add_argument("--precisions", default=",".join(PRECISIONS), help="bf16 and/or fp16")
    p.add_argument("--zero", default=",".join(map(str, ZERO_STAGES)), help="ZeRO stages, comma-separated")
    p.add_argument("--steps", type=int, default=8, help="optimizer steps per run")
    p.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--throughput-batch", type=int, default=64,
                   help="one more run per model (bf16, ZeRO 2) at this batch, for tokens/s and MFU where the GPU is "
                        "not starved by per-step host work; 0: none")
    p.add_argument("--packing-batches", default="16,64",
                   help="unpacked batch sizes at which our unpacked LoRA run meets our neat-packed one (first model, "
                        "ZeRO 2); 0: none")
    p.add_argument("--packing-steps", type=int, default=PACKING_STEPS,
                   help="optimizer steps of each packing run (more than --steps: an unpacked run's batches vary in "
                        "length, so its median tokens/s needs more of them)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"sections to run, comma-separated: {', '.join(SECTIONS)} (default: all but peers)")
    p.add_argument("--no-profile", action="store_true",
                   help=f"no torch.profiler over the last {PROFILE_COUNT} steps of each run")
    p.add_argument("--cutoff", type=int, default=512, help="cutoff_len (rows are neat-packed to it)")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting runs after this many seconds")
    p.add_argument("--allow-cpu", action="store_true", help="run without CUDA (bf16 only): for tests")
    p.add_argument("--no-merge", action="store_true", help="skip the LoRA run + merge verification")
    p.add_argument("--no-tests", action="store_true", help=f"skip the CUDA tests ({CUDA_TESTS})")
    p.add_argument("--dry-run", action="store_true", help="write the recipes and print the plan; train nothing")
    args = p.parse_args(argv)
    args.models = _split(p, args.models, "--models", None)
    args.precisions = _split(p, args.precisions, "--precisions", PRECISIONS)
    try:
        args.zero = [int(z) for z in _split(p, args.zero, "--zero", None)]
    except ValueError:
        p.error(f"--zero: expected stages such as 2,3, got {args.zero!r}")
    if not set(args.zero) <= {0, 1, 2, 3}:
        p.error(f"--zero: stages are 0..3, got {args.zero}")
    for name in ("steps", "batch", "cutoff", "packing_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.throughput_batch < 0:
        p.error("--throughput-batch must be 0 (none) or more")
    try:
        args.packing_batches = [int(b) for b in _split(p, args.packing_batches, "--packing-batches", None)]
    except ValueError:
        p.error(f"--packing-batches: expected batch sizes such as 16,64, got {args.packing_batches!r}")
    if any(b < 0 for b in args.packing_batches):
        p.error("--packing-batches: sizes are 1 or more (0: none)")
    args.packing_batches = [b for b in args.packing_batches if b]
    args.only = set(_split(p, args.only, "--only", SECTIONS))
    if args.no_tests:
        args.only.discard("tests")
    if args.no_merge:
        args.only.discard("merge")
    return args


def _split(p: argparse.ArgumentParser, text: str, flag: str, allowed: tuple[str, ...] | None) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        p.error(f"{flag}: nothing given")
    bad = [t for t in items if allowed is not None and t not in allowed]
    if bad:
        p.error(f"{flag}: {', '.join(bad)} not one of {', '.join(allowed or ())}")
    return items


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return value
    return None


def flops_per_token(cfg: Any, mean_row: float) -> float:
    """6 N + 12 L q T (full fine-tuning): N = weights of every Linear (blocks and the output head, from the
    model's own layout, so grouped-query and SwiGLU shapes count right), q = heads x head_dim."""
    from pipeline.model.config import layout

    matmul_params = sum(m.in_dim * m.out_dim for m in layout(cfg) if m.kind == "linear")
    return 6 * matmul_params + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * mean_row


def write_data(directory: Path, rows: int = 2000, seed: int = 0) -> None:
    """Alpaca-like lengths (instruction 10-60 words, response 20-200 words) from a fixed vocabulary."""
    rng = random.Random(seed)
    words = ("model data train token batch layer weight value signal river stone cloud light water north south "
             "green blue quick slow small large garden window paper music morning night").split()

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(lo, hi)))

    (directory / "raw").mkdir(parents=True, exist_ok=True)
    with open(directory / "raw" / "alpaca_like.jsonl", "w", encoding="utf-8") as handle:
        for _ in range(rows):
            handle.write(json.dumps({"instruction": text(10, 60), "input": "", "output": text(20, 200)}) + "\n")
    (directory / "dataset_info.json").write_text(json.dumps(
        {"alpaca_like": {"file_name": "raw/alpaca_like.jsonl", "formatting": "alpaca"}}, indent=2), encoding="utf-8")


def recipe(run: Run, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    values: dict[str, Any] = {
        "model_name_or_path": run.model, "stage": "sft", "dataset": "alpaca_like", "dataset_dir": str(workdir / "data"),
        "template": "alpaca", "cutoff_len": args.cutoff, "neat_packing": True, "packing": True, "val_size": 0.01,
        "overlength_policy": "truncate", "finetuning_type": "lora" if run.lora else "full",
        "per_device_train_batch_size": run.batch or args.batch, "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-5,
        "max_steps": run.steps or args.steps, "warmup_steps": 0, "lr_scheduler_type": "constant", "logging_steps": 1,
        "save_steps": 100000, "plot_loss": False, "zero_stage": run.zero_stage, "bf16": run.precision == "bf16",
        "fp16": run.precision == "fp16", "output_dir": str(workdir / "runs" / run.name), "seed": 0,
        "overwrite_output_dir": True,  # the check again with the same --workdir starts over
        "save_only_model": True,  # nothing resumes here: no optimizer state (16 bytes a parameter) to write
        "max_grad_norm": 1.0,
    }
    if run.packing == "none":  # one example a row, batches of similar lengths: our default loader
        values.update(packing=False, neat_packing=False, group_by_length=True)
    if getattr(preset_config(run.model), "family", "gpt2") != "gpt2":
        # a Llama / Qwen preset has shapes but no vocabulary: GPT-2's ranks turn the synthetic text into ids
        # (offline, no download); the model keeps its own 128k / 152k-row embedding and head
        values["tokenizer_name_or_path"] = "gpt2"
    if run.precision == "fp16":
        values.update(loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1)
    if run.lora:
        values.update(lora_rank=16, lora_alpha=32, lora_target="all", learning_rate=1.0e-4)
    return values


def write_recipe(path: Path, values: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()), encoding="utf-8")
    return path


def recipe_path(workdir: Path, run: Run) -> Path:
    return workdir / "recipes" / f"{run.name}.yaml"


def write_run_recipe(run: Run, args: argparse.Namespace, workdir: Path) -> Path:
    return write_recipe(recipe_path(workdir, run), recipe(run, args, workdir))


def preset_config(model: str) -> Any:
    """The preset's ModelConfig, or None for a model this checkout has no preset of."""
    from pipeline.model.config import PRESETS

    return PRESETS.get(model)


def available_presets() -> set[str]:
    from pipeline.model.config import PRESETS

    return set(PRESETS)


def plan_runs(args: argparse.Namespace, cuda: bool, bf16_ok: bool = True) -> list[Run]:
    presets = available_presets()
    runs = []
    for model in args.models:
        for precision in args.precisions:
            for zero in args.zero:
                run = Run(model, precision, zero)
                if model not in presets:
                    run.status, run.reason = "skipped", f"no preset {model!r} in this checkout"
                elif precision == "fp16" and not cuda:
                    run.status, run.reason = "skipped", "fp16 needs CUDA (DeepSpeed refuses it on CPU)"
                elif precision == "bf16" and not bf16_ok:
                    run.status, run.reason = "skipped", "this GPU has no bf16 (pre-Ampere): fp16 only"
                runs.append(run)
    return runs


def plan_throughput(args: argparse.Namespace, bf16_ok: bool = True) -> list[Run]:
    """One run per model at --throughput-batch (ZeRO 2, bf16 where the GPU has it): the speed figure."""
    if not args.throughput_batch:
        return []
    presets = available_presets()
    return [Run(m, "bf16" if bf16_ok else "fp16", 2, batch=args.throughput_batch) for m in args.models if m in presets]


def packing_model(args: argparse.Namespace) -> str | None:
    """The model of the packing comparison: the first of --models this checkout has."""
    return next((m for m in args.models if m in available_presets()), None)


def plan_packing(args: argparse.Namespace, bf16_ok: bool = True) -> list[Run]:
    """Our unpacked LoRA run at each --packing-batches size (ZeRO 2); each one's packed partner is planned from
    its measured tokens per example (packed_partner)."""
    model = packing_model(args)
    if model is None or "packing" not in args.only:
        return []
    return [Run(model, "bf16" if bf16_ok else "fp16", 2, batch=b, lora=True, packing="none",
                steps=args.packing_steps)
            for b in args.packing_batches]


def packed_partner(unpacked: Run, cutoff: int, mean_example: float | None = None) -> Run:
    """The neat-packed run doing about the unpacked batch's work a step: the rows of cutoff_len that hold its
    real tokens (batch x tokens per example; --cutoff when nothing was measured, as in --dry-run)."""
    per_example = mean_example or cutoff
    rows = max(1, round((unpacked.batch or 1) * per_example / cutoff))
    return Run(unpacked.model, unpacked.precision, unpacked.zero_stage, batch=rows, lora=True, packing="neat",
               steps=unpacked.steps)


def peers_command(workdir: Path, budget_s: float) -> list[str]:
    """bench/packing.py's side-by-side benchmark as `make bench` runs it, on this machine's GPU; half the budget
    per dataset (two rounds at least: each contender runs at least twice)."""
    return [sys.executable, "-m", "bench.packing", "--only", "packing", "--workdir", str(workdir / "peers"),
            "--budget-s", f"{max(budget_s, 60.0):.0f}"]


def peers_result(payload: dict[str, Any]) -> dict[str, Any]:
    """What the JSON keeps of bench/packing.py's packing.json: per dataset its ratios; the targets met or not."""
    return {"device": payload.get("config", {}).get("device"), "config": payload.get("config"),
            "ratios": {name: d["summary"] for name, d in payload.get("datasets", {}).items()},
            "targets": payload.get("targets", [])}


def run_peers(args: argparse.Namespace, workdir: Path, left: float) -> dict[str, Any]:
    """The peers section: bench/packing.py in a subprocess, its packing.json written beside --out."""
    if left < 120:
        return {"status": "skipped", "reason": f"{left:.0f} s of the budget left; the benchmark needs minutes"}
    env = {**_env(), "BENCH_RESULTS": str(args.out.resolve().parent)}
    try:
        proc = subprocess.run(peers_command(workdir, left - 30), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=left)
    except subprocess.TimeoutExpired:
        return {"status": "unfinished", "reason": f"the check's time budget ran out ({left:.0f} s)"}
    if proc.returncode != 0:
        return {"status": "failed", "reason": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    path = args.out.resolve().parent / "packing.json"
    return {"status": "ok", "file": str(path), **peers_result(json.loads(path.read_text(encoding="utf-8")))}


def packing_result(unpacked: Run, neat: Run) -> dict[str, Any]:
    """One line of the JSON's packing table: both runs' useful tokens/s and their ratio against the target."""
    ratio = (round(neat.tokens_per_s / unpacked.tokens_per_s, 3)
             if neat.tokens_per_s and unpacked.tokens_per_s else None)
    return {"model": unpacked.model, "precision": unpacked.precision, "unpacked": unpacked.name, "neat": neat.name,
            "unpacked_batch": unpacked.batch, "neat_rows": neat.batch,
            "tokens_per_example": unpacked.extra.get("mean_row"),
            "unpacked_tokens_per_s": unpacked.tokens_per_s, "neat_tokens_per_s": neat.tokens_per_s,
            "ratio": ratio, "target": PACKING_TARGET, "met": None if ratio is None else ratio >= PACKING_TARGET}


def pipeline_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def profiled_steps(args: argparse.Namespace, steps: int | None = None) -> range:
    """The steps torch.profiler watches: the run's last ones, and only when at least one step after the warm-up
    is left before them to time."""
    total = steps or args.steps
    if args.no_profile or total < WARMUP_STEPS + PROFILE_COUNT + 1:
        return range(0)
    return range(total - PROFILE_COUNT + 1, total + 1)


def execute(run: Run, path: Path, output_dir: Path, timeout: float, batch: int, profile: range = range(0)) -> None:
    start = time.monotonic()
    env = _env()
    profile_file = output_dir.parent / f"{run.name}.profile.json"  # beside output_dir, which the run empties
    profile_file.unlink(missing_ok=True)
    if profile:
        env["PIPELINE_PROFILE"] = f"{profile_file}:{profile.start}:{len(profile)}"
    try:
        proc = subprocess.run(pipeline_cmd("train", str(path)), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:  # the only limit on a run is what is left of the check's budget
        run.status, run.seconds = "unfinished", round(time.monotonic() - start, 2)
        run.reason = (f"the check's time budget ran out {timeout:.0f} s into the run: not a failure, unless it "
                      "recurs with more time (--budget-s, or --only for fewer sections)")
        return
    run.seconds = round(time.monotonic() - start, 2)
    if proc.returncode != 0:
        run.status, run.reason = "failed", f"exit {proc.returncode}"
        run.stderr_tail = proc.stderr[-3000:]
        return
    records = [json.loads(line) for line in (output_dir / "trainer_log.jsonl").read_text().splitlines() if line]
    timed = [r for r in records if "tokens_per_s" in r]
    steady = [r["tokens_per_s"] for r in timed if r["step"] > WARMUP_STEPS and r["step"] not in profile] or \
        [r["tokens_per_s"] for r in timed]
    losses = [r["loss"] for r in records if "loss" in r]
    run.status = "ok"
    run.tokens_per_s = round(statistics.median(steady), 1) if steady else None
    run.loss_first, run.loss_last = (losses[0], losses[-1]) if losses else (None, None)
    run.loss_scale = next((r["loss_scale"] for r in reversed(records) if r.get("loss_scale") is not None), None)
    results = json.loads((output_dir / "all_results.json").read_text())
    steps, seen = results.get("global_step") or 0, results.get("tokens_seen") or 0
    run.extra["tokens_seen"] = seen
    run.extra["timed_tokens_per_s"] = [round(t, 1) for t in steady]  # the steps the median is of: their spread
    loop = next((r["elapsed"] for r in reversed(records) if "elapsed" in r), None)  # the training loop's own time
    if loop is not None:  # the rest is start-up (imports, model build, DeepSpeed) and the final save
        run.extra["loop_s"], run.extra["outside_loop_s"] = round(loop, 2), round(run.seconds - loop, 2)
    run.extra["mean_row"] = round(seen / (steps * batch), 1) if steps else None  # real tokens per packed row
    if profile_file.is_file():
        run.extra["profile"] = profile_digest(json.loads(profile_file.read_text()))


def profile_digest(profile: dict[str, Any], rows: int = 6) -> dict[str, Any]:
    """What the JSON keeps of a step profile: the totals (host syncs per step among them), and the top ops by host
    time, device time and calls."""
    keep = ("steps", "wall_ms_per_step", "self_cpu_ms", "device_busy_ms", "device_busy_share", "ops",
            "host_syncs_per_step", "syncing_ops_per_step")
    return {**{k: profile.get(k) for k in keep}, "top_cpu": profile.get("top_cpu", [])[:rows],
            "top_device": profile.get("top_device", [])[:rows], "top_calls": profile.get("top_calls", [])[:rows]}


def measured_matmul_tflops(cuda: bool) -> float | None:
    """Best of a few bf16 8192^3 matmuls (CUDA only): what this GPU delivers to a large dense matmul."""
    if not cuda:
        return None
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    best = float("inf")
    for _ in range(8):
        torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return round(2 * 8192 ** 3 / best / 1e12, 1)


def merge_check(args: argparse.Namespace, workdir: Path, model: str, timeout: float) -> dict[str, Any]:
    """A short LoRA run (bf16, ZeRO 2) and `pipeline merge` on it; the merge verifies itself."""
    run = Run(model, "bf16", 2, lora=True)
    run_dir = workdir / "runs" / f"{model}-lora-merge"
    values = {**recipe(run, args, workdir), "output_dir": str(run_dir), "max_steps": 2}
    path = write_recipe(workdir / "recipes" / f"{model}-lora-merge.yaml", values)
    start = time.monotonic()
    out: dict[str, Any] = {"model": model, "recipe": str(path)}
    for command in ("train", "merge"):
        left = timeout - (time.monotonic() - start)
        try:
            proc = subprocess.run(pipeline_cmd(command, str(path)), cwd=REPO, env=_env(), capture_output=True,
                                  text=True, timeout=max(left, 1.0))
        except subprocess.TimeoutExpired:
            return {**out, "status": "failed", "reason": f"{command} timed out"}
        if proc.returncode != 0:
            return {**out, "status": "failed", "reason": f"{command} exit {proc.returncode}",
                    "stderr_tail": proc.stderr[-3000:]}
    report = run_dir / "merged" / "verification.json"
    out.update(status="ok", seconds=round(time.monotonic() - start, 2),
               verification=json.loads(report.read_text()) if report.is_file() else None)
    return out


def cuda_tests(timeout: float) -> dict[str, Any]:
    """The suite's CUDA-only tests (skipped on every CPU run), run here with pytest: their outcome line, each test's
    outcome (also of those that ran before a timeout), the slowest phases (to size the files to the budget) and the
    skipped ones' reasons. PIPELINE_TEST_DEVICE (tests/gpu/conftest.py: the CPU instead of CUDA) is not passed on."""
    import importlib.util

    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "reason": "pytest is not installed"}
    start = time.monotonic()
    env = {k: v for k, v in _env().items() if k != "PIPELINE_TEST_DEVICE"}
    # the user's path and the kernel first, the later features' checks last: a timeout cuts those, not the path
    paths = sorted((REPO / CUDA_TESTS).glob("test_*.py"), key=lambda p: (p.name == LAST_CUDA_TESTS, p.name))
    files = [str(p.relative_to(REPO)) for p in paths]
    command = [sys.executable, "-m", "pytest", "-v", "-rfEs", "--durations=0", "--durations-min=1",
               "-p", "no:cacheprovider", *files]
    try:
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired as err:
        partial = _text(err.stdout) + _text(err.stderr)
        return {"status": "failed", "reason": f"timed out after {timeout:.0f} s", "file": CUDA_TESTS, "files": files,
                "cases": case_outcomes(partial), "output_tail": partial[-4000:]}
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    out: dict[str, Any] = {"status": "ok" if proc.returncode == 0 else "failed", "file": CUDA_TESTS, "files": files,
                           "summary": lines[-1] if lines else "", "seconds": round(time.monotonic() - start, 2),
                           "cases": case_outcomes(proc.stdout),
                           "slowest": [line.strip() for line in lines if SLOW_LINE.match(line)][:20],
                           "skipped": [line for line in lines if line.startswith("SKIPPED")][:20]}  # and why
    if proc.returncode != 0:
        out["output_tail"] = (proc.stdout + proc.stderr)[-4000:]
    return out


CASE_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")  # pytest -v, one per test
SLOW_LINE = re.compile(r"^\d+\.\d+s (setup|call|teardown) ")  # pytest --durations


def case_outcomes(output: str) -> dict[str, str]:
    """node id -> outcome (passed, failed, error, skipped, ...) of each test in pytest -v output (a setup error
    comes after the test's own line: the last word stands)."""
    return {m.group(1): m.group(2).lower() for m in map(CASE_LINE.match, output.splitlines()) if m}


def _text(output: str | bytes | None) -> str:
    """What a timed-out subprocess had written (bytes or str, depending on the Python version)."""
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def device_facts(cuda: bool) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                             "host": platform.node()}
    if cuda:
        facts.update(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(),
                     memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1),
                     bf16_supported=torch.cuda.is_bf16_supported())
    else:
        facts.update(name=platform.processor() or "cpu", count=0)
    return facts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu and not args.dry_run:
        print("error: no CUDA GPU visible to torch (torch.cuda.is_available() is False): run bench/gpu_check.sh on a "
              "machine with an NVIDIA GPU, after `make setup` with a CUDA torch (the script does that), or pass "
              "--allow-cpu to exercise the check on a CPU", file=sys.stderr)
        return 2
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    write_data(workdir / "data")
    facts = device_facts(cuda)
    bf16_ok = facts.get("bf16_supported", True)
    runs = plan_runs(args, cuda, bf16_ok) if "matrix" in args.only else []
    throughput = plan_throughput(args, bf16_ok) if "throughput" in args.only else []
    unpacked = plan_packing(args, bf16_ok)
    peak = peak_tflops(facts["name"]) if cuda else None
    result: dict[str, Any] = {"device": facts, "peak_tflops_datasheet": peak, "workdir": str(workdir),
                              "settings": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path)
                                           else v) for k, v in vars(args).items()},
                              "runs": [], "merge": [], "tests": None, "packing": [], "peers": None}
    presets = available_presets()
    for run in runs + throughput + unpacked:  # every run of an available model, even one skipped here (tests check them)
        if run.model in presets:
            write_run_recipe(run, args, workdir)
    if args.dry_run:
        partners = [packed_partner(u, args.cutoff) for u in unpacked]  # sized from the data once the unpacked ran
        for run in partners:
            write_run_recipe(run, args, workdir)
        for run in runs + throughput + unpacked + partners:
            print(f"{run.name}: {run.status if run.status != 'pending' else 'would run'}"
                  f"{' (' + run.reason + ')' if run.reason else ''}")
        if "peers" in args.only:
            print(f"peers: would run {' '.join(peers_command(workdir, args.budget_s)[1:])}")
        result["runs"] = [asdict(r) | {"name": r.name} for r in runs + throughput + unpacked + partners]
        _write(args.out, result)
        return 0
    result["measured_matmul_tflops"] = measured_matmul_tflops(cuda)
    if "tests" in args.only:
        result["tests"] = cuda_tests(min(180.0, args.budget_s / 3))
        _write(args.out, result)
        print(f"tests {CUDA_TESTS}: {result['tests']['status']} {result['tests'].get('summary', '')}", flush=True)
    first = next((r for r in runs + throughput + unpacked if r.status == "pending"), None)
    if first is not None:  # the data, built once as a user does (`make data`)
        built = subprocess.run(pipeline_cmd("build", str(recipe_path(workdir, first))), cwd=REPO,
                               env=_env(), capture_output=True, text=True, timeout=300)
        if built.returncode != 0:
            print(built.stderr, file=sys.stderr)
            return 1

    def budget_left() -> float:
        return args.budget_s - (time.monotonic() - started)

    partners: list[Run] = []

    def save() -> None:
        """The JSON as it stands: a check cut short (a device lease ends, a kill) still leaves what it measured."""
        result["runs"] = [asdict(r) | {"name": r.name} for r in runs + throughput + unpacked + partners]
        result["seconds"] = round(time.monotonic() - started, 1)
        _write(args.out, result)

    for run in runs:
        train_run(run, args, workdir, budget_left(), peak)
        save()
    if "merge" in args.only:
        merged = [r.model for r in runs if r.status == "ok"] if runs else [m for m in args.models if m in presets]
        for model in dict.fromkeys(merged):
            if budget_left() < 20:
                result["merge"].append({"model": model, "status": "skipped", "reason": "time budget spent"})
                continue
            check = merge_check(args, workdir, model, budget_left())
            print(f"merge {model}: {check['status']}" + (f" ({check.get('reason')})" if check.get("reason") else ""),
                  flush=True)
            result["merge"].append(check)
            save()
    for run in throughput:  # after the matrix and the merge: the speed figure matters less than every precision/stage
        train_run(run, args, workdir, budget_left(), peak)
        save()
    for run in unpacked:  # last: a comparison, where the rest are checks
        train_run(run, args, workdir, budget_left(), peak)
        neat = packed_partner(run, args.cutoff, run.extra.get("mean_row"))
        if run.status != "ok":
            neat.status, neat.reason = "skipped", f"its unpacked partner {run.name} did not run"
        write_run_recipe(neat, args, workdir)
        train_run(neat, args, workdir, budget_left(), peak)
        partners.append(neat)
        line = packing_result(run, neat)
        result["packing"].append(line)
        save()
        if line["ratio"] is not None:
            print(f"packing {line['model']}: neat {neat.batch} rows / unpacked {run.batch} examples = "
                  f"{line['ratio']:.2f}x useful tokens/s (target {PACKING_TARGET}x)", flush=True)
    if "peers" in args.only:  # last: the longest section, and a benchmark where the rest are checks
        result["peers"] = run_peers(args, workdir, budget_left())
        for t in result["peers"].get("targets", []):
            print(f"peers: {t['what']}: {t['value']:.2f}x (target {t['op']} {t['target']}x: "
                  f"{'met' if t['met'] else 'missed'})", flush=True)
        print(f"peers: {result['peers']['status']}" + (f" ({result['peers'].get('reason')})"
                                                       if result["peers"].get("reason") else ""), flush=True)
    everything = runs + throughput + unpacked + partners
    save()
    failed = [r.name for r in everything if r.status == "failed"] + [m["model"] for m in result["merge"]
                                                                     if m["status"] == "failed"]
    if (result["tests"] or {}).get("status") == "failed":
        failed.append(CUDA_TESTS)
    if (result.get("peers") or {}).get("status") == "failed":
        failed.append("peers (bench/packing.py)")
    print(f"results: {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def train_run(run: Run, args: argparse.Namespace, workdir: Path, left: float, peak: float | None) -> None:
    """One pending run through `pipeline train`, its figures (tokens/s, model FLOPs, MFU) and a printed line."""
    from pipeline.model.config import read_config

    if run.status != "pending":
        return
    if left < 20:
        run.status, run.reason = "skipped", f"time budget of {args.budget_s:.0f} s spent"
        return
    batch = run.batch or args.batch
    execute(run, recipe_path(workdir, run), workdir / "runs" / run.name, left, batch,
            profiled_steps(args, run.steps))
    if run.status == "ok" and run.tokens_per_s and not run.lora:  # 6N counts weight gradients LoRA does not take
        per_token = flops_per_token(read_config(run.model), run.extra.get("mean_row") or args.cutoff)
        run.extra["model_flops_per_token"] = per_token
        run.extra["achieved_tflops"] = round(per_token * run.tokens_per_s / 1e12, 2)
        if peak:
            run.mfu = round(per_token * run.tokens_per_s / (peak * 1e12), 4)
    busy = (run.extra.get("profile") or {}).get("device_busy_share")
    print(f"{run.name}: {run.status}" + (f", {run.tokens_per_s:,.0f} tokens/s" if run.tokens_per_s else "")
          + (f", MFU {100 * run.mfu:.1f}%" if run.mfu is not None else "")
          + (f", GPU busy {100 * busy:.0f}% of the profiled steps" if busy is not None else "")
          + (f" ({run.reason})" if run.reason else ""), flush=True)


def _write(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
