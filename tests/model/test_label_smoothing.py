"""label_smoothing_factor in the model's loss: transformers' LabelSmoother, chunked or plain, packed or not.

Golden values: transformers.trainer_pt_utils.LabelSmoother applied to the full logits of the same model (as
Trainer.compute_loss applies it to a causal LM: shift_labels=True), and hand values on a 3-token vocabulary.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pipeline.model import head_loss
from pipeline.model.config import PRESETS
from pipeline.model.gpt import GPTModel
from pipeline.model.lora import apply_lora
from tests.model.test_head_loss import lora_model
from tests.model.test_packed_attention import _examples, _pack

transformers_utils = pytest.importorskip("transformers.trainer_pt_utils")
EPS = 0.1
CFG = PRESETS["tiny"].replace(vocab_size=256, context_length=64)  # a small vocabulary: fast full logits


def label_smoother(logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch: int | None = None) -> torch.Tensor:
    """transformers' loss for a causal LM: our labels (already shifted) moved right one column, the logits one
    position longer (its last prediction is dropped by the shift), as Trainer hands them to LabelSmoother."""
    hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
    hf_logits = torch.cat([logits, logits[:, -1:]], dim=1)
    smoother = transformers_utils.LabelSmoother(epsilon=EPS)
    return smoother({"logits": hf_logits}, hf_labels, shift_labels=True, num_items_in_batch=num_items_in_batch)


@pytest.mark.parametrize("trained_head", [False, True])  # frozen: the row-block path; trained: F.cross_entropy
def test_hand_values_on_a_three_token_vocabulary(trained_head):
    """Logits ln(1, 2, 1): p = (1/4, 1/2, 1/4), target 1. Loss (1 - eps) ln 2 + eps (ln 4 + ln 2 + ln 4) / 3;
    gradient with respect to the logits p - (1 - eps) one-hot - eps / 3."""
    head = nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(3))  # hidden row = logits, so the hidden gradient is the logits' gradient
    head.weight.requires_grad_(trained_head)
    hidden = torch.tensor([[0.0, math.log(2.0), 0.0]], requires_grad=True)
    assert head_loss.fused_applies(head, hidden) is not trained_head
    loss = head_loss.head_cross_entropy_sum(head, hidden, torch.tensor([1]), EPS)
    loss.backward()
    assert loss.item() == pytest.approx((1 - EPS) * math.log(2) + EPS * 5 * math.log(2) / 3, rel=1e-6)
    want = [0.25 - EPS / 3, 0.5 - (1 - EPS) - EPS / 3, 0.25 - EPS / 3]
    assert hidden.grad[0].tolist() == pytest.approx(want, rel=1e-6)
    total, predicted = head_loss.head_cross_entropy_sum_argmax(head, hidden.detach(), torch.tensor([1]), EPS)
    assert total.item() == pytest.approx(loss.item(), rel=1e-6) and predicted.tolist() == [1]  # compute_accuracy


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (3, 40))
    labels = ids.roll(-1, 1)
    labels[:, :12] = -100  # a prompt
    labels[1, 30:] = -100  # a shorter row: padding
    labels[:, -1] = 8  # the last position's target (an EOS our inputs never hold)
    return ids, labels


@pytest.mark.parametrize("finetuning,dtype", [("lora", torch.float32), ("lora", torch.bfloat16),
                                              ("full", torch.float32)])
def test_model_loss_and_gradients_equal_label_smoother_on_full_logits(finetuning, dtype, batch):
    """LoRA (frozen head: row blocks, fp32 and bf16) and full (trained head: F.cross_entropy's label_smoothing): the
    mean loss and every trained gradient equal those of LabelSmoother over the same model's full logits (bf16: the
    logits in fp32, as both the row blocks and the plain path take them)."""
    model = lora_model(CFG, dtype) if finetuning == "lora" else GPTModel(CFG, seed=4).to(dtype)
    ids, labels = batch
    loss = model(ids, labels=labels, label_smoothing=EPS)
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    golden = label_smoother(model(ids).float(), labels)
    golden.backward()
    assert loss.item() == pytest.approx(golden.item(), rel=1e-6 if dtype == torch.float32 else 1e-5)
    assert abs(loss.item() - model(ids, labels=labels).item()) > 1e-4 * loss.item()  # not vacuous: 100x the rel
    for name, p in model.named_parameters():
        if p.requires_grad:
            tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-3)
            torch.testing.assert_close(ours[name].float(), p.grad.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_summed_micro_batches_equal_label_smoother_with_num_items_in_batch(batch):
    """Trainer passes num_items_in_batch (the labelled tokens of the whole update) to LabelSmoother: the sum of its
    per-micro-batch values equals our summed losses divided by the update's count (the loop's step_scale)."""
    model = GPTModel(CFG, seed=5)
    ids, labels = batch
    parts = [(ids[:1], labels[:1]), (ids[1:], labels[1:])]
    with torch.no_grad():
        sums = [model(x, labels=y, reduction="sum", label_smoothing=EPS) for x, y in parts]
        total = sum(count for _, count in sums)
        golden = sum(label_smoother(model(x), y, num_items_in_batch=total) for x, y in parts)
    assert sum(s.item() for s, _ in sums) / total == pytest.approx(golden.item(), rel=1e-6)


def test_packed_examples_equal_unpacked_with_smoothing():
    """neat_packing: each example's smoothed loss (and its gradient) in a packed row equals the example alone."""
    model = GPTModel(CFG, seed=6)
    apply_lora(model, "all", rank=4, alpha=8, seed=2)
    examples = _examples(CFG.vocab_size)
    ids, labels, seg, pos = _pack(examples)
    ids = ids.masked_fill(seg == len(examples), 0)  # _pack pads with GPT-2's EOS id, outside this vocabulary
    for k, (x, y) in enumerate(examples):
        alone, count = model(x[None], labels=y[None], reduction="sum", label_smoothing=EPS)
        only_k = torch.where(seg == k, labels, torch.full_like(labels, -100))
        packed, count_packed = model(ids, labels=only_k, segment_ids=seg, position_ids=pos, reduction="sum",
                                     label_smoothing=EPS)
        assert count_packed == count
        assert packed.item() == pytest.approx(alone.item(), rel=1e-5), f"example {k}"
        with torch.no_grad():
            assert alone.item() == pytest.approx(label_smoother(model(x[None]), y[None]).item() * count, rel=1e-5)
