"""compute_accuracy: token accuracy of the evaluation during training, as LLaMA-Factory computes it.

LLaMA-Factory 0.9.5 (src/llamafactory/train/sft/metric.py, ComputeAccuracy.__call__, lines 78-81; the argmax by
eval_logit_processor, lines 47-58) scores each example on its own, then averages over examples:

    for i in range(len(preds)):
        pred, label = preds[i, :-1], labels[i, 1:]
        label_mask = label != IGNORE_INDEX
        self.score_dict["accuracy"].append(np.mean(pred[label_mask] == label[label_mask]))

that is the mean over examples of (argmax predictions equal to the next token) / (labelled tokens of the
example), on the shifted labels: the prediction at position t is checked against the token at t + 1. Our labels
are already shifted (labels[:, t] is the target after position t), so the prediction at t is checked against
labels[:, t]. transformers gathers the predictions of every rank and drops the rows its sampler repeated to fill
the last batch before the metric runs; here each rank sums its examples' accuracies and counts them, and the
sums are added over ranks (pipeline.train.loop.evaluate); the rows repeated to fill ranks carry no labels and
count for nothing.

Two differences, both where LLaMA-Factory's value would depend on how rows were batched rather than on the
examples: a packed row (packing, neat_packing) counts each of its examples, where LLaMA-Factory, whose eval split
is packed too, scores the row as one; an example with no labelled token is not counted (LLaMA-Factory's mean of
nothing would make the whole accuracy NaN; the data layer drops such examples anyway).
"""
from __future__ import annotations

from typing import Any

from pipeline.data.tokenize import IGNORE


def example_accuracy_sums(labels: Any, predicted: Any, examples: Any | None = None) -> tuple[Any, int]:
    """(sum over examples of each example's token accuracy, number of examples scored) for one batch: the sum a
    float64 tensor on predicted's device, unread (the loop reads its total once, at the end of the evaluation).

    labels (B, T) shifted, -100 where nothing is scored, and examples (B, T), which example of its row each position
    belongs to (a packed batch's segment numbers; None when a row is one example): the host batch's, so that which
    example each labelled position belongs to, and how many there are, is found without a device read (torch.unique
    and max would each sync); predicted: the argmax token at each labelled position, in labels[labels != -100] order
    (what the model's forward returns with predict=True), on the device.
    """
    import torch

    keep = labels != IGNORE
    row = torch.arange(labels.shape[0])[:, None].expand_as(labels)[keep]
    group = row if examples is None else row * (int(examples.max()) + 2) + (examples[keep] + 1)
    _, inverse = torch.unique(group, return_inverse=True)
    count = torch.bincount(inverse).double()
    device = predicted.device
    hits = torch.zeros(count.shape, dtype=torch.float64, device=device).index_add_(
        0, inverse.to(device, non_blocking=True), (predicted == labels[keep].to(device, non_blocking=True)).double())
    return (hits / count.to(device, non_blocking=True)).sum(), int(count.numel())
