"""use_dft_loss / use_eaft_loss in the model's loss: LLaMA-Factory's DFT and EAFT weighted cross-entropy, chunked
or plain, packed or not, summed over micro-batches.

Golden values: LLaMA-Factory's dft_loss_func / eaft_loss_func (src/llamafactory/train/trainer_utils.py, the same
in 0.9.5) re-written below from its source and applied to the full logits of the same model, and hand values.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model import head_loss
from pipeline.model.gpt import GPTModel
from pipeline.model.head_loss import TokenWeight
from tests.model.test_head_loss import lora_model
from tests.model import test_label_smoothing
from tests.model.test_packed_attention import _examples, _pack

CFG = test_label_smoothing.CFG  # a small vocabulary: fast full logits
batch = test_label_smoothing.batch  # its fixture: a prompt, a padded row, the last position's EOS target
ALPHA = 0.5  # eaft_alpha other than its default 1, so that the power is exercised
WEIGHTS = {"dft": TokenWeight("dft"), "eaft": TokenWeight("eaft", ALPHA)}


def llama_factory_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str, alpha: float = ALPHA,
                       num_items_in_batch: int | None = None) -> torch.Tensor:
    """LLaMA-Factory's loss as its sft trainer's compute_loss_func computes it over a causal LM's logits.

    transformers' labels are ours (already shifted) moved right one column and the logits one position longer (the
    extra position's target is the pad, never scored), as Trainer hands them to compute_loss_func. Then, as
    dft_loss_func / eaft_loss_func: fp32 logits, labels padded with -100 and shifted, per-token cross-entropy of the
    labelled positions times a weight taken under no_grad (DFT: exp(-CE); EAFT: (entropy of the softmax over the
    top-20 logits / 3) ** alpha), summed and divided by num_items_in_batch, else the mean."""
    logits = torch.cat([logits, logits[:, -1:]], dim=1).float()
    hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)
    shift_labels = F.pad(hf_labels, (0, 1), value=-100)[..., 1:].reshape(-1)
    flat = logits.reshape(-1, logits.size(-1))
    per_token = F.cross_entropy(flat, shift_labels, ignore_index=-100, reduction="none")
    valid = shift_labels != -100
    losses = per_token[valid]
    with torch.no_grad():
        if kind == "dft":
            weight = torch.exp(-losses)
        else:
            top, _ = torch.topk(flat[valid].detach(), k=20, dim=-1)
            log_p = top - torch.logsumexp(top, dim=-1, keepdim=True)
            weight = torch.pow(-(torch.exp(log_p) * log_p).sum(dim=-1) / 3.0, alpha)
    weighted = losses * weight
    return weighted.sum() / num_items_in_batch if num_items_in_batch is not None else weighted.mean()


def identity_head(width: int, trained: bool) -> nn.Linear:
    """hidden row = logits, so the hidden gradient is the logits' gradient."""
    head = nn.Linear(width, width, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(width))
    return head.requires_grad_(trained)


@pytest.mark.parametrize("trained_head", [False, True])  # frozen: the row-block path; trained: F.cross_entropy
def test_hand_values(trained_head):
    """DFT: logits ln(1, 2, 1), p = (1/4, 1/2, 1/4), target 1: loss p_1 x ln 2 = ln 2 / 2, gradient p_1 (p - one-hot)
    = (1/8, -1/4, 1/8). EAFT: 20 equal logits, H = ln 20: loss (ln 20 / 3) ** alpha x ln 20, gradient
    (ln 20 / 3) ** alpha (1/20 - one-hot). The evaluation path with compute_accuracy gives the same sum."""
    cases = [("dft", [0.0, math.log(2.0), 0.0], 1, math.log(2) / 2, [0.125, -0.25, 0.125])]
    w = (math.log(20) / 3) ** ALPHA
    cases.append(("eaft", [0.0] * 20, 3, w * math.log(20), [w * (0.05 - (k == 3)) for k in range(20)]))
    for kind, row, target, want_loss, want_grad in cases:
        head = identity_head(len(row), trained_head)
        hidden = torch.tensor([row], requires_grad=True)
        assert head_loss.fused_applies(head, hidden) is not trained_head
        loss = head_loss.head_cross_entropy_sum(head, hidden, torch.tensor([target]), token_weight=WEIGHTS[kind])
        loss.backward()
        assert loss.item() == pytest.approx(want_loss, rel=1e-6), kind
        assert hidden.grad[0].tolist() == pytest.approx(want_grad, rel=1e-6, abs=1e-7), kind
        total, predicted = head_loss.head_cross_entropy_sum_argmax(head, hidden.detach(), torch.tensor([target]),
                                                                   token_weight=WEIGHTS[kind])
        assert total.item() == pytest.approx(want_loss, rel=1e-6) and predicted.tolist() == [row.index(max(row))]


def peaked(model: GPTModel) -> GPTModel:
    """A random model's top-20 logits are nearly uniform (EAFT's weight ~1 everywhere): a head 3x larger spreads them,
    so that the weights differ from token to token and from 1."""
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    return model


@pytest.mark.parametrize("kind", ["dft", "eaft"])
@pytest.mark.parametrize("finetuning,dtype", [("lora", torch.float32), ("lora", torch.bfloat16),
                                              ("full", torch.float32)])
def test_model_loss_and_gradients_equal_llama_factory_on_full_logits(kind, finetuning, dtype, batch, monkeypatch):
    """LoRA (frozen head: row blocks, fp32 and bf16) and full (trained head: the plain path): the mean loss and every
    trained gradient equal those of LLaMA-Factory's loss over the same model's full logits (bf16: the logits in
    fp32, as LLaMA-Factory's logits.float() and our row blocks take them). Blocks of 16 rows: several per batch."""
    monkeypatch.setattr(head_loss, "CHUNK_ROWS", 16)
    model = lora_model(CFG, dtype) if finetuning == "lora" else GPTModel(CFG, seed=4).to(dtype)
    peaked(model)
    ids, labels = batch
    loss = model(ids, labels=labels, token_weight=WEIGHTS[kind])
    loss.backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    golden = llama_factory_loss(model(ids), labels, kind)
    golden.backward()
    assert loss.item() == pytest.approx(golden.item(), rel=1e-6 if dtype == torch.float32 else 1e-5)
    assert abs(loss.item() - model(ids, labels=labels).item()) > 0.03 * loss.item()  # not vacuous: the weights
    for name, p in model.named_parameters():
        if p.requires_grad:
            tol = dict(rtol=1e-4, atol=1e-7) if dtype == torch.float32 else dict(rtol=5e-2, atol=1e-3)
            torch.testing.assert_close(ours[name].float(), p.grad.float(), **tol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("kind", ["dft", "eaft"])
def test_summed_micro_batches_equal_llama_factory_with_num_items_in_batch(kind, batch):
    """Trainer passes num_items_in_batch (the labelled tokens of the whole update) to compute_loss_func: the sum of
    its per-micro-batch values equals our summed losses divided by the update's count (the loop's step_scale)."""
    model = peaked(GPTModel(CFG, seed=5))
    ids, labels = batch
    parts = [(ids[:1], labels[:1]), (ids[1:], labels[1:])]
    with torch.no_grad():
        sums = [model(x, labels=y, reduction="sum", token_weight=WEIGHTS[kind]) for x, y in parts]
        total = sum(count for _, count in sums)
        golden = sum(llama_factory_loss(model(x), y, kind, num_items_in_batch=total) for x, y in parts)
    assert sum(s.item() for s, _ in sums) / total == pytest.approx(golden.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["dft", "eaft"])
def test_packed_examples_equal_unpacked(kind):
    """neat_packing: each example's weighted loss in a packed row equals the example alone (and LLaMA-Factory's)."""
    model = peaked(lora_model(CFG, torch.float32, seed=6))
    examples = _examples(CFG.vocab_size)
    ids, labels, seg, pos = _pack(examples)
    ids = ids.masked_fill(seg == len(examples), 0)  # _pack pads with GPT-2's EOS id, outside this vocabulary
    for k, (x, y) in enumerate(examples):
        alone, count = model(x[None], labels=y[None], reduction="sum", token_weight=WEIGHTS[kind])
        only_k = torch.where(seg == k, labels, torch.full_like(labels, -100))
        packed, count_packed = model(ids, labels=only_k, segment_ids=seg, position_ids=pos, reduction="sum",
                                     token_weight=WEIGHTS[kind])
        assert count_packed == count
        assert packed.item() == pytest.approx(alone.item(), rel=1e-5), f"example {k}"
        with torch.no_grad():
            golden = llama_factory_loss(model(x[None]), y[None], kind).item() * count
        assert alone.item() == pytest.approx(golden, rel=1e-5)


def test_one_loss_at_a_time():
    """label smoothing and a token weight are two losses (LLaMA-Factory's compute_loss_func replaces the label
    smoother); the preference losses' per-token log-probabilities take neither."""
    model = GPTModel(CFG, seed=1)
    ids = torch.randint(0, CFG.vocab_size, (1, 8))
    with pytest.raises(ValueError, match="two losses"):
        model(ids, labels=ids, label_smoothing=0.1, token_weight=WEIGHTS["dft"])
    with pytest.raises(ValueError, match="need reduction='mean' or 'sum'"):
        model(ids, labels=ids, reduction="none", token_weight=WEIGHTS["eaft"])
