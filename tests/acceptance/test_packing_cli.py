"""Packing and gradient checkpointing as a user runs them: `python -m pipeline plan/train` on a recipe with
neat_packing, from a GPT-2 written by transformers' save_pretrained, the adapter loaded back with PEFT.

build and plan run as typed in the first test; their further calls run main(argv) in this process (as_typed=False:
the same code, no interpreter start); training and eval runs stay typed."""
from __future__ import annotations

import json
import re
from typing import Any

import pytest
import torch

from tests.acceptance.harness import pipeline, write_recipe

PACKED = dict(cutoff_len=160, packing=True, neat_packing=True, disable_gradient_checkpointing=False, val_size=0.2)

# The packs of the workdir's tiny_sft (harness.write_data: 24 rows of sft_rows), counted by hand. Row i is
# {"instruction": "Repeat the words: W1 W2 W3", "output": "W1 W2 W3 (i)"}, its words from WORDS (each one GPT-2 token
# after a space; bare, as W1 opens the output, too, but for "garden": "gard" "en", and no output opens with it), i
# from 0 to 23 (one token each). Under the alpaca template every row is 44 GPT-2 tokens:
#   "Below is an instruction that describes a task." 9 + " Write a response that appropriately completes the
#   request." 9 + "\n" "\n" 2 (the system's "\n\n" before "###")                            = 20
#   "###" " Instruction" ":" "\n" 4 + "Repeat" " the" " words" ":" 4 + W1 W2 W3 3            = 31
#   "\n" "\n" "###" " Response" ":" "\n" 6                                                   = 37
#   W1 W2 W3 3 + " (" i ")" 3 + <|endoftext|> 1                                             = 44
# val_size 0.2 holds out ceil(0.2 x 24) = 5 rows: 19 train rows. An example of 44 tokens fills 43 positions of a
# packed row (its inputs, tokens 0..42). Best-fit decreasing of 19 equal sizes fills one row until the next does
# not fit, then opens another:
#   cutoff_len 160: 3 x 43 = 129 <= 160 < 4 x 43 = 172: 3 a row, rows of 3,3,3,3,3,3,1 = 7 packs
#   cutoff_len 100: 2 x 43 = 86 <= 100 < 129:          2 a row, rows of 2 x 9, then 1  = 10 packs
HAND_TRAIN_ROWS = 19
HAND_PACKS = {160: 7, 100: 10}


def test_neat_packed_lora_run_from_a_save_pretrained_gpt2(workdir, hf_checkpoint):
    peft = pytest.importorskip("peft")
    import transformers

    base = hf_checkpoint("gpt2", n_positions=160)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", output_dir="saves/r",
                          max_steps=None, num_train_epochs=1, **PACKED)
    pipeline("build", recipe, cwd=workdir)
    plan = pipeline("plan", recipe, cwd=workdir).stdout
    assert "packed rows of cutoff_len 160" in plan
    packs = int(re.search(r"num_train_examples\s+(\d+)", plan).group(1))
    unpacked = int(re.search(r"num_train_examples\s+(\d+)",
                             pipeline("plan", recipe, "packing=false", "neat_packing=false", cwd=workdir,
                                      as_typed=False).stdout).group(1))
    assert packs < unpacked  # several examples per row
    steps = int(re.search(r"total_steps\s+(\d+)", plan).group(1))
    assert steps == packs // 2  # per_device_train_batch_size 2, one epoch: exact, counted in packs

    done = pipeline("train", recipe, cwd=workdir)
    assert f"data: {packs:,} packed rows of cutoff_len 160," in done.stderr  # what the loader's items are
    results = json.loads((workdir / "saves/r/all_results.json").read_text(encoding="utf-8"))
    assert results["global_step"] == steps and results["num_train_examples"] == packs

    hf = transformers.GPT2LMHeadModel.from_pretrained(base).eval()
    ids = torch.tensor([[464, 2068, 7586, 21831, 18045, 625, 262, 16931]])
    with torch.no_grad():
        before = hf(ids).logits
        tuned = peft.PeftModel.from_pretrained(hf, workdir / "saves/r/adapter").eval()
        after = tuned(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)


def planned(done: Any) -> int:
    """plan's num_train_examples."""
    return int(re.search(r"num_train_examples\s+(\d+)", done.stdout).group(1))


def test_plan_keeps_its_count_beside_the_build(workdir, hf_checkpoint):
    """plan counts the packs by tokenizing the train split as train does; a second plan of the same build and
    settings reads the count kept beside the build (data/build/tiny_sft/counts/) and tokenizes nothing (the file
    untouched; tests/data/test_counts.py counts what is tokenized and written). Another
    cutoff_len is another key: counted anew, to the hand count. Failed before: no counts/ folder, every plan tokenized."""
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2", n_positions=160)),
                          dataset_dir="data", output_dir="saves/r", max_steps=None, num_train_epochs=1, **PACKED)
    pipeline("build", recipe, cwd=workdir, as_typed=False)
    counts = workdir / "data/build/tiny_sft/counts"

    def kept() -> dict[str, tuple[int, int, int]]:
        return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, json.loads(p.read_text())["items"])
                for p in counts.iterdir() if not p.name.startswith("check-")}  # validate's verdict: not a count

    assert planned(pipeline("plan", "r.yaml", cwd=workdir)) == HAND_PACKS[160]
    first = kept()
    assert [items for _, _, items in first.values()] == [HAND_PACKS[160]]
    assert planned(pipeline("plan", "r.yaml", cwd=workdir)) == HAND_PACKS[160]
    assert kept() == first  # read, not counted again
    pipeline("validate", "r.yaml", cwd=workdir, as_typed=False)  # reads it too, and counts the val split
    assert {name: kept()[name] for name in first} == first and len(kept()) == 2

    assert planned(pipeline("plan", "r.yaml", "cutoff_len=100", cwd=workdir, as_typed=False)) == HAND_PACKS[100]
    second = kept()
    assert sorted((name.split("-")[0], items) for name, (_, _, items) in second.items()) == \
        [("train", HAND_PACKS[160]), ("train", HAND_PACKS[100]), ("val", 2)]  # val: 5 rows, 3 + 2 at cutoff_len 160
    assert planned(pipeline("plan", "r.yaml", "packing=false", "neat_packing=false", cwd=workdir,
                            as_typed=False)) == HAND_TRAIN_ROWS  # unpacked: the 19 rows, each within cutoff_len
    assert planned(pipeline("plan", "r.yaml", cwd=workdir, as_typed=False)) == HAND_PACKS[160]
    assert {name: kept()[name] for name in first} == first


def test_packing_mistakes_exit_2_with_one_message(workdir, hf_checkpoint):
    base = str(hf_checkpoint("gpt2"))
    pt = write_recipe(workdir / "pt.yaml", model_name_or_path=base, dataset_dir="data", output_dir="saves/pt",
                      stage="pt", dataset="tiny_pt", template=None, neat_packing=True)
    bad = pipeline("train", pt, cwd=workdir, expect=2)
    assert "neat_packing: given true, but it has no meaning for stage: pt" in bad.stderr
    assert "Traceback" not in bad.stderr and not (workdir / "saves/pt").exists()

    short = write_recipe(workdir / "short.yaml", model_name_or_path=base, dataset_dir="data",
                         output_dir="saves/short", overlength_policy="error", **{**PACKED, "cutoff_len": 12})
    pipeline("build", short, cwd=workdir, as_typed=False)
    bad = pipeline("train", short, cwd=workdir, expect=2)
    assert "over cutoff_len 12" in bad.stderr and "packing never splits an example" in bad.stderr
    assert "Traceback" not in bad.stderr and not (workdir / "saves/short").exists()

    # rows that fill a step (batch 2 x accumulation 4 of the built train split's rows) whose packs do not: the
    # refusal says the packing and its fixes, at its key. Failed before: the pack count as if it were rows, at
    # gradient_accumulation_steps ('lower gradient_accumulation_steps ... or add data'), packing unnamed
    few = write_recipe(workdir / "few.yaml", model_name_or_path=str(hf_checkpoint("gpt2", n_positions=160)),
                       dataset_dir="data", output_dir="saves/few", max_steps=None, num_train_epochs=1,
                       gradient_accumulation_steps=4, **PACKED)
    pipeline("build", few, cwd=workdir, as_typed=False)
    rows = len(json.loads((workdir / "data/build/tiny_sft/train.json").read_text(encoding="utf-8")))
    assert rows == HAND_TRAIN_ROWS and rows // 2 >= 4  # the rows fill a step: resolve's enough_batches passes them
    packs = HAND_PACKS[160]  # 7 packs: 3 micro-batches of 2, fewer than accumulation 4
    assert planned(pipeline("plan", few, "gradient_accumulation_steps=1", cwd=workdir, as_typed=False)) == packs
    line = next(i for i, text in enumerate(few.read_text().splitlines(), 1) if text.startswith("packing:"))
    said = (f"error: few.yaml:{line}: packing: no optimizer step fits: packing put the train split's {rows} rows into "
            f"{packs} packs of cutoff_len 160, {packs // 2} micro-batches per rank per epoch, and a step takes "
            "per_device_train_batch_size 2 x gradient_accumulation_steps 4 packs per rank; lower "
            "per_device_train_batch_size x gradient_accumulation_steps, lower cutoff_len (more, smaller packs), add "
            "data, or set packing and neat_packing: false")
    for command, as_typed in (("validate", True), ("train", False)):
        bad = pipeline(command, "few.yaml", cwd=workdir, expect=2, as_typed=as_typed)
        assert [text for text in bad.stderr.splitlines() if text.startswith("error:")] == [said], bad.stderr
        assert "Traceback" not in bad.stderr and not (workdir / "saves/few").exists()


def test_eval_of_a_packed_run_counts_examples_not_packed_rows(workdir, hf_checkpoint):
    """`eval` scores the val split through training's packed loader; metrics.json's loss_examples and report.md's
    "loss and perplexity over: N examples" gave the number of packed rows, fewer than the examples they hold, and
    report.md's training line called train's packed rows examples."""
    base = hf_checkpoint("gpt2", n_positions=160)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", output_dir="saves/r",
                          max_steps=1, max_eval_samples=1, max_new_tokens=1, **{**PACKED, "val_size": 6})
    pipeline("build", recipe, cwd=workdir, as_typed=False)
    pipeline("train", recipe, cwd=workdir)
    pipeline("eval", recipe, cwd=workdir)
    val = json.loads((workdir / "data/build/tiny_sft/val.json").read_text(encoding="utf-8"))
    metrics = json.loads((workdir / "saves/r/eval/metrics.json").read_text(encoding="utf-8"))
    assert len(val) == 6 and metrics["loss_examples"] == 6  # six examples of ~30 tokens share rows of 160
    report = (workdir / "saves/r/eval/report.md").read_text(encoding="utf-8")
    assert "loss and perplexity over: 6 examples" in report
    results = json.loads((workdir / "saves/r/all_results.json").read_text(encoding="utf-8"))
    assert results["train_items"] == "packed rows of cutoff_len 160"
    assert f"Trained 1 optimizer steps on {results['num_train_examples']} packed rows of cutoff_len 160" in report
