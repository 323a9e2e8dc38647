"""label_smoothing_factor through the CLI, as a LLaMA-Factory user brings it: a recipe in LLaMA-Factory's layout
with `label_smoothing_factor: 0.1`, trained from a save_pretrained GPT-2 with `python -m pipeline train`.

Golden values from transformers alone: the first update's logged loss is LabelSmoother (Trainer's label smoothing,
shift_labels=True for a causal LM) over the logits of AutoModelForCausalLM, the base model (LoRA's B starts at
zero), on that update's two micro-batches with Trainer's num_items_in_batch; eval_loss is LabelSmoother over the
val split with the trained adapter loaded in PEFT, and no eval_perplexity is logged beside it.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.acceptance.harness import cli_env, pipeline, write_data, write_hf_checkpoint

RECIPE = """\
### model
model_name_or_path: gpt2

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all
label_smoothing_factor: 0.1

### dataset
dataset: tiny_sft
dataset_dir: data
template: alpaca
cutoff_len: 48
max_samples: 6
val_size: 2

### output
output_dir: saves/smooth
logging_steps: 1
plot_loss: false

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 2
learning_rate: 5.0e-2
max_steps: 1
lr_scheduler_type: constant
"""
EPS = 0.1


def smoothed(model, batches: list[dict]) -> float:
    """transformers' label-smoothed loss over `batches` (our shifted labels moved right one column, the inputs one
    token longer so that the last target is scored: transformers' shift drops the last column), each micro-batch
    normalised by the labelled tokens of all of them, as Trainer's num_items_in_batch."""
    from transformers.trainer_pt_utils import LabelSmoother

    count = sum(int((b["labels"] != -100).sum()) for b in batches)
    total = 0.0
    with torch.no_grad():
        for b in batches:
            ids, labels, mask = b["input_ids"], b["labels"], b["attention_mask"]
            logits = model(input_ids=torch.cat([ids, ids[:, -1:]], dim=1),
                           attention_mask=torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)).logits
            moved = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
            total += float(LabelSmoother(epsilon=EPS)({"logits": logits}, moved, shift_labels=True,
                                                      num_items_in_batch=count))
    return total


def test_a_label_smoothing_recipe_logs_transformers_smoothed_loss(tmp_path, monkeypatch):
    import peft
    import transformers

    from pipeline.data.loaders import make_loader
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    write_data(tmp_path / "data")
    write_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    (tmp_path / "smooth.yaml").write_text(RECIPE, encoding="utf-8")
    pipeline("build", "smooth.yaml", cwd=tmp_path)
    err = pipeline("train", "smooth.yaml", cwd=tmp_path).stderr
    assert "label smoothing: 0.1" in err, err
    log = [json.loads(line) for line in (tmp_path / "saves/smooth/trainer_log.jsonl").read_text().splitlines()]
    first = next(e for e in log if "loss" in e and e["step"] == 1)
    evaluated = next(e for e in log if "eval_loss" in e)
    assert "eval_perplexity" not in evaluated, evaluated
    results = json.loads((tmp_path / "saves/smooth/all_results.json").read_text())
    assert results["label_smoothing_factor"] == EPS  # eval's report says its losses are smoothed

    monkeypatch.chdir(tmp_path)
    data = data_args(resolve(tmp_path / "smooth.yaml", [], command="train", env=cli_env(WORLD_SIZE="1")))
    train = make_loader(data, "train", rank=0, world_size=1, epoch=0, shuffle=True)
    assert train.num_examples == 4 and len(train) == 2  # the first update is every training row
    val = list(make_loader(data, "val", rank=0, world_size=1, epoch=0, shuffle=False))

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert first["loss"] == pytest.approx(smoothed(base, [train.batch(0), train.batch(1)]), rel=1e-5)
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "saves/smooth/adapter").eval()
    assert evaluated["eval_loss"] == pytest.approx(smoothed(tuned, val), rel=1e-5)
