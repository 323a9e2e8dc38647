"""Host batches and device batches: what the training loop and evaluation (during training and the eval stage)
ask of a loader's batch on the host, the copy they run the model on, and the one read of device values
(host_floats) where a number is needed on the host.

Why on the host: every read of a device value (float(t), int(t), t.item(), bool(t), t.tolist()) stops the host until
the device has run everything queued. Token and row counts and the right-padding question are the same integers and
booleans on the loader's CPU tensors, free there; the device batch (to_device) is only computed on.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence


def to_device(batch: Mapping[str, Any], device: Any) -> dict[str, Any]:
    """The host batch's tensors on `device` (asynchronous copies: the host goes on queueing work)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def lm_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    """What a training objective's forward needs of a host batch: all of it, less an attention_mask the model would
    drop (every objective: pt / sft, dpo, kto and rm read the mask as batch.get("attention_mask")).

    Why: right padding needs no mask (pipeline.model.gpt._attention_mask returns None for it), but the model can
    only tell by reading the mask, a device sync in every forward. Read here on the host batch, the answer is the
    same and free; without the mask the model runs exactly the forward it ran after dropping it."""
    from pipeline.model.gpt import right_padded

    mask = batch.get("attention_mask")
    if mask is None or not right_padded(mask):
        return dict(batch)
    return {k: v for k, v in batch.items() if k != "attention_mask"}


def trained_tokens(batch: Mapping[str, Any]) -> int:
    """The labelled tokens of a micro-batch, counted on the host batch (the loader's CPU tensors, before to_device:
    the same integers as on the device, without a device read)."""
    return int((batch["labels"] != -100).sum())


def labelled_rows(labels: Any) -> Any:
    """The indices of the rows holding a labelled token, found on the host batch's labels (the Loader leaves the rows
    it repeats to fill the ranks unlabelled, and evaluation counts them for nothing). Why indices, not the boolean
    mask: x[mask] on a device tensor syncs to learn its size, x[indices] does not, and both select the same rows in
    the same order, so the sums over them are the same to the bit."""
    import torch

    return torch.nonzero((labels != -100).any(dim=-1)).flatten()


def host_floats(values: Sequence[Any]) -> list[float | None]:
    """Python floats of `values` (floats, None, or 0-dim tensors on the device), the tensors read in ONE transfer.

    Why: every read of a device value (float(t), t.item(), t.tolist()) stops the host until the device has run all
    it was given; the next micro-batch's kernels cannot be queued meanwhile, and at small batches the GPU idles.
    The training loop keeps its per-step numbers on the device and reads them here at log and save points. Widening to
    float64 is exact (float32, bfloat16, float16), so each value is what float(t) gives."""
    import torch

    out: list[Any] = [v if v is None or isinstance(v, torch.Tensor) else float(v) for v in values]
    where = [i for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
    if where:
        read = torch.stack([out[i].detach().reshape(()).double() for i in where]).tolist()
        for i, value in zip(where, read):
            out[i] = value
    return out
