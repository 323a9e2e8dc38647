"""`make all` end to end, as a newcomer runs it: the demo chain on the `tiny` preset and a few dozen rows.

The Makefile, the pipeline and the bundled data are used as shipped, in a scratch copy of the repo (so
the test writes nothing into the working tree); only the two recipes are small versions of
demo_pt.yaml / demo_sft.yaml. It asserts that every stage left well-formed files, that the pt recipe
was trained first because the sft recipe starts from its output, that the tuned model's held-out loss
is below its base's, and that a second `make all` finds nothing stale.

Micro-batches of 4 rows: the same steps and checks as with 8, at half the tokens through the tiny model's
50k-token head, which is most of the chain's time. The pt recipe's full fine-tuning is the costliest stage: 10 steps
at 1.2e-2 (20 at 6e-3 before, 40 at 3e-3 before that), and every check holds (held-out losses: pt 5.32, was 5.01
after 20 and 4.75 after 40; sft's base 5.66 -> tuned 4.85 in 30 steps, was 5.39 -> 4.72).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.acceptance import harness

pytestmark = pytest.mark.slow  # the whole demo chain in a scratch repo: minutes (still run by CI)

REPO = Path(__file__).resolve().parents[1]

PT_RECIPE = """\
model_name_or_path: tiny
stage: pt
finetuning_type: full
dataset: demo_corpus
max_samples: 200
cutoff_len: 64
per_device_train_batch_size: 4
learning_rate: 1.2e-2
max_steps: 10
bf16: false
logging_steps: 10
save_steps: 1000
output_dir: saves/e2e_pt
"""

SFT_RECIPE = """\
model_name_or_path: saves/e2e_pt/model
stage: sft
finetuning_type: lora
lora_rank: 16
lora_target: all
additional_target: [ln_f]
dataset: [demo_alpaca, demo_sharegpt, demo_csv]
max_samples: 40
eval_dataset: demo_test
template: alpaca
cutoff_len: 64
per_device_train_batch_size: 4
learning_rate: 1.0e-2
max_steps: 30
warmup_steps: 1
bf16: false
logging_steps: 10
save_steps: 1000
output_dir: saves/e2e_sft
max_eval_samples: 12
per_device_eval_batch_size: 12
max_new_tokens: 4
"""


@pytest.fixture(scope="module")
def scratch_repo(tmp_path_factory) -> Path:
    """The repo's Makefile, code and data; a `VENV` whose python is the one running the tests."""
    root = harness.scratch_repo(tmp_path_factory.mktemp("repo"))
    shutil.copytree(REPO / "datasets", root / "datasets", ignore=shutil.ignore_patterns("build"))
    (root / "recipes").mkdir()
    (root / "recipes" / "e2e_pt.yaml").write_text(PT_RECIPE, encoding="utf-8")
    (root / "recipes" / "e2e_sft.yaml").write_text(SFT_RECIPE, encoding="utf-8")
    return root


def _make_all(root: Path) -> subprocess.CompletedProcess:
    # a fresh shell: no make recursion flags, and no launch variables left by in-process tests (their
    # MASTER_PORT may still be held by this process's process group)
    dropped = {"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
               "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    return subprocess.run(["make", "all", "RECIPE=recipes/e2e_sft.yaml", f"VENV={root / 'venv'}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def first_run(scratch_repo) -> subprocess.CompletedProcess:
    return _make_all(scratch_repo)


def _json(path: Path) -> dict:
    assert path.is_file(), path
    return json.loads(path.read_text(encoding="utf-8"))


def _jsonl(path: Path) -> list[dict]:
    assert path.is_file(), path
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _safetensors_names(path: Path) -> list[str]:
    from safetensors import safe_open

    assert path.is_file(), path
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def test_make_all_succeeds_and_ends_with_the_report(first_run, scratch_repo):
    assert first_run.returncode == 0, first_run.stdout[-3000:] + first_run.stderr[-3000:]
    assert first_run.stdout.rstrip().endswith("report: saves/e2e_sft/eval/report.md")
    commands = [line for line in first_run.stdout.splitlines() if " -m pipeline " in line]
    stages = [tuple(line.split(" -m pipeline ")[1].split()[:2]) for line in commands]
    stages = [(command, Path(recipe).stem) for command, recipe in stages]
    # the upstream recipe is built, validated and trained before the sft recipe's own stages
    assert stages == [("build", "e2e_sft"), ("validate", "e2e_sft"),
                      ("build", "e2e_pt"), ("validate", "e2e_pt"), ("train", "e2e_pt"),
                      ("train", "e2e_sft"), ("merge", "e2e_sft"), ("eval", "e2e_sft")]
    # the sft recipe's one-step warmup is said once, by train (pipeline.train.run, of its steps), not by every stage
    # (validate, merge and eval said it too)
    warmup = [line for line in first_run.stderr.splitlines() if line.startswith("notice:") and "warmup" in line]
    assert warmup == ["notice: recipes/e2e_sft.yaml:15:15: warmup_steps 1 of 30 steps: step 1 trains at lr 0 and the "
                      "warmup is that one step, which trains nothing (a linear warmup starts at lr 0, as "
                      "transformers' does); set warmup_steps: 0 or more steps"], first_run.stderr[-3000:]


def test_data_stage_files(first_run, scratch_repo):
    build = scratch_repo / "datasets" / "build"
    for name, rows in (("demo_alpaca", 40), ("demo_sharegpt", 40), ("demo_csv", 40), ("demo_test", 40)):
        manifest = _json(build / name / "manifest.json")
        train = json.loads((build / name / "train.json").read_text(encoding="utf-8"))
        assert len(train) == manifest["splits"]["train"] <= rows
        assert all(set(r) >= {"instruction", "input", "output"} and r["output"] for r in train)
    corpus = json.loads((build / "demo_corpus" / "train.json").read_text(encoding="utf-8"))
    assert 0 < len(corpus) <= 200 and all(r["text"] for r in corpus)


def test_pt_stage_files(first_run, scratch_repo):
    out = scratch_repo / "saves" / "e2e_pt"
    config = _json(out / "model" / "config.json")
    assert config["n_layers"] == 2 and config["emb_dim"] == 64 and config["vocab_size"] == 50257
    assert {"embed_tokens.weight", "layers.1.mlp.up_proj.weight"} <= set(_safetensors_names(out / "model" / "model.safetensors"))
    results = _json(out / "all_results.json")
    assert results["global_step"] == 10 and results["eval_loss"] < 7.0  # from ln(50257) = 10.8


def test_sft_stage_files(first_run, scratch_repo):
    out = scratch_repo / "saves" / "e2e_sft"
    log = _jsonl(out / "trainer_log.jsonl")
    assert [e["step"] for e in log if "loss" in e] == [10, 20, 30]
    assert _json(out / "all_results.json")["global_step"] == 30
    adapter = _json(out / "adapter" / "adapter_config.json")
    assert adapter["r"] == 16 and adapter["peft_type"] == "LORA"
    names = _safetensors_names(out / "adapter" / "adapter_model.safetensors")
    # 2 blocks x 4 Linears (c_attn, attn c_proj, c_fc, mlp c_proj) x (A, B), and ln_f trained in full
    assert sum("lora_A" in n for n in names) == sum("lora_B" in n for n in names) == 8
    assert sorted(n for n in names if "lora_" not in n) == ["base_model.model.transformer.ln_f.bias",
                                                           "base_model.model.transformer.ln_f.weight"]
    merged = _safetensors_names(out / "merged" / "model.safetensors")
    assert "transformer.h.0.attn.c_attn.weight" in merged and not any("lora" in n for n in merged)
    assert _json(out / "merged" / "config.json")["model_type"] == "gpt2"
    assert (out / "training_loss.png").stat().st_size > 1000


def test_eval_tuned_loss_below_base(first_run, scratch_repo):
    eval_dir = scratch_repo / "saves" / "e2e_sft" / "eval"
    metrics = _json(eval_dir / "metrics.json")
    base, tuned = metrics["results"]["base"], metrics["results"]["tuned"]
    assert base["n"] == tuned["n"] == 12
    assert tuned["loss"] < base["loss"] - 0.5, (base["loss"], tuned["loss"])  # measured: 5.66 -> 4.85
    assert len(_jsonl(eval_dir / "predictions.jsonl")) == 12
    report = (eval_dir / "report.md").read_text(encoding="utf-8")
    assert "exact_match" in report.replace(" ", "_").lower() or "exact match" in report.lower()
    for plot in ("metrics.png", "loss_curves.png"):
        assert (eval_dir / plot).stat().st_size > 1000


def test_second_make_all_finds_nothing_stale(first_run, scratch_repo):
    again = _make_all(scratch_repo)
    assert again.returncode == 0, again.stderr[-3000:]
    assert " -m pipeline " not in again.stdout, again.stdout


def test_a_recipe_name_with_a_space_is_one_clear_line():
    """make splits such a name into two targets and would stop on a riddle; the Makefile says what to do instead."""
    proc = subprocess.run(["make", "-n", "train", "RECIPE=my recipe.yaml"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert "RECIPE='my recipe.yaml': make cannot handle a file name with a space" in proc.stderr
    assert "python -m pipeline <stage> 'my recipe.yaml'" in proc.stderr


def test_the_readmes_transformers_lines_prompt_the_merged_model(first_run, scratch_repo):
    """README: the merged model is a plain GPT-2 folder whose tokenizer's chat template is the recipe's. Its lines
    run here on the scratch run's merged/ (the README names the demo's), and the prompt is alpaca's, by hand."""
    transformers = pytest.importorskip("transformers")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    question = "Which word is an animal?\nhill\nbell\nhen"
    assert 'tok = AutoTokenizer.from_pretrained("saves/demo_sft/merged")' in readme
    assert ('ids = tok.apply_chat_template([{"role": "user", "content": "Which word is an animal?'
            '\\nhill\\nbell\\nhen"}],') \
        in readme and "add_generation_prompt=True, return_tensors=\"pt\", return_dict=True)" in readme
    merged = scratch_repo / "saves" / "e2e_sft" / "merged"
    tok = transformers.AutoTokenizer.from_pretrained(merged)
    model = transformers.GPT2LMHeadModel.from_pretrained(merged)
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    assert tok.decode(ids["input_ids"][0]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        f"\n\n### Instruction:\n{question}\n\n### Response:\n")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # the README's block as written (it ended at `ids = ...`, the answer left to the reader), on this run's merged/:
    # it prints the greedy answer, without a warning from generate
    import contextlib
    import io
    import re
    import warnings

    (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", readme, flags=re.S | re.M) if "apply_chat_template" in b]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(compile(block.replace("saves/demo_sft/merged", str(merged)), "README.md", "exec"), {})  # noqa: S102
    answer = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    assert printed.getvalue() == tok.decode(answer[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) + "\n"
