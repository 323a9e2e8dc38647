"""Review h191 of c807675..ccfeb08, through the CLI as typed, from a transformers-written GPT-2 checkpoint.

- A stale build met with command-line overrides: `python -m pipeline train r.yaml val_size=0.2` after a build of
  r.yaml as written. The message names the command that rebuilds the data this run reads, the overrides included
  (make passes them as ARGS, which `make data` hands to the build). Failed before: it said `make data RECIPE=r.yaml`
  (python -m pipeline build r.yaml), which rebuilds the recipe as written, val_size 0.1, so the run stopped on the same
  message again. The same for a built file edited by hand, which validate finds (it said `make data` and RECIPE).
- A full recipe on a pre-quantized bitsandbytes checkpoint (transformers' save_pretrained of a BitsAndBytesConfig
  model): chat and export load the stored model as it is (test_prequantized_more_cli), but `eval` without a task and
  `merge` read the model a training run of the recipe writes (output_dir/model), and no run of it can train (transformers'
  Trainer: 'You cannot perform fine-tuning on purely quantized models.'). Both are refused at finetuning_type with
  that reason, exit 2, as train is. Failed before: they said "no trained model ...; `make train RECIPE=full.yaml`
  (python -m pipeline train) produces it", and make train then refused the recipe.
- `train --dry-run` of a recipe whose output_dir holds another run's checkpoint: the real run stops there (neither
  resumed nor overwritten); the dry run writes only to its temporary folder, reports as usual (exit 0) and says that
  refusal in one warning line, as it says an output_dir the real run cannot write. Failed before: "dry run: ok" and
  nothing else, so the user learnt it only when the real run stopped.
"""
from __future__ import annotations

import json
import shlex

import pytest

from tests.acceptance.harness import pipeline, refused, write_recipe


def test_a_stale_build_names_the_rebuild_with_the_runs_overrides(workdir, hf_checkpoint):
    write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                 output_dir="saves/r")
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    err = refused("train", "r.yaml", "val_size=0.2", cwd=workdir, as_typed=False)  # refused before the model loads
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: data/build/tiny_sft: built with other settings than the recipe's (val_size 0.1 -> 0.2); run `python -m"
        " pipeline build r.yaml val_size=0.2`, or set overwrite_cache: true so that train and eval rebuild it"
        " themselves"], err  # workdir holds no Makefile: the python -m form alone (pipeline.rerun)
    command = err.split("`python -m pipeline ", 1)[1].split("`", 1)[0]
    pipeline(*shlex.split(command), cwd=workdir, as_typed=False)  # what the message says, as it says it
    pipeline("validate", "r.yaml", "val_size=0.2", cwd=workdir, as_typed=False)  # the build is now the run's
    built = workdir / "data/build/tiny_sft/train.json"
    built.write_text(json.dumps(json.loads(built.read_text())), encoding="utf-8")  # the same rows, other bytes
    err = refused("validate", "r.yaml", "val_size=0.2", cwd=workdir, as_typed=False)
    assert "data/build/tiny_sft/train.json: changed after it was built (its sha256 differs from manifest.json); edit " \
           "the raw sources instead and run `python -m pipeline build r.yaml val_size=0.2`" in err, err


def test_a_full_recipe_on_a_prequantized_checkpoint_is_refused_where_it_needs_a_training_run(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    from tests.acceptance.test_prequantized_cli import bnb_hub_checkpoint

    snapshot, _, _, _ = bnb_hub_checkpoint(tmp_path, "someone/Tiny-Llama-bnb-4bit",
                                           transformers.BitsAndBytesConfig(load_in_4bit=True))
    write_recipe(tmp_path / "full.yaml", model_name_or_path=str(snapshot), dataset_dir="data", template="llama3",
                 finetuning_type="full", output_dir="saves/full")
    line = next(i for i, text in enumerate((tmp_path / "full.yaml").read_text().splitlines(), 1)
                if text.startswith("finetuning_type:"))
    for command in ("eval", "merge", "train"):  # refused as the recipe resolves: in this process
        err = refused(command, "full.yaml", cwd=tmp_path, as_typed=False)
        assert [text for text in err.splitlines() if text.startswith("error:")] == [
            f"error: full.yaml:{line}:18: finetuning_type: given full with model_name_or_path: {snapshot}, a "
            "pre-quantized bitsandbytes checkpoint stored as 4-bit fp4: a quantized base cannot train: its 4/8-bit "
            "weights are frozen integer codes (transformers' Trainer refuses it too: 'You cannot perform fine-tuning "
            "on purely quantized models.'); set finetuning_type: lora (or oft), or point model_name_or_path at the "
            "unquantized checkpoint it was made from"], (command, err)
    assert not (tmp_path / "saves").exists()


def test_a_dry_run_says_the_real_run_would_stop_on_an_output_dir_holding_a_run(workdir, hf_checkpoint):
    write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                 output_dir="saves/r", max_steps=1)
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    (workdir / "saves/r/checkpoint-1").mkdir(parents=True)
    (workdir / "saves/r/trainer_log.jsonl").write_text("{}\n")
    line = next(i for i, text in enumerate((workdir / "r.yaml").read_text().splitlines(), 1)
                if text.startswith("output_dir:"))
    done = pipeline("train", "r.yaml", "--dry-run", cwd=workdir)
    assert "dry run: ok" in done.stdout and "output_dir saves/r was not touched" in done.stdout, done.stdout
    assert [text for text in done.stderr.splitlines() if text.startswith(("warning:", "error:"))] == [
        f"warning: r.yaml:{line}: output_dir: saves/r is not empty (it holds checkpoint-1, trainer_log.jsonl); set "
        "resume_from_checkpoint: latest to continue that run, overwrite_output_dir: true to start over (its contents "
        "are removed), or choose another output_dir. The real run would stop there; this dry run writes only to a "
        "temporary folder, so it goes on"], done.stderr
    assert sorted(p.name for p in (workdir / "saves/r").iterdir()) == ["checkpoint-1", "trainer_log.jsonl"]
