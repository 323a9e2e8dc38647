"""The data commands end to end on real recipes: build, validate, inspect; bad rows exit 2 without a traceback.

Each command runs as typed here at least once; further builds and validates run main(argv) in this process
(cli(..., as_typed=False), or main() directly where a test reads the process's own state)."""
from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any


from data_helpers import alpaca_rows, jsonl
from pipeline.__main__ import main
from tests.acceptance.harness import cli_env, pipeline


def project(tmp_path: Path, registry: dict, files: dict[str, str], recipe: str) -> Path:
    for name, text in files.items():
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_text(text, encoding="utf-8")
    (tmp_path / "data" / "dataset_info.json").write_text(json.dumps(registry, indent=2), encoding="utf-8")
    (tmp_path / "recipe.yaml").write_text("model_name_or_path: tiny\ndataset_dir: data\nnum_train_epochs: 1\n"
                                          + recipe, encoding="utf-8")
    return tmp_path / "recipe.yaml"


def cli(tmp_path: Path, *args: str, as_typed: bool = True) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in tmp_path from a user's shell (no launcher variables, NO_COLOR), any exit code;
    as_typed=False: in this process (harness.pipeline)."""
    return pipeline(*args, cwd=tmp_path, expect=None, timeout=120, env=cli_env(NO_COLOR="1"), as_typed=as_typed)


def count_built_reads(monkeypatch: Any, root: Path) -> Counter:
    """Path.read_bytes calls on the built files under root/data/build, per file, from here on, the process's
    tokenized splits forgotten (as a fresh `python -m pipeline inspect` starts; validate here filled them)."""
    from collections import OrderedDict

    from pipeline.data import tokenize

    monkeypatch.setattr(tokenize, "_cache", OrderedDict())
    reads: Counter = Counter()
    read_bytes = Path.read_bytes

    def counted(path: Path) -> bytes:
        if Path(path).resolve().is_relative_to((root / "data" / "build").resolve()):
            reads[Path(path).resolve().relative_to(root.resolve()).as_posix()] += 1
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", counted)
    return reads


def test_bad_rows_exit_2_with_every_message(tmp_path):
    rows = jsonl(alpaca_rows(5)) + '{"instruction": "x", "output": 3}\n{oops\n'
    project(tmp_path, {"a": {"file_name": "raw/a.jsonl"}}, {"raw/a.jsonl": rows}, "dataset: a\n")
    done = cli(tmp_path, "build", "recipe.yaml")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        "error: data/raw/a.jsonl:6: 'output' is a number (3); expected a string",
        "error: data/raw/a.jsonl:7: invalid JSON at column 2: Expecting property name enclosed in double quotes",
    ]
    assert not (tmp_path / "data" / "build").exists()
    done = cli(tmp_path, "validate", "recipe.yaml")
    assert done.returncode == 2 and "is not built; run `python -m pipeline build recipe.yaml`" in done.stderr
    assert "Traceback" not in done.stderr


def test_sharegpt_and_csv_recipe_builds_validates_inspects(tmp_path, monkeypatch, capsys):
    conv = [{"conversations": [{"from": "human", "value": f"Hello {i}?"}, {"from": "gpt", "value": f"Hi {i}."}]}
            for i in range(12)]
    csv = "question,answer\n" + "".join(f"What is {i}+{i}?,{2 * i}\n" for i in range(12))
    registry = {"chat": {"file_name": "raw/chat.json", "formatting": "sharegpt"},
                "sums": {"file_name": "raw/sums.csv", "columns": {"prompt": "question", "response": "answer"}}}
    project(tmp_path, registry, {"raw/chat.json": json.dumps(conv), "raw/sums.csv": csv},
            "dataset: chat, sums\ncutoff_len: 64\ntemplate: default\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["build", "recipe.yaml"]) == 0
    out = capsys.readouterr().out
    assert "chat: built data/build/chat (sft, 1 source)" in out and "sums: built data/build/sums" in out
    assert main(["build", "recipe.yaml"]) == 0
    assert capsys.readouterr().out.count("up to date") == 2
    assert main(["validate", "recipe.yaml"]) == 0
    out = capsys.readouterr().out
    assert "data: OK" in out and "chat" in out and "sums" in out
    reads = count_built_reads(monkeypatch, tmp_path)
    assert main(["inspect", "recipe.yaml", "--num", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("── sample") == 2
    # one of each dataset, in the recipe's order: the first two rows of the split are chat's (both from chat before)
    samples = [line for line in out.splitlines() if line.startswith("── sample")]
    assert "raw/chat.json:" in samples[0] and "(dataset 'chat')" in samples[0], samples
    assert "raw/sums.csv:" in samples[1] and "(dataset 'sums')" in samples[1], samples
    assert reads == {f"data/build/{name}/{split}.json": 1 for name in ("chat", "sums") for split in ("train", "val")}
    assert "\nAssistant:[[" in out and "<|endoftext|>\n]]" in out
    assert "train: 20 rows -> 20 examples · dropped 0" in out
    png = tmp_path / "data" / "build" / "token_lengths-chat+sums.png"
    assert f"histogram: {png.relative_to(tmp_path)}" in out and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inspect_counts_the_length_policy(tmp_path, monkeypatch, capsys):
    rows = alpaca_rows(20) + [{"instruction": "long", "input": "", "output": "word " * 100}]
    project(tmp_path, {"a": {"file_name": "raw/a.jsonl"}}, {"raw/a.jsonl": jsonl(rows)},
            "dataset: a\ncutoff_len: 60\noverlength_policy: truncate\nval_size: 0.05\n")
    monkeypatch.chdir(tmp_path)
    assert main(["build", "recipe.yaml"]) == 0
    capsys.readouterr()
    assert main(["inspect", "recipe.yaml", "--num", "0"]) == 0
    out = capsys.readouterr().out
    split = "train" if '"long"' in (tmp_path / "data/build/a/train.json").read_text() else "val"
    line = next(x for x in out.splitlines() if x.startswith(f"{split}:"))
    assert "truncated 1" in line and "dropped 0" in line
    assert out.split(f"{split}:", 1)[1].splitlines()[1] == "  truncated: data/raw/a.jsonl:21 (dataset 'a')"  # the raw row
    assert main(["inspect", "recipe.yaml", "overlength_policy=error"]) == 2
    err = capsys.readouterr().err
    assert "tokens, over cutoff_len 60" in err and "overlength_policy: error" in err


def test_validate_says_how_many_training_rows_the_default_drop_leaves_out(tmp_path, monkeypatch, capsys):
    """A LLaMA-Factory recipe's rows past cutoff_len are cut there and left out here (overlength_policy: drop): the
    only sign was the >cutoff column (alpaca_en_demo at cutoff_len 256: 251 of 967 rows). Now one note with the fix;
    none under truncate."""
    rows = alpaca_rows(20) + [{"instruction": f"long {i}", "input": "", "output": "word " * 100} for i in range(3)]
    project(tmp_path, {"a": {"file_name": "raw/a.jsonl"}}, {"raw/a.jsonl": jsonl(rows)},
            "dataset: a\ncutoff_len: 60\nval_size: 0\n")
    monkeypatch.chdir(tmp_path)
    assert main(["build", "recipe.yaml"]) == 0
    capsys.readouterr()
    assert main(["validate", "recipe.yaml"]) == 0
    notes = [x for x in capsys.readouterr().out.splitlines() if x.startswith("note: ")]
    assert notes == ["note: 3 of the 23 training rows are longer than cutoff_len 60 and are left out (overlength_policy: "
                     "drop, the default here; LLaMA-Factory cuts them instead): set overlength_policy: truncate to keep "
                     "them with their responses cut, or raise cutoff_len"], notes
    assert main(["validate", "recipe.yaml", "overlength_policy=truncate"]) == 0
    assert "note: " not in capsys.readouterr().out
    # the 23 built rows fill a step of 21 micro-batches, the 20 left after the drop do not: validate said "data: OK"
    # and train stopped (LLaMA-Factory's dpo / kto examples at a small max_samples); now validate says train's words
    refused = cli(tmp_path, "validate", "recipe.yaml", "per_device_train_batch_size=1", "gradient_accumulation_steps=21")
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr.splitlines()[-1] == (
        "error: command line override gradient_accumulation_steps=21: gradient_accumulation_steps: no optimizer step "
        "fits: the train split gives 20 micro-batches per rank per epoch and gradient_accumulation_steps is 21; lower "
        "gradient_accumulation_steps or per_device_train_batch_size, or add data; 3 of the 23 training rows are longer "
        "than cutoff_len 60 and are left out (overlength_policy: drop, the default here; LLaMA-Factory cuts them "
        "instead): set overlength_policy: truncate to keep them with their responses cut, or raise cutoff_len"
    ), refused.stderr  # the cause, the drop, is said with its fix: "add data" alone hid it
    # under a launcher's WORLD_SIZE=2 (as train is run), the 20 rows give 10 micro-batches per rank: the message
    # said 20 (one rank's loader), more than the 11 it said did not fit
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["validate", "recipe.yaml", "per_device_train_batch_size=1", "gradient_accumulation_steps=11"]) == 2
    assert "the train split gives 10 micro-batches per rank per epoch and gradient_accumulation_steps is 11; " in \
        capsys.readouterr().err


def test_pt_recipe(tmp_path, monkeypatch, capsys):
    text = " ".join(f"w{i}" for i in range(400))
    project(tmp_path, {"book": {"file_name": "raw/book.txt", "formatting": "text"}}, {"raw/book.txt": text},
            "dataset: book\nstage: pt\ncutoff_len: 32\npt_stride: 16\n")
    monkeypatch.chdir(tmp_path)
    assert main(["build", "recipe.yaml"]) == 0
    assert "(within documents)" in capsys.readouterr().out
    assert main(["validate", "recipe.yaml"]) == 0
    capsys.readouterr()
    reads = count_built_reads(monkeypatch, tmp_path)
    assert main(["inspect", "recipe.yaml", "--num", "1"]) == 0
    out = capsys.readouterr().out
    assert "── window 1" in out and "stride 16" in out
    assert reads == {"data/build/book/train.json": 1, "data/build/book/val.json": 1}  # the windows and the documents
    assert sum(1 for x in out.splitlines() if x.startswith(("train:", "val:")) and "windows" in x) == 2


def test_a_raw_file_edited_after_build_stops_train_unless_overwrite_cache(tmp_path):
    """A source edited after `build`: train exits 2 naming the file and both ways out; with overwrite_cache=true
    (LLaMA-Factory's key) it rebuilds the dataset itself and trains on the new rows."""
    import hashlib

    project(tmp_path, {"a": {"file_name": "raw/a.jsonl"}}, {"raw/a.jsonl": jsonl(alpaca_rows(12))},
            "dataset: a\ncutoff_len: 64\nmax_steps: 1\nper_device_train_batch_size: 2\noutput_dir: out\n"
            "lora_rank: 2\nplot_loss: false\n")
    assert cli(tmp_path, "build", "recipe.yaml", as_typed=False).returncode == 0
    raw = tmp_path / "data" / "raw" / "a.jsonl"
    raw.write_text(jsonl(alpaca_rows(16)), encoding="utf-8")  # four rows added after the build
    stopped = cli(tmp_path, "train", "recipe.yaml")
    assert stopped.returncode == 2 and "Traceback" not in stopped.stderr
    assert "data/raw/a.jsonl was edited since the build" in stopped.stderr
    assert "run `python -m pipeline build recipe.yaml`" in stopped.stderr and "overwrite_cache: true" in stopped.stderr
    assert not (tmp_path / "out" / "adapter").exists()

    done = cli(tmp_path, "train", "recipe.yaml", "overwrite_cache=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a: built data/build/a" in done.stdout
    manifest = json.loads((tmp_path / "data" / "build" / "a" / "manifest.json").read_text())
    assert manifest["sources"][0]["sha256"] == hashlib.sha256(raw.read_bytes()).hexdigest()
    assert sum(manifest["splits"].values()) == 16
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    # a current build is used as it is, also when asked to overwrite the cache
    again = cli(tmp_path, "eval", "recipe.yaml", "overwrite_cache=true", "max_eval_samples=1", "max_new_tokens=2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "a: up to date" in again.stdout


def test_adding_rows_after_a_too_small_build_rebuilds(tmp_path):
    """The batch-size message says "add data"; a user who does so and runs `build` again (or `make data`, which
    calls `deps` first, or train with overwrite_cache=true) must get the rebuild: the old build's counts are what
    is being replaced."""
    raw = tmp_path / "data" / "raw" / "a.jsonl"
    project(tmp_path, {"a": {"file_name": "raw/a.jsonl"}}, {"raw/a.jsonl": jsonl(alpaca_rows(3))},
            "dataset: a\ncutoff_len: 64\nmax_steps: 1\noutput_dir: out\nlora_rank: 2\nplot_loss: false\n")
    assert cli(tmp_path, "build", "recipe.yaml").returncode == 0
    done = cli(tmp_path, "validate", "recipe.yaml", as_typed=False)
    assert done.returncode == 2 and "lower per_device_train_batch_size or add data" in done.stderr, done.stderr
    raw.write_text(jsonl(alpaca_rows(30)), encoding="utf-8")
    done = cli(tmp_path, "deps", "recipe.yaml")
    assert done.returncode == 0, done.stderr
    done = cli(tmp_path, "build", "recipe.yaml", as_typed=False)
    assert done.returncode == 0, done.stderr
    assert "train 27 · val 3" in done.stdout                    # 30 rows, val_size 0.1 -> ceil(3) held out
    assert cli(tmp_path, "validate", "recipe.yaml").returncode == 0

    raw.write_text(jsonl(alpaca_rows(3)), encoding="utf-8")      # too small again, then grown: train rebuilds
    assert cli(tmp_path, "build", "recipe.yaml", as_typed=False).returncode == 0
    raw.write_text(jsonl(alpaca_rows(30)), encoding="utf-8")
    done = cli(tmp_path, "train", "recipe.yaml", "overwrite_cache=true")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "a: built data/build/a" in done.stdout and (tmp_path / "out" / "adapter").is_dir()


def test_train_with_overwrite_cache_checks_the_rebuilt_counts_before_the_model_loads(tmp_path):
    """train with overwrite_cache rebuilds first, so the recipe's checks skipped the counts on disk (about to be
    replaced); a rebuilt split too small for the batch was only found by the trainer, after the model loaded. The
    recipe is now resolved again after the build: the recipe check's message, and no run files written."""
    raw = tmp_path / "data" / "raw" / "a.jsonl"
    project(tmp_path, {"a": {"file_name": "raw/a.jsonl"}}, {"raw/a.jsonl": jsonl(alpaca_rows(30))},
            "dataset: a\ncutoff_len: 64\nmax_steps: 1\nper_device_train_batch_size: 8\noutput_dir: out\n"
            "lora_rank: 2\nplot_loss: false\n")
    assert cli(tmp_path, "build", "recipe.yaml", as_typed=False).returncode == 0
    raw.write_text(jsonl(alpaca_rows(5)), encoding="utf-8")     # the source shrank below one batch
    done = cli(tmp_path, "train", "recipe.yaml", "overwrite_cache=true")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "a: built data/build/a" in done.stdout
    assert "lower per_device_train_batch_size or add data" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
