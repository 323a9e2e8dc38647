"""bench/gpu_check.sh and bench.gpu_check on a CPU: every line that runs without CUDA (arguments, the
setup command, generated recipes through the real resolver, the CPU end-to-end path, the JSON)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.sh"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


@pytest.mark.parametrize("argv, message", [
    (["--precisions", "fp8"], "--precisions: fp8 not one of bf16, fp16"),
    (["--zero", "2,x"], "--zero: expected stages such as 2,3"),
    (["--zero", "4"], "--zero: stages are 0..3"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--packing-steps", "0"], "--packing-steps must be at least 1"),
    (["--models", ","], "--models: nothing given"),
    (["--packing-batches", "16,x"], "--packing-batches: expected batch sizes such as 16,64"),
    (["--packing-batches", "-4"], "--packing-batches: sizes are 1 or more"),
    (["--only", "tests,speed"], "--only: speed not one of tests, matrix, merge, throughput, packing"),
])
def test_bad_arguments_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        gpu_check.parse_args(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_peak_table_and_model_flops_by_hand():
    assert gpu_check.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_check.peak_tflops("Some Future GPU") is None
    from pipeline.model.config import PRESETS

    # gpt2-small: 12 x (4 x 768^2 + 2 x 768 x 3072) + 768 x 50257 = 123,532,032 matmul weights
    assert gpu_check.flops_per_token(PRESETS["gpt2-small"], 100) == 6 * 123_532_032 + 12 * 12 * 768 * 100
    if "qwen3-0.6b" in PRESETS:  # 28 x (1024 x (2048 + 2 x 1024) + 2048 x 1024 + 3 x 1024 x 3072) + 1024 x 151936
        per_layer = 1024 * (2048 + 2 * 1024) + 2048 * 1024 + 3 * 1024 * 3072
        assert gpu_check.flops_per_token(PRESETS["qwen3-0.6b"], 100) == \
            6 * (28 * per_layer + 1024 * 151936) + 12 * 28 * 16 * 128 * 100


def test_without_cuda_it_refuses_with_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(tmp_path / "g.json")], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU visible to torch" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "g.json").exists()


def test_dry_run_recipes_resolve_for_every_precision_and_stage(tmp_path):
    out, work = tmp_path / "g.json", tmp_path / "work"
    assert gpu_check.main(["--dry-run", "--out", str(out), "--workdir", str(work)]) == 0
    result = json.loads(out.read_text())
    names = {r["name"]: r for r in result["runs"]}
    assert set(names) >= {"gpt2-small-bf16-zero2", "gpt2-small-bf16-zero3", "gpt2-small-fp16-zero2",
                          "gpt2-small-fp16-zero3"}
    assert names["gpt2-small-fp16-zero2"]["status"] == "skipped"  # this machine has no CUDA
    assert names["gpt2-small-bf16-zero2-b64"]["batch"] == 64  # the throughput run, planned and resolved too
    assert "save_only_model: true" in (work / "recipes" / "gpt2-small-bf16-zero2-b64.yaml").read_text()
    unpacked = names["gpt2-small-bf16-zero2-lora-unpacked-b16"]  # the packing comparison's runs, resolved too
    assert unpacked["lora"] and unpacked["packing"] == "none" and unpacked["steps"] == gpu_check.PACKING_STEPS
    assert "gpt2-small-bf16-zero2-lora-neat-b16" in names  # sized from the data once the unpacked run has run
    recipes = sorted((work / "recipes").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {n for n in names if n.startswith("gpt2-small")}
    for path in recipes:  # the real resolver and DeepSpeed config on each (plan does not need the GPU)
        proc = subprocess.run([sys.executable, "-m", "pipeline", "plan", str(path)], cwd=REPO, env=_env(),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        ds = proc.stdout
        assert "overwrite_output_dir: true" in path.read_text()  # a second check in the same --workdir starts over
        assert ('"stage": 3' in ds) == path.stem.endswith("zero3")
        if "fp16" in path.stem:
            assert '"loss_scale": 0' in ds and '"initial_scale_power": 16' in ds  # dynamic loss scaling
        text = path.read_text()
        assert ("group_by_length: true" in text and "neat_packing: false" in text) == ("-unpacked-" in path.stem)
        assert ('finetuning_type: "lora"' in text) == ("-lora-" in path.stem)


def test_sections_and_the_packed_partner_by_hand():
    """--only keeps the named sections (--no-tests / --no-merge still drop theirs); the packed run takes the rows of
    cutoff_len that hold the unpacked batch's real tokens."""
    args = gpu_check.parse_args(["--only", "packing,merge", "--no-merge", "--packing-batches", "16,0,64"])
    assert args.only == {"packing"} and args.packing_batches == [16, 64]
    assert gpu_check.parse_args(["--no-tests"]).only == set(gpu_check.DEFAULT_SECTIONS) - {"tests"}
    assert "peers" not in gpu_check.parse_args([]).only and gpu_check.parse_args(["--only", "peers"]).only == {"peers"}
    assert gpu_check.plan_packing(gpu_check.parse_args(["--only", "matrix"])) == []
    unpacked = gpu_check.plan_packing(args)[0]
    assert (unpacked.model, unpacked.batch, unpacked.packing) == ("gpt2-small", 16, "none")
    assert gpu_check.packed_partner(unpacked, 512, 190.0).batch == 6  # 16 x 190 = 3,040 tokens: 5.9 rows of 512
    assert gpu_check.packed_partner(unpacked, 512, 10.0).batch == 1  # never no row
    neat = gpu_check.packed_partner(unpacked, 512, 190.0)
    unpacked.tokens_per_s, neat.tokens_per_s = 1000.0, 1250.0
    line = gpu_check.packing_result(unpacked, neat)
    assert line["ratio"] == 1.25 and line["met"] is False and line["target"] == 1.3
    neat.tokens_per_s = None  # a partner that did not run: no ratio, no verdict
    assert gpu_check.packing_result(unpacked, neat)["met"] is None



def test_the_profiled_steps_are_the_last_ones_so_every_timed_step_precedes_them():
    """Steps 1-2 warm up, the last two are profiled, the ones between are timed; too short a run is not profiled."""
    args = gpu_check.parse_args([])
    assert list(gpu_check.profiled_steps(args, 8)) == [7, 8] and list(gpu_check.profiled_steps(args, 5)) == [4, 5]
    assert list(gpu_check.profiled_steps(args, 4)) == []  # nothing would be left to time
    assert list(gpu_check.profiled_steps(gpu_check.parse_args(["--no-profile"]), 8)) == []


def test_a_run_the_budget_cuts_short_is_unfinished_not_failed(tmp_path, monkeypatch):
    """A run's only time limit is what is left of the check's budget: one cut short says so and is no failure
    (on the H200, qwen3 fp16 got 26 s and read as 'failed')."""
    def out_of_time(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs["timeout"])

    monkeypatch.setattr(gpu_check.subprocess, "run", out_of_time)
    run = gpu_check.Run("qwen3-0.6b", "fp16", 2)
    gpu_check.execute(run, tmp_path / "r.yaml", tmp_path / "runs" / run.name, timeout=26.0, batch=8)
    assert run.status == "unfinished" and "budget ran out 26 s into the run" in run.reason


def test_peers_runs_the_side_by_side_benchmark_and_keeps_its_ratios(tmp_path, monkeypatch):
    """--only peers: bench/packing.py (the CPU benchmark's contenders and shapes) on this machine, its packing.json
    beside --out, the ratios and targets in the check's JSON; too little budget skips it with the reason."""
    cmd = gpu_check.peers_command(tmp_path, 300.0)
    assert cmd[1:5] == ["-m", "bench.packing", "--only", "packing"] and cmd[-2:] == ["--budget-s", "300"]
    args = gpu_check.parse_args(["--only", "peers", "--out", str(tmp_path / "out" / "g.json")])
    assert gpu_check.run_peers(args, tmp_path, 90.0)["status"] == "skipped"
    payload = {"config": {"device": "cuda", "cutoff_len": 512},
               "datasets": {"alpaca-like": {"summary": {"neat_vs_unpacked": 1.5, "neat_vs_hf_padded": 4.0}},
                            "book-like": {"summary": {"neat_vs_unpacked": 1.4, "neat_vs_hf_padded": 3.5}}},
               "targets": [{"what": "x", "value": 1.5, "op": ">=", "target": 1.3, "met": True}]}
    seen = {}

    def bench(cmd, **kwargs):  # stands in for bench/packing.py: writes packing.json where BENCH_RESULTS says
        seen["cmd"], seen["env"] = cmd, kwargs["env"]
        Path(kwargs["env"]["BENCH_RESULTS"], "packing.json").write_text(json.dumps(payload))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    (tmp_path / "out").mkdir()
    monkeypatch.setattr(gpu_check.subprocess, "run", bench)
    got = gpu_check.run_peers(args, tmp_path, 400.0)
    assert got["status"] == "ok" and got["device"] == "cuda" and got["targets"] == payload["targets"]
    assert got["ratios"]["book-like"]["neat_vs_hf_padded"] == 3.5
    assert seen["env"]["BENCH_RESULTS"] == str((tmp_path / "out").resolve())


def test_every_preset_run_has_a_tokenizer(tmp_path):
    """A Llama / Qwen preset has no vocabulary: the check's recipes name one, or their train would exit 2."""
    from pipeline.data.model_tokenizer import recipe_tokenizer
    from pipeline.model.config import PRESETS
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    work = tmp_path / "work"
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path / "g.json"), "--workdir", str(work)]) == 0
    recipes = sorted((work / "recipes").glob("*.yaml"))
    if "qwen3-0.6b" in PRESETS:
        assert any(p.stem.startswith("qwen3-0.6b-fp16") for p in recipes)
    for path in recipes:
        r = resolve(path, [], command="plan", env={"WORLD_SIZE": "1"})
        assert recipe_tokenizer(data_args(r)).n_vocab <= PRESETS[r["model_name_or_path"]].vocab_size


def test_script_arguments_and_setup_command(tmp_path):
    run = lambda *a, **env: subprocess.run(["bash", str(SCRIPT), *a], cwd=REPO, env=_env(**env),  # noqa: E731
                                           capture_output=True, text=True, timeout=120)
    assert run("--help").returncode == 0
    bad = run("--bogus")
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
    assert run("--cuda", "rocm").returncode == 2
    no_gpu = run(PATH="/usr/bin:/bin")  # no nvidia-smi here
    assert no_gpu.returncode == 2 and "nvidia-smi not found" in no_gpu.stderr
    stub = tmp_path / "make"
    stub.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/make-args\n')
    stub.chmod(0o755)
    out = tmp_path / "g.json"
    done = run("--out", str(out), "--cuda", "cu126", "--", "--dry-run", "--workdir", str(tmp_path / "w"),
               GPU_CHECK_ASSUME_GPU="1", GPU_CHECK_MAKE=str(stub), GPU_CHECK_PYTHON=sys.executable)
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "make-args").read_text()
    assert args.startswith("setup TORCH=torch==") and "--index-url https://download.pytorch.org/whl/cu126" in args
    assert json.loads(out.read_text())["settings"]["budget_s"] > 60


def _wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (one module), built by hand: what --wheels installs."""
    import zipfile

    folder.mkdir(parents=True)
    path = folder / "gpucheck_probe-1.0-py3-none-any.whl"
    files = {"gpucheck_probe.py": "VALUE = 7\n",
             "gpucheck_probe-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: gpucheck-probe\nVersion: 1.0\n",
             "gpucheck_probe-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: hand\nRoot-Is-Purelib: true\n"
                                                   "Tag: py3-none-any\n"}
    files["gpucheck_probe-1.0.dist-info/RECORD"] = "".join(f"{name},,\n" for name in files) + \
        "gpucheck_probe-1.0.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return path


def test_script_offline_wheels(tmp_path):
    """--wheels: no make setup; the wheels go into a site folder that the check's python then imports from."""
    _wheel(tmp_path / "wheels")
    site = tmp_path / "site"
    stub = tmp_path / "make"
    stub.write_text(f'#!/bin/sh\necho called > {tmp_path}/make-called\n')
    stub.chmod(0o755)
    run = lambda *a, **env: subprocess.run(["bash", str(SCRIPT), *a], cwd=REPO, env=_env(  # noqa: E731
        GPU_CHECK_ASSUME_GPU="1", GPU_CHECK_MAKE=str(stub), GPU_CHECK_PYTHON=sys.executable, GPU_CHECK_SITE=str(site),
        **env), capture_output=True, text=True, timeout=120)
    missing = run("--wheels", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "--wheels" in missing.stderr and "no such folder" in missing.stderr
    no_ranks = run("--wheels", str(tmp_path / "wheels"), PIPELINE_GPT2_RANKS=str(tmp_path / "absent.tiktoken"))
    assert no_ranks.returncode == 2 and "no GPT-2 ranks" in no_ranks.stderr
    out = tmp_path / "g.json"
    done = run("--wheels", str(tmp_path / "wheels"), "--out", str(out), "--", "--dry-run", "--workdir",
               str(tmp_path / "w"))
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "make-called").exists() and "no network" in done.stdout
    probe = subprocess.run([sys.executable, "-c", "import gpucheck_probe; print(gpucheck_probe.VALUE)"],
                           env=_env(PYTHONPATH=str(site)), capture_output=True, text=True, timeout=60)
    assert probe.stdout.strip() == "7"
    assert json.loads(out.read_text())["runs"]


@pytest.mark.slow
def test_cpu_end_to_end_writes_one_json(tmp_path, monkeypatch, capsys):
    """The whole check on a CPU with a tiny model: runs, figures, merge verification, the JSON. The throughput run
    (the matrix's train_run at its own batch) is left out for the suite's time: its recipe is the dry run's test. The
    packing runs take 3 steps, too few to profile (2 warm-up, 2 timed): the profiled steps are the matrix run's, and
    profiling both packing runs cost 10 of this test's 54 CPU-seconds. One row a step and a cutoff of 64: the tiny
    model's 50k-token head in bf16 (emulated on a CPU without bf16 units) is most of a step, and the figures only
    need to exist (the matrix run's 1,131 tokens became 378; the unpacked run's 1,520 became 1,008 and, at one
    example a step for 3 steps, ~190). The check itself runs in this process (`python -m bench.gpu_check` starts in
    test_without_cuda_it_refuses_with_exit_2 and the script tests): its runs are subprocesses either way, and its
    own interpreter start-up (torch's import) was ~4 of the test's CPU-seconds."""
    out = tmp_path / "g.json"
    for key, value in _env().items():
        monkeypatch.setenv(key, value)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # what CUDA_VISIBLE_DEVICES="" gives a fresh process
    code = gpu_check.main(["--allow-cpu", "--models", "tiny", "--precisions", "bf16,fp16", "--zero", "2", "--steps", "6",
                           "--batch", "1", "--only", "tests,matrix,merge,packing", "--packing-batches", "1",
                           "--packing-steps", "3", "--cutoff", "64", "--out", str(out), "--workdir", str(tmp_path / "w")])
    printed = capsys.readouterr()
    assert code == 0, printed.err[-3000:] + printed.out[-3000:]
    result = json.loads(out.read_text())
    runs = {r["name"]: r for r in result["runs"]}
    ok = runs["tiny-bf16-zero2"]
    assert ok["status"] == "ok" and ok["tokens_per_s"] > 0 and ok["mfu"] is None  # no datasheet peak for a CPU
    # the model FLOPs a token (hand-checked in test_peak_table_and_model_flops_by_hand) times tokens/s, to 0.01
    # TFLOP/s: 0.0 for this model on a CPU that does under ~250 tokens/s (a busy one; `> 0` failed there)
    flops = ok["extra"]["model_flops_per_token"] * ok["tokens_per_s"] / 1e12
    assert flops > 0 and ok["extra"]["achieved_tflops"] == pytest.approx(flops, abs=0.005 + 1e-9)
    assert ok["loss_first"] is not None
    assert 0 < ok["extra"]["loop_s"] < ok["seconds"] and ok["extra"]["outside_loop_s"] > 0  # the loop and the rest
    assert runs["tiny-fp16-zero2"]["status"] == "skipped"
    profile = ok["extra"]["profile"]  # the last steps, 5-6, under torch.profiler; tokens/s from steps 3-4 only
    assert profile["steps"] == [5, 6] and profile["wall_ms_per_step"] > 0 and profile["top_cpu"]
    assert len(ok["extra"]["timed_tokens_per_s"]) == 2 and ok["tokens_per_s"] > 0
    assert profile["device_busy_share"] is None  # no GPU
    assert profile["host_syncs_per_step"] is None and "aten::_local_scalar_dense" in profile["syncing_ops_per_step"]
    assert "tiny-bf16-zero2-b64" not in runs  # --only: no throughput run
    merge = result["merge"][0]
    assert merge["status"] == "ok" and merge["verification"] is not None
    tests = result["tests"]  # the CUDA-only tests ran, and skip themselves here, saying why
    assert tests["status"] == "ok" and "skipped" in tests["summary"] and tests["file"] == gpu_check.CUDA_TESTS
    assert tests["skipped"] and all("needs a CUDA GPU" in line for line in tests["skipped"])
    packing = result["packing"][0]  # ours unpacked against ours neat-packed, at about the same tokens a step
    assert packing["unpacked_tokens_per_s"] > 0 and packing["neat_tokens_per_s"] > 0 and packing["ratio"] > 0
    assert runs[packing["unpacked"]]["status"] == runs[packing["neat"]]["status"] == "ok"
    assert runs[packing["unpacked"]]["mfu"] is None and "model_flops_per_token" not in runs[packing["neat"]]["extra"]
    assert "profile" not in runs[packing["neat"]]["extra"]  # 3 steps: nothing left to time after a profile


def test_wheels_script_usage():
    """bench/gpu_wheels.sh (the folder --wheels takes): its mistakes exit 2 before anything is downloaded."""
    run = lambda *a: subprocess.run(["bash", str(REPO / "bench" / "gpu_wheels.sh"), *a], cwd=REPO, env=_env(),  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    assert run("--help").returncode == 0 and "--python" in run("--help").stdout and "--qlora" in run("--help").stdout
    for argv, message in [((), "name the folder"), (("a", "b"), "one folder only"), (("--bogus",), "unknown argument"),
                          (("w", "--python", "twelve"), "expected a version such as 3.12"), (("w", "--python"), "needs")]:
        proc = run(*argv)
        assert proc.returncode == 2 and message in proc.stderr, (argv, proc.stderr)
