"""The sft loss keys through the CLI, as a LLaMA-Factory user brings them: a recipe in LLaMA-Factory's layout with
`label_smoothing_factor: 0.1`, `use_eaft_loss: true` (with `eaft_alpha`) or `use_dft_loss: true`, trained from a
save_pretrained GPT-2 with `python -m pipeline train`.

Golden values from transformers and LLaMA-Factory's formula alone: the first update's logged loss is the loss over
the logits of AutoModelForCausalLM, the base model (LoRA's B starts at zero), on that update's two micro-batches
with Trainer's num_items_in_batch; eval_loss is the same loss over the val split with the trained adapter loaded
in PEFT (Trainer applies the label smoother and compute_loss_func in evaluation too), and no eval_perplexity is
logged beside it. The losses: transformers' LabelSmoother (shift_labels=True for a causal LM), and
LLaMA-Factory's dft_loss_func / eaft_loss_func as tests/model/test_sft_weighted_loss.py re-writes them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from tests.acceptance.harness import cli_env, pipeline, write_data, write_hf_checkpoint
from tests.model.test_sft_weighted_loss import llama_factory_loss

RECIPE = """\
### model
model_name_or_path: gpt2

### method
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all
{loss}

### dataset
dataset: tiny_sft
dataset_dir: data
template: alpaca
cutoff_len: 48
max_samples: 6
val_size: 2

### output
output_dir: saves/sft_loss
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
# A loss of our (shifted) labels over transformers' logits of the same positions, given num_items_in_batch
Golden = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def label_smoother(logits: torch.Tensor, labels: torch.Tensor, count: int) -> torch.Tensor:
    """transformers' label-smoothed loss: our labels moved right one column, the logits one position longer (its
    shift drops the last column), as Trainer hands them to LabelSmoother."""
    from transformers.trainer_pt_utils import LabelSmoother

    moved = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
    longer = torch.cat([logits, logits[:, -1:]], dim=1)
    return LabelSmoother(epsilon=EPS)({"logits": longer}, moved, shift_labels=True, num_items_in_batch=count)


def update_loss(model: Any, batches: list[dict], golden: Golden) -> float:
    """`golden` over `batches`, each micro-batch normalised by the labelled tokens of all of them, as Trainer's
    num_items_in_batch."""
    count = sum(int((b["labels"] != -100).sum()) for b in batches)
    with torch.no_grad():
        return sum(float(golden(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                b["labels"], count)) for b in batches)


def check_run(tmp_path: Path, monkeypatch: Any, loss_lines: str, plan_line: str, recorded: dict[str, Any],
              golden: Golden) -> None:
    """Build and train the recipe with `loss_lines`; its plan names the loss, all_results.json records its keys,
    and the logged first loss and eval_loss are `golden`'s over transformers' base model and the PEFT-loaded
    adapter."""
    import peft
    import transformers

    from pipeline.data.loaders import make_loader
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    write_data(tmp_path / "data")
    write_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    (tmp_path / "sft.yaml").write_text(RECIPE.format(loss=loss_lines), encoding="utf-8")
    pipeline("build", "sft.yaml", cwd=tmp_path)
    err = pipeline("train", "sft.yaml", cwd=tmp_path).stderr
    assert plan_line in err, err
    log = [json.loads(line) for line in (tmp_path / "saves/sft_loss/trainer_log.jsonl").read_text().splitlines()]
    first = next(e for e in log if "loss" in e and e["step"] == 1)
    evaluated = next(e for e in log if "eval_loss" in e)
    assert "eval_perplexity" not in evaluated, evaluated
    results = json.loads((tmp_path / "saves/sft_loss/all_results.json").read_text())
    assert {key: results.get(key) for key in recorded} == recorded  # eval's report says what its losses are

    monkeypatch.chdir(tmp_path)
    data = data_args(resolve(tmp_path / "sft.yaml", [], command="train", env=cli_env(WORLD_SIZE="1")))
    train = make_loader(data, "train", rank=0, world_size=1, epoch=0, shuffle=True)
    assert train.num_examples == 4 and len(train) == 2  # the first update is every training row
    val = list(make_loader(data, "val", rank=0, world_size=1, epoch=0, shuffle=False))

    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    assert first["loss"] == pytest.approx(update_loss(base, [train.batch(0), train.batch(1)], golden), rel=1e-5)
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "saves/sft_loss/adapter").eval()
    assert evaluated["eval_loss"] == pytest.approx(update_loss(tuned, val, golden), rel=1e-5)


def test_a_label_smoothing_recipe_logs_transformers_smoothed_loss(tmp_path, monkeypatch):
    check_run(tmp_path, monkeypatch, f"label_smoothing_factor: {EPS}",
              "loss: label-smoothed cross-entropy (label_smoothing_factor 0.1)", {"label_smoothing_factor": EPS},
              label_smoother)


# eaft (the weight with a power) in the quick suite; dft's run is the same path with the other weight (its formula
# is tests/model/test_sft_weighted_loss.py's), slow for the suite's time
@pytest.mark.parametrize("kind", ["eaft", pytest.param("dft", marks=pytest.mark.slow)])
def test_a_dft_or_eaft_recipe_logs_llama_factorys_weighted_loss(tmp_path, monkeypatch, kind):
    lines, recorded, alpha = {"dft": ("use_dft_loss: true", {"use_dft_loss": True}, 1.0),
                              "eaft": ("use_eaft_loss: true\neaft_alpha: 0.5",
                                       {"use_eaft_loss": True, "eaft_alpha": 0.5}, 0.5)}[kind]
    check_run(tmp_path, monkeypatch, lines, f"loss: {kind.upper()}-weighted cross-entropy", recorded,
              lambda logits, labels, count: llama_factory_loss(logits, labels, kind, alpha, num_items_in_batch=count))
