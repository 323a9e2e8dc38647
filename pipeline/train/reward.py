"""The reward-model objective (stage rm): each pair's two scores, the pairwise loss, accuracy, for the loop.

A batch of B pairs is one forward of 2B sequences (the chosen, then the rejected: pipeline.data.pairs); the
model is a reward model (pipeline.model.reward: the score head, the token transformers pools, the loss). No
reference model: LLaMA-Factory's PairwiseTrainer compares the two scores only.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

from pipeline.model.reward import pairwise_loss, sequence_scores
from pipeline.train.preference import evaluate_pairs, metric_means


class RewardObjective:
    """What the trainer calls per micro-batch for stage rm: (mean loss over the pairs, metric means)."""

    def __init__(self, engine: Any, pad_id: int):
        self.engine = engine
        self.pad_id = pad_id  # batches are padded with it and merge writes it as pad_token_id: the pooled token

    def scores(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses and metrics (accuracy, scores/chosen, scores/rejected)."""
        ids = batch["input_ids"]
        # a right-padded training batch comes without its mask (pipeline.runtime.batches.lm_batch): the same forward, no device read
        scores = sequence_scores(self.engine(ids, attention_mask=batch.get("attention_mask")), ids, self.pad_id)
        chosen, rejected = scores.chunk(2)
        return pairwise_loss(chosen, rejected)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, metrics = self.scores(batch)
        return losses.mean(), metric_means(metrics)

    def evaluate(self, loader: Any) -> dict[str, float]:
        """eval_loss, eval_accuracy (LLaMA-Factory's name), eval_scores/... over the whole val split."""
        return evaluate_pairs(self.engine, loader, self.scores)
