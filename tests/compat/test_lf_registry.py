"""LLaMA-Factory's dataset_info.json as users copy it: every entry form, through `python -m pipeline build`.

The registry (tests/compat/lf_data/dataset_info.json) is our own file with every entry form LLaMA-Factory's
data/README.md documents. Entries a recipe does not use never block; the entries it uses are checked
strictly, and what cannot be done here is refused with its reason (exit 2, file:line).

build runs as typed for a success, a refusal and the hub entries (huggingface_hub reads HF_HUB_CACHE when it is
imported); the further local builds run main(argv) in this process (as_typed=False: the same code and messages).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.acceptance.harness import cli_env, pipeline
from tests.compat.conftest import jsonl, write_hub_dataset

ROOT = Path(__file__).resolve().parents[2]


def recipe(workdir: Path, **keys) -> Path:
    """A minimal recipe in LLaMA-Factory's key names (no dataset_dir: LLaMA-Factory's data/ is found)."""
    values = {"model_name_or_path": "tiny", "stage": "sft", "template": "alpaca", "max_steps": 1, **keys}
    path = workdir / "r.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()), encoding="utf-8")
    return path


def built(workdir: Path, name: str) -> list[dict]:
    base = workdir / "data" / "build" / name
    return [row for split in ("train", "val") for row in json.loads((base / f"{split}.json").read_text("utf-8"))]


def test_alpaca_en_demo_builds_from_the_whole_registry(lf_workdir):
    done = pipeline("build", recipe(lf_workdir, dataset="identity,alpaca_en_demo"), cwd=lf_workdir)
    assert "note:" not in done.stdout + done.stderr  # every entry form is understood: nothing to report
    rows = built(lf_workdir, "alpaca_en_demo")
    source = json.loads((lf_workdir / "data" / "alpaca_en_demo.json").read_text("utf-8"))
    assert sorted(r["instruction"] for r in rows) == sorted(r["instruction"] for r in source)
    assert len(built(lf_workdir, "identity")) == 8


def test_other_sft_forms_build(lf_workdir):
    pipeline("build", recipe(lf_workdir, dataset="openai_demo,sharegpt_demo,alpaca_columns_demo,identity_sampled"),
             cwd=lf_workdir, as_typed=False)
    openai = built(lf_workdir, "openai_demo")
    assert {r["system"] for r in openai} == {"You answer in one word."}
    assert {r["output"] for r in openai} == {"green", "blue", "white", "black", "yellow", "red"}
    share = built(lf_workdir, "sharegpt_demo")
    assert all(r["instruction"] == "Now backwards." and len(r["history"]) == 1 for r in share)
    cols = built(lf_workdir, "alpaca_columns_demo")
    assert all(r["system"] == "Be exact." and r["history"] == [["Are you ready?", "Yes."]] for r in cols)
    assert len(built(lf_workdir, "identity_sampled")) == 4  # num_samples


def test_pretraining_entries_through_columns_prompt(lf_workdir):
    pipeline("build", recipe(lf_workdir, stage="pt", dataset="wiki_demo,c4_demo,corpus_folder"), cwd=lf_workdir,
             as_typed=False)
    wiki = built(lf_workdir, "wiki_demo")
    lines = (lf_workdir / "data" / "wiki_demo.txt").read_text("utf-8").splitlines()
    assert sorted(r["text"] for r in wiki) == sorted(lines)  # each line one document, as LLaMA-Factory reads .txt
    assert len(built(lf_workdir, "c4_demo")) == 10
    assert len(built(lf_workdir, "corpus_folder")) == 10  # a folder of .txt files


def test_a_broken_unused_entry_is_one_note_and_a_used_one_is_strict(lf_workdir):
    registry = lf_workdir / "data" / "dataset_info.json"
    text = registry.read_text("utf-8").replace('"file_name": "dpo_en_demo.json"', '"file_nme": "dpo_en_demo.json"')
    registry.write_text(text, "utf-8")
    done = pipeline("build", recipe(lf_workdir, dataset="alpaca_en_demo"), cwd=lf_workdir, as_typed=False)
    notes = [line for line in (done.stdout + done.stderr).splitlines() if "note:" in line]
    line = next(i for i, row in enumerate(text.splitlines(), 1) if '"dpo_en_demo"' in row)
    assert len(notes) == 1 and f"dpo_en_demo (line {line})" in notes[0]
    failed = pipeline("build", recipe(lf_workdir, dataset="dpo_en_demo"), cwd=lf_workdir, expect=2)
    assert f"dataset_info.json:{line + 1}: \"dpo_en_demo\": 'file_nme': unknown field (did you mean 'file_name'?)" \
        in failed.stderr
    assert "Traceback" not in failed.stderr


def test_used_entries_refused_with_their_reason(lf_workdir):
    expected = {
        "mllm_demo": "multimodal data (images) is not supported",
        "mllm_audio_demo": "multimodal data (audios) is not supported",
        "mllm_video_demo": "multimodal data (videos) is not supported",
        "kto_en_demo": "trains with stage: kto; rows labelled undesirable would be learned as good answers",
        "dpo_en_demo": "trains with stage: dpo, but the recipe's stage is sft",
        "dpo_alpaca_demo": "trains with stage: dpo, but the recipe's stage is sft",
        "deepctrl": "ModelScope downloads are not supported",
        "scripted": "dataset loading scripts are refused",
        "in_the_cloud": "S3/GCS downloads are not supported",
        "wiki_demo": "a .txt file holds lines of text",
    }
    failed = pipeline("build", recipe(lf_workdir, dataset=",".join(expected)), cwd=lf_workdir, expect=2,
                      as_typed=False)
    text = (lf_workdir / "data" / "dataset_info.json").read_text("utf-8").splitlines()
    for name, reason in expected.items():
        line = next(i for i, row in enumerate(text, 1) if f'"{name}"' in row)
        (hit,) = [m for m in failed.stderr.splitlines() if f'"{name}"' in m and reason in m]
        assert hit.startswith("error: data/dataset_info.json:")
        assert int(hit.split(".json:")[1].split(":")[0]) in range(line, line + 8)  # the entry's own line(s)
    assert not (lf_workdir / "data" / "build").exists()  # nothing half-written


def test_hub_entry_offline_from_the_cache_and_missing(lf_workdir, tmp_path):
    cache = tmp_path / "hf_cache"
    rows = [{"instruction": f"Say {w}.", "input": "", "output": w} for w in ("one", "two", "three", "four")]
    write_hub_dataset(cache, "llamafactory/alpaca_en", {"data/train-00000-of-00001.jsonl": jsonl(rows),
                                                        "data/test-00000-of-00001.jsonl": jsonl(rows[:1]),
                                                        "README.md": "---\nlicense: cc\n---\n# alpaca\n"})
    env = cli_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    pipeline("build", recipe(lf_workdir, dataset="alpaca_en"), cwd=lf_workdir, env=env)
    assert sorted(r["output"] for r in built(lf_workdir, "alpaca_en")) == ["four", "one", "three", "two"]
    recipe(lf_workdir, dataset="alpaca_zh")
    failed = pipeline("build", "r.yaml", "max_samples=3", cwd=lf_workdir, env=env, expect=2)
    assert "dataset 'llamafactory/alpaca_zh' is not in the Hugging Face cache" in failed.stderr
    # this recipe's build with its overrides, the download allowed (it said `python -m pipeline build RECIPE`)
    assert "HF_HUB_OFFLINE=1 forbids downloading it; on a machine with network run: " \
           "`HF_HUB_OFFLINE=0 python -m pipeline build r.yaml max_samples=3` (or: " \
           "hf download --repo-type dataset llamafactory/alpaca_zh)" in failed.stderr, failed.stderr


def test_hub_subset_split_and_readme_configs(lf_workdir, tmp_path):
    cache = tmp_path / "hf_cache"
    row = lambda p, r: {"content": p, "summary": r}  # noqa: E731
    write_hub_dataset(cache, "HasturOfficial/adgen", {
        "train.json": json.dumps([row(f"p{i}", f"r{i}") for i in range(5)]),
        "dev.json": json.dumps([row(f"v{i}", f"s{i}") for i in range(3)])})
    readme = "---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: english/part-*.jsonl\n---\n"
    convo = lambda i: {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}],  # noqa: E731
                       "chosen": {"from": "gpt", "value": "c"}, "rejected": {"from": "gpt", "value": "r"}}
    write_hub_dataset(cache, "llamafactory/DPO-En-Zh-20k", {"README.md": readme,
                                                            "english/part-0.jsonl": jsonl([convo(i) for i in range(3)]),
                                                            "chinese/part-0.jsonl": jsonl([convo(9)])})
    env = cli_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    pipeline("build", recipe(lf_workdir, dataset="adgen_train", eval_dataset="adgen_eval"), cwd=lf_workdir, env=env)
    assert sorted(r["instruction"] for r in built(lf_workdir, "adgen_train")) == [f"p{i}" for i in range(5)]
    assert sorted(r["instruction"] for r in built(lf_workdir, "adgen_eval")) == ["v0", "v1", "v2"]
    from pipeline.data.hub import read_configs, select

    snapshot = next((cache / "datasets--llamafactory--DPO-En-Zh-20k" / "snapshots").iterdir())
    paths = ["chinese/part-0.jsonl", "english/part-0.jsonl"]
    assert select(paths, read_configs(snapshot), {"subset": "en"}) == ["english/part-0.jsonl"]
    assert select(paths, [], {"subset": "chinese"}) == ["chinese/part-0.jsonl"]
    assert select(["python/a.parquet", "go/b.parquet"], [], {"folder": "python"}) == ["python/a.parquet"]
    assert select(["data/train-0.parquet", "data/test-0.parquet"], [], {"split": "test"}) == ["data/test-0.parquet"]


def test_the_download_command_the_messages_name_is_installed():
    """The messages named `huggingface-cli download` / `huggingface-cli login`, which huggingface_hub 1.0 removed
    (the pinned version installs only `hf`): the command users were told to run did not exist."""
    import subprocess
    import sys

    hf = Path(sys.executable).parent / "hf"
    for argv, option in ((["download", "--help"], "--repo-type"), (["auth", "login", "--help"], "--token")):
        shown = subprocess.run([str(hf), *argv], capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0 and option in shown.stdout, shown.stdout + shown.stderr
    sources = "".join(p.read_text("utf-8") for p in (Path(__file__).parents[2] / "pipeline").rglob("*.py"))
    assert "huggingface-cli" not in sources


def test_lf_data_copied_beside_our_datasets_folder_gets_the_dataset_dir_fix(lf_workdir):
    """docs/coming-from-llama-factory.md, step 1: LLaMA-Factory's data/ copied into this repository, whose datasets/
    holds the demo's registry. Unset, dataset_dir stays datasets/ there, so the name is unknown: the message says
    that data/ registers it and which line to add, and the line makes the same command work."""
    (lf_workdir / "datasets").mkdir()
    shutil.copy(ROOT / "datasets" / "dataset_info.json", lf_workdir / "datasets" / "dataset_info.json")
    recipe(lf_workdir, dataset="identity")
    failed = pipeline("validate", "r.yaml", cwd=lf_workdir, expect=2)
    assert failed.stderr == (
        "error: r.yaml:5:10: dataset: dataset 'identity' is not in datasets/dataset_info.json; known: "
        f"{', '.join(sorted(json.loads((ROOT / 'datasets/dataset_info.json').read_text('utf-8'))))}; "
        "data/dataset_info.json (LLaMA-Factory's data/ folder) has it: add `dataset_dir: data` to the recipe\n")
    assert not (lf_workdir / "data" / "build").exists() and not (lf_workdir / "datasets" / "build").exists()
    # LLaMA-Factory's train_lora/qwen3_lora_sft.yaml names two: one message, not the list and the fix once per name
    both = pipeline("validate", recipe(lf_workdir, dataset="identity,alpaca_en_demo"), cwd=lf_workdir, expect=2,
                    as_typed=False)
    (line,) = [x for x in both.stderr.splitlines() if "dataset_info.json" in x]
    assert line.startswith("error: ") and ("r.yaml:5:10: dataset: datasets 'identity', 'alpaca_en_demo' are not in "
                                            "datasets/dataset_info.json; known: ") in line and line.endswith(
        "data/dataset_info.json (LLaMA-Factory's data/ folder) has them: add `dataset_dir: data` to the recipe"), line
    pipeline("build", recipe(lf_workdir, dataset="identity", dataset_dir="data"), cwd=lf_workdir, as_typed=False)
    assert built(lf_workdir, "identity")
    missing = pipeline("validate", recipe(lf_workdir, dataset="identiy"), cwd=lf_workdir, expect=2, as_typed=False)
    assert "dataset_dir" not in missing.stderr  # data/ does not have it either: no such advice
