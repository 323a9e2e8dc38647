"""Held-out metrics of an rm recipe, base vs tuned (used by pipeline.evaluate.run): every val pair scored by the
reward model at the token transformers pools (pipeline.model.reward), the pairwise loss and accuracy.

The base is the starting model with the recipe's new score head (seeded, untrained): its accuracy is chance's,
which is what training is measured against. The tuned model's loss and accuracy are the trainer's final
eval_loss and eval_accuracy over the same pairs.
"""
from __future__ import annotations

from typing import Any

import torch
from tqdm import tqdm

from pipeline.data.args import DataArgs
from pipeline.model.reward import pairwise_loss, sequence_scores

Scores = tuple[torch.Tensor, torch.Tensor]  # (chosen, rejected) per val pair, in split order


@torch.no_grad()
def split_scores(model: torch.nn.Module, data: DataArgs, *, rank: int = 0, world: int = 1, label: str = "") -> Scores:
    """The scores of every val pair (every rank gets all of them, in split order)."""
    from pipeline.data.loaders import pair_loader
    from pipeline.data.model_tokenizer import recipe_tokenizer
    from pipeline.evaluate.preference import split_columns

    pad = recipe_tokenizer(data).pad_id
    loader = pair_loader(data, "val", rank=0, world_size=1, shuffle=False)
    device = next(model.parameters()).device
    scored: dict[int, list[torch.Tensor]] = {}
    for k in tqdm(range(rank, len(loader), world), desc=f"{label} pairs", unit="batch", disable=rank != 0,
                  leave=False):
        ids = loader.batch(k)["input_ids"].to(device, non_blocking=True)  # the host goes on queueing work
        scored[k] = list(sequence_scores(model(ids), ids, pad).double().chunk(2))
    chosen, rejected = split_columns(scored, 2, world)  # one read for the split, every rank's pairs
    return torch.tensor(chosen, dtype=torch.float64), torch.tensor(rejected, dtype=torch.float64)


def summary(scores: Scores) -> dict[str, Any]:
    """One model's block of metrics.json: the pairwise loss, accuracy (chosen > rejected), the mean score margin."""
    chosen, rejected = scores
    losses, metrics = pairwise_loss(chosen, rejected)
    return {"pairwise_loss": float(losses.mean()), "accuracy": float(metrics["accuracy"].mean()),
            "score_margin": float((chosen - rejected).mean()), "pairs": len(chosen)}
