"""Golden training run from transformers' own Trainer (+ PEFT), not from this project's loop or a loop in the tests.

Why: the other sft checks of gradient accumulation compare with a reference loop written in these tests
(tests/train/reference.py), which encodes our reading of transformers' num_items_in_batch. Here transformers'
Trainer itself trains: same GPT-2 checkpoint (written by save_pretrained), the same LoRA start (PEFT LoraConfig on
c_attn / c_proj / c_fc, our initial A and B copied in), the same micro-batches in the same order (our loader's),
AdamW with the recipe's betas / eps, no decay, constant rate, no clipping, two updates of 2 micro-batches whose
trained-token counts differ a lot. Trainer counts num_items_in_batch over the update's micro-batches and divides
each micro-batch's summed cross-entropy by it; its logged losses and the trained LoRA tensors are the golden values.
With label_smoothing_factor the loss is Trainer's LabelSmoother on the full logits (shift_labels=True for a causal
LM), given the same num_items_in_batch.

Our labels are already shifted (labels[:, t] is the target after position t); transformers shifts inside the loss.
Each batch reaches transformers one column longer (a last token nobody attends to: our last position's target, the
EOS of the longest row, is never an input of ours, while transformers' shift drops the last column of `labels`),
with `shift_labels` (ours, used as-is by ForCausalLMLoss and by Trainer's count of num_items_in_batch: its
documented path for collators that shift) and `labels` (ours moved right by one column, what the model or the
LabelSmoother shifts back), so the count and the loss cover exactly our labelled positions.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.recipe.args import data_args, recipe_args
from pipeline.runtime.log import read_log
from pipeline.train.run import train
from tests.acceptance.harness import write_hf_checkpoint
from tests.train.helpers import BASE_SFT, GOLDEN_GPT2

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")  # transformers' Trainer needs it, on a CPU too

STEPS, ACCUMULATION = 2, GOLDEN_GPT2["gradient_accumulation_steps"]


def hf_batches(r: Any) -> list[dict[str, torch.Tensor]]:
    """The micro-batches our run trains on, in order, in transformers' label convention (see the module doc)."""
    from pipeline.data.loaders import make_loader

    loader = make_loader(data_args(r), "train", rank=0, world_size=1, epoch=0, shuffle=True)
    out = []
    for k in range(STEPS * ACCUMULATION):
        batch = loader.batch(k)
        labels, ids, mask = batch["labels"], batch["input_ids"], batch["attention_mask"]
        ignored = torch.full_like(labels[:, :1], -100)
        out.append({"input_ids": torch.cat([ids, ids[:, -1:]], dim=1),  # its prediction is never scored
                    "attention_mask": torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1),
                    "labels": torch.cat([ignored, labels], dim=1), "shift_labels": torch.cat([labels, ignored], dim=1)})
    return out


def initial_adapter(r: Any) -> dict[str, torch.Tensor]:
    """Our run's LoRA tensors before step 1 (the model built from the recipe's seed, as run.train does), in PEFT's
    layout: only the starting point is taken from the project; A is random, B zero."""
    from pipeline.model.build import build_model
    from pipeline.model.lora import lora_state_dict

    torch.manual_seed(r["seed"])
    return {k: v.clone() for k, v in lora_state_dict(build_model(*recipe_args(r))).items()}


def trainer_run(checkpoint: Path, r: Any, batches: list[dict[str, torch.Tensor]], out: Path
                ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """transformers.Trainer + PEFT over `batches`: (logged loss per step, trained LoRA tensors in PEFT's keys)."""
    base = transformers.GPT2LMHeadModel.from_pretrained(checkpoint, attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0)
    config = peft.LoraConfig(r=r["lora_rank"], lora_alpha=r["lora_alpha"], target_modules=r["lora_target"],
                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                             fan_in_fan_out=True)  # GPT-2's Conv1D stores its weights in x out
    model = peft.get_peft_model(base, config)
    start = initial_adapter(r)
    loaded = peft.set_peft_model_state_dict(model, start)
    assert not loaded.unexpected_keys
    assert set(start) == set(peft.get_peft_model_state_dict(model))  # PEFT adapted the layers ours did
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=STEPS, gradient_accumulation_steps=ACCUMULATION, per_device_train_batch_size=2,
        learning_rate=r["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
        adam_beta1=r["adam_beta1"], adam_beta2=r["adam_beta2"], adam_epsilon=r["adam_epsilon"], max_grad_norm=0.0,
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        dataloader_num_workers=0, average_tokens_across_devices=True,
        label_smoothing_factor=r["label_smoothing_factor"])

    class FixedBatches(transformers.Trainer):
        def get_train_dataloader(self) -> Any:  # our micro-batches as they are: no sampler, no collator
            return torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)

    trainer = FixedBatches(model=model, args=args, train_dataset=batches)
    assert trainer.model_accepts_loss_kwargs  # else Trainer divides each micro-batch's mean by the accumulation
    assert (trainer.label_smoother is not None) == bool(r["label_smoothing_factor"])
    trainer.train()
    losses = [rec["loss"] for rec in trainer.state.log_history if "loss" in rec]
    return losses, {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(model).items()}


@pytest.mark.parametrize("label_smoothing_factor", [0.0, 0.2])
def test_lora_sft_with_accumulation_matches_transformers_trainer(make_recipe, workdir, label_smoothing_factor):
    from safetensors.torch import load_file

    write_hf_checkpoint(workdir / "gpt2")
    r = make_recipe(BASE_SFT, max_steps=STEPS, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                    label_smoothing_factor=label_smoothing_factor, **GOLDEN_GPT2)
    batches = hf_batches(r)
    counts = [int((b["shift_labels"] != -100).sum()) for b in batches]
    assert max(counts) > 1.5 * min(counts)  # micro-batches weigh very differently: a mean per micro-batch would show
    golden_losses, golden = trainer_run(workdir / "gpt2", r, batches, workdir / "hf_trainer")

    result = train(r)
    assert result.exit_code == 0
    log = read_log(result.output_dir / "trainer_log.jsonl")
    assert [rec["loss"] for rec in log] == pytest.approx(golden_losses, rel=1e-5)
    ours = load_file(result.output_dir / "adapter" / "adapter_model.safetensors")
    assert set(ours) == set(golden)
    start = initial_adapter(r)
    # Adam moves an element by about lr x m / sqrt(v): where an element's gradient is small, the last bits of its
    # sum (threads, summation order: transformers' and ours differ) move that ratio, so an element may differ by a
    # small share of one step's lr (1.6e-5 at lr 5e-2 was seen on a loaded 2-core machine); the losses above are
    # the tight check (rel 1e-5), and a wrong divisor moves whole tensors by far more.
    atol = 1e-3 * r["learning_rate"]
    for key, tensor in golden.items():
        assert not torch.equal(tensor, start[key]), key  # every tensor moved (A from step 2 on): not vacuous
        torch.testing.assert_close(ours[key], tensor, rtol=1e-4, atol=atol, msg=lambda m, k=key: f"{k}: {m}")
