"""Stage sft with use_asft_loss: LLaMA-Factory's ASFT objective per micro-batch, against the starting model.

The loss is pipeline.model.asft.asft_loss over the labelled positions of the micro-batch; the reference is the one
stage dpo / kto use (preference.starting_reference: the adapters-off policy for LoRA / OFT, a frozen copy of the
starting model for full / freeze). Each micro-batch's loss is a mean over its own labelled tokens, as LLaMA-Factory's
compute_loss calls asft_loss_func without num_items_in_batch; the loop (step_scale 1) then averages the micro-batches
of an update and DeepSpeed the ranks.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from pipeline.data.packing import model_inputs
from pipeline.model.asft import asft_loss


def labelled_logits(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The logits (N, V) at the batch's N labelled positions (the head computed there only)."""
    return model(batch["input_ids"], labels=batch["labels"], reduction="logits", **model_inputs(batch))


class AsftObjective:
    """What the trainer calls per micro-batch under use_asft_loss: (the ASFT loss, no metrics)."""

    def __init__(self, engine: Any, reference: Any, alpha: float):
        self.engine, self.reference, self.alpha = engine, reference, alpha

    def loss(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The reference pass (no grad) first, then the policy's, as LLaMA-Factory's compute_loss."""
        reference = self.reference.scored(labelled_logits, batch)
        targets = batch["labels"][batch["labels"] != -100]
        return asft_loss(labelled_logits(self.engine, batch), reference, targets, self.alpha)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss(batch), {}

    @torch.no_grad()
    def evaluate(self, loader: Any) -> dict[str, float]:
        """eval_loss: the ASFT loss of each val micro-batch, averaged over all ranks' batches weighted by their rows
        (transformers' evaluation loop repeats a batch's loss per row); rows repeated to fill the ranks, which the
        Loader leaves unlabelled, count for nothing."""
        from pipeline.runtime import dist
        from pipeline.runtime.batches import labelled_rows, lm_batch, to_device

        self.engine.eval()
        total: Any = 0.0  # a float64 device sum, read once at the end (loop.evaluate's reasons)
        rows = 0
        for host in loader:
            real = len(labelled_rows(host["labels"]))  # counted on the host batch
            # every rank runs the forward: ZeRO-3 gathers in it
            total = total + self.loss(to_device(lm_batch(host), self.engine.device)).double() * real
            rows += real
        self.engine.train()
        total, rows = dist.all_sum_unread([total, rows]).tolist()
        return {"eval_loss": total / max(rows, 1.0)}
