"""Papercuts a user meets on the first day, through the CLI as typed, from a transformers-written GPT-2 checkpoint.

- `train` of an epoch-based recipe (num_train_epochs, no max_steps) before `make data`: the steps cannot be counted,
  and train does not build (DESIGN.md: `make data` / `python -m pipeline build` builds; train builds only with
  LLaMA-Factory's overwrite_cache: true). One line naming the datasets that are not built and the commands that build
  them for this recipe, exit 2, nothing written (it was one line per dataset: three for README's demo_sft). Failed before: the line said `make data` (python -m pipeline build
  RECIPE), and a bare `make data` builds the Makefile's default recipe, not r.yaml.
- `train --dry-run` with an output_dir the real run could not write: the dry run writes only to a temporary folder,
  so it reports as usual (exit 0) and names the folder in ONE warning line, the refusal the real run would stop
  with. Failed before: refused, exit 2, as the real run is (the dry run took output_dir's lock like train).
- `additional_target: all`: LLaMA-Factory 0.9.5 hands additional_target to PEFT as modules_to_save
  (model/adapter.py:241, 249), and PEFT 0.21 trains in full the modules whose name ends with the text
  (utils/other.py:1088, _set_trainable: `key.endswith(target_key)`): no module of GPT-2 ends with 'all', so there it
  trains nothing beyond LoRA, without a word. Here, as for any text that matches no module: one message saying so,
  exit 2. Failed before: 'all' was read as every module, and every lora_target was refused as 'also in
  additional_target' (or, validated alone, every module would have trained in full).
- `finetuning_type: oft` on GPT-2: PEFT 0.21's OFT cannot wrap Conv1D (get_peft_model raises TypeError, tried on a
  transformers GPT-2), so LLaMA-Factory's run fails there; refused here as before, the message now saying that
  (it said the adapter "would not load", which is not what PEFT does).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tests.acceptance.harness import WORDS, cli_env, pipeline, refused, write_recipe


def files(workdir: Path) -> list[Path]:
    """What is under workdir, but the TMPDIR given to the run (tiktoken keeps its cache there)."""
    return sorted(p.relative_to(workdir) for p in workdir.rglob("*") if not p.is_relative_to(workdir / "tmp"))


def test_an_epoch_recipe_trained_before_its_data_is_built_says_what_builds_it(workdir, hf_checkpoint):
    """Two datasets, as the demo's three: one mistake (no build yet), one line naming both (it was a line each)."""
    registry = json.loads((workdir / "data" / "dataset_info.json").read_text(encoding="utf-8"))
    (workdir / "data" / "dataset_info.json").write_text(json.dumps({**registry, "tiny_sft_b": registry["tiny_sft"]}),
                                                        encoding="utf-8")
    write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                 dataset="tiny_sft,tiny_sft_b", output_dir="saves/r", max_steps=None, num_train_epochs=2)
    err = refused("train", "r.yaml", cwd=workdir)
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: data/build/tiny_sft: dataset 'tiny_sft' is not built, and neither are 'tiny_sft_b'; run `python -m "
        "pipeline build r.yaml`, or set overwrite_cache: true so that train and eval rebuild them themselves"], err
    # no Makefile here: no make form
    assert sorted(p.name for p in workdir.iterdir()) == ["data", "r.yaml"]  # no saves/, no build


def test_a_dry_run_names_an_output_dir_the_real_run_cannot_write_and_goes_on(workdir, hf_checkpoint):
    """As root, who may write anywhere, /proc stands in for a folder this user may not create in (as
    tests/recipe/test_careless_user.py does for the real run); as another user, a folder without write permission."""
    # by epochs, with rows over cutoff_len: the warmup notice counts the steps the run makes (below)
    with open(workdir / "data" / "raw" / "sft.jsonl", "a", encoding="utf-8") as rows:
        rows.writelines(json.dumps({"instruction": f"Long {i}: " + " ".join(WORDS), "input": "", "output": "x"}) + "\n"
                        for i in range(6))
    write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                 output_dir="saves/r", max_steps=None, num_train_epochs=1, warmup_ratio=0.05)
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    if os.geteuid() == 0:
        value, why = "/proc/no-such-run", "No such file or directory (/proc)"
    else:
        (workdir / "locked").mkdir(mode=0o555)
        value, why = "locked/run", f"Permission denied ({workdir / 'locked'})"
    tmp = workdir / "tmp"
    tmp.mkdir()
    before = files(workdir)
    done = pipeline("train", "r.yaml", "--dry-run", f"output_dir={value}", cwd=workdir, env=cli_env(TMPDIR=str(tmp)))
    assert "dry run: ok" in done.stdout and f"output_dir {value} was not touched" in done.stdout, done.stdout
    assert [line for line in done.stderr.splitlines() if line.startswith(("warning:", "error:"))] == [
        f"warning: command line override output_dir={value}: output_dir: {value} cannot be created: {why}; choose a "
        "directory this user may write, or make that one writable. The real run would stop there; this dry run "
        "writes only to a temporary folder, so it goes on"], done.stderr
    assert files(workdir) == before and not [p for p in tmp.iterdir() if p.name.startswith("pipeline-dry-run")]
    # the warmup notice of the steps train makes: one epoch of the rows that fit cutoff_len 48, 2 a step (by hand:
    # the long rows the build split into train.json are left out). Failed before: of the built rows' steps (all of
    # train.json's), said before the length policy ran
    built = json.loads((workdir / "data/build/tiny_sft/train.json").read_text(encoding="utf-8"))
    kept = sum(not row["instruction"].startswith("Long ") for row in built)
    steps = kept // 2
    assert steps < len(built) // 2, len(built)
    line = next(i for i, text in enumerate((workdir / "r.yaml").read_text().splitlines(), 1)
                if text.startswith("warmup_ratio:"))
    assert [text for text in done.stderr.splitlines() if text.startswith("notice:") and "warmup" in text] == [
        notice(line, steps)], done.stderr
    # plan shows the steps train runs, and says the warmup notice of them. Failed before: total_steps and the notice
    # of all of train.json's rows ('of 13 steps'), counted before the length policy
    shown = pipeline("plan", "r.yaml", cwd=workdir)
    derived = dict(row.split()[:2] for row in shown.stdout.split("[derived]")[1].split("[deepspeed]")[0].splitlines()
                   if row.startswith(("num_train_examples ", "steps_per_epoch ", "total_steps ")))
    assert derived == {"num_train_examples": str(kept), "steps_per_epoch": str(steps), "total_steps": str(steps)}
    assert [text for text in shown.stderr.splitlines() if "warmup" in text] == [notice(line, steps)], shown.stderr
    # a build key changed (val_size) with overwrite_cache: true, which train rebuilds first: plan shows the recipe
    # with the built rows' counts, as before it counted. Failed before: exit 2, 'built with other settings than the
    # recipe's ...; or set overwrite_cache: true' (set already)
    stale = pipeline("plan", "r.yaml", "val_size=0.3", "overwrite_cache=true", cwd=workdir, as_typed=False).stdout
    assert re.search(rf"\nnum_train_examples +{len(built)} +sum of splits.train in the built manifests\n", stale)
    # max_steps with no optimizer step in an epoch once the long rows are left out (the built rows fill one):
    # refused as by epochs. Failed before: validate passed, and train ran max_steps steps that each drew their
    # micro-batches from several epochs ('epoch 4.00' at step 1 of a 1-micro-batch epoch with accumulation 4)
    accumulation = kept // 2 + 1
    assert len(built) // 2 >= accumulation  # resolve's enough_batches, on the built rows, lets it through
    said = (f"error: command line override gradient_accumulation_steps={accumulation}: gradient_accumulation_steps: no "
            f"optimizer step fits: the train split gives {kept // 2} micro-batches per rank per epoch and "
            f"gradient_accumulation_steps is {accumulation}; lower gradient_accumulation_steps or "
            f"per_device_train_batch_size, or add data; {len(built) - kept} of the {len(built)} training rows are "
            "longer than cutoff_len 48 and are left out (overlength_policy: drop, the default here; LLaMA-Factory cuts "
            "them instead): set overlength_policy: truncate to keep them with their responses cut, or raise cutoff_len")
    for command, as_typed in (("validate", True), ("train", False)):  # train: main(argv) here, no interpreter start
        err = refused(command, "r.yaml", "max_steps=2", f"gradient_accumulation_steps={accumulation}", cwd=workdir,
                      as_typed=as_typed)
        assert [text for text in err.splitlines() if text.startswith("error:")] == [said], err
    assert not (workdir / "saves").exists()


def notice(line: int, steps: int) -> str:
    """The warmup notice of r.yaml's warmup_ratio 0.05 (at `line`) for a run of `steps` steps (one warmup step)."""
    return (f"notice: r.yaml:{line}:15: warmup_ratio 0.05 of {steps} steps = 1 warmup step: step 1 trains at lr 0 and "
            "the warmup is that one step, which trains nothing (a linear warmup starts at lr 0, as transformers' "
            "does); set warmup_ratio: 0 or more steps")


def test_additional_target_all_is_named_as_llamafactory_reads_it(workdir, hf_checkpoint):
    write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                 output_dir="saves/r", lora_target="c_attn", additional_target="all")
    line = next(i for i, text in enumerate((workdir / "r.yaml").read_text().splitlines(), 1)
                if text.startswith("additional_target:"))
    err = refused("validate", "r.yaml", cwd=workdir)
    assert [text for text in err.splitlines() if text.startswith("error:")] == [
        f"error: r.yaml:{line}:20: additional_target: 'all' matches no module: LLaMA-Factory hands additional_target to "
        "PEFT as modules_to_save, which trains in full every module whose name ends with the text, and no module of "
        "this GPT2LMHeadModel ends with 'all', so LLaMA-Factory trains nothing beside the adapter ('all' is "
        "lora_target's word for every Linear). Remove additional_target for LLaMA-Factory's run, name the modules to "
        "train in full (e.g. wte, ln_f), or use finetuning_type: full to train every weight"], err
    assert not (workdir / "saves").exists()


def test_oft_on_gpt2_is_refused_as_peft_refuses_it(workdir, hf_checkpoint):
    write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                 output_dir="saves/r", finetuning_type="oft", oft_block_size=8)
    line = next(i for i, text in enumerate((workdir / "r.yaml").read_text().splitlines(), 1)
                if text.startswith("finetuning_type:"))
    err = refused("validate", "r.yaml", cwd=workdir, as_typed=False)  # validate ran as typed above
    assert [text for text in err.splitlines() if text.startswith("error:")] == [
        f"error: r.yaml:{line}:18: finetuning_type: is oft but the model is GPT-2, whose projections are Conv1D in "
        "transformers: PEFT's OFT cannot wrap Conv1D (get_peft_model raises TypeError: \"Target module Conv1D is not "
        "supported\"), so LLaMA-Factory fails there too; use lora, or a Llama / Qwen model"], err
