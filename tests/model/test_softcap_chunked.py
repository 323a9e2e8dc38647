"""Gemma 2's final logit softcap inside the chunked head loss (pipeline.model.head_loss).

Golden values: transformers' Gemma2ForCausalLM (5.24): its loss on labels (forward caps the logits as
cap * tanh(logits / cap), modeling_gemma2.py Gemma2ForCausalLM.forward, then ForCausalLMLoss) and, for the pairs
stages, log_softmax of its capped logits gathered at the targets, re-typed here. Each test also makes the
SoftcappedHead's own forward raise during the loss: the full (tokens x vocab) logits must never be formed. Before
the change every loss went through that forward (head_loss.direct_weight took a plain Linear only), so each test
failed there.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.model import head_loss
from pipeline.model.head_loss import SoftcappedHead
from pipeline.model.weights import load_model
from pipeline.train.preference import token_nll
from pipeline.model.preference import pair_logps
from tests.acceptance.harness import random_model
from tests.model.test_gemma import GEMMA2

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """(ours, transformers') tiny fp32 Gemma 2 (caps small enough to bind), ours from its save_pretrained folder."""
    ref = random_model(transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**GEMMA2))
    path = tmp_path_factory.mktemp("gemma2")
    ref.save_pretrained(path)
    return load_model(path), ref


def _frozen_head(model: torch.nn.Module) -> torch.nn.Module:
    """As under LoRA / freeze-tuning: the (tied) embedding and head frozen, everything else trains."""
    for name, p in model.named_parameters():
        p.requires_grad_("embed" not in name and "lm_head" not in name)
        p.grad = None
    return model


@pytest.fixture
def no_full_logits(monkeypatch):
    """The softcapped head's forward raises: only the row blocks may compute its logits. Several blocks per row."""
    def refuse(self, x):
        raise AssertionError("the full softcapped logits were formed")
    monkeypatch.setattr(SoftcappedHead, "forward", refuse)
    monkeypatch.setattr(head_loss, "CHUNK_ROWS", 8)


def _batch(seed: int, shape: tuple[int, int] = (2, 14)) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, GEMMA2["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))
    return ids, torch.cat([ids[:, 1:], torch.full((shape[0], 1), -100)], 1)


def test_training_loss_and_gradients_are_transformers_through_the_row_blocks(gemma2, no_full_logits, monkeypatch):
    """The sft / pt loss of a frozen softcapped head: transformers' loss and its gradients (fp32, to rounding), with
    no full logits; and the same as our unchunked path (plain_head, the head's own forward) to rounding."""
    ours, ref = (_frozen_head(m.train()) for m in gemma2)
    ref.eval()  # no dropout in either (drop_rate 0 in ours)
    x, labels = _batch(0)
    loss = ours(x, labels=labels)
    loss.backward()
    want = ref(x, labels=x).loss
    want.backward()
    assert torch.allclose(loss, want, atol=1e-5), (loss, want)
    pairs = [(ours.norm.weight, ref.model.norm.weight),
             (ours.layers[0].self_attn.q_proj.weight, ref.model.layers[0].self_attn.q_proj.weight),
             (ours.layers[3].mlp.down_proj.weight, ref.model.layers[3].mlp.down_proj.weight)]
    for mine, theirs in pairs:
        assert torch.allclose(mine.grad, theirs.grad, atol=1e-5, rtol=1e-4), (mine.grad - theirs.grad).abs().max()
    chunked = [p.grad.clone() for p in ours.parameters() if p.requires_grad]
    monkeypatch.undo()  # the head's own forward again, for the unchunked path
    ours.zero_grad()
    with head_loss.plain_head():
        plain = ours(x, labels=labels)
        plain.backward()
    assert torch.allclose(loss, plain, atol=1e-6), (loss, plain)
    for a, p in zip(chunked, (p for p in ours.parameters() if p.requires_grad)):
        assert torch.allclose(a, p.grad, atol=1e-6, rtol=1e-5), (a - p.grad).abs().max()


def test_eval_loss_and_argmax_are_of_the_capped_logits(gemma2, no_full_logits):
    """Evaluation (predict: the summed loss and each position's argmax, compute_accuracy) through the row blocks:
    transformers' summed cross-entropy of its capped logits and their argmax."""
    ours, ref = (m.eval() for m in gemma2)
    x, labels = _batch(1)
    with torch.no_grad():
        total, count, predicted = ours(x, labels=labels, reduction="sum", predict=True)
        logits = ref(x).logits[:, :-1].reshape(-1, GEMMA2["vocab_size"])
    targets = x[:, 1:].reshape(-1)
    want = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    assert count == targets.numel() and torch.allclose(total, want, rtol=1e-5), (total, want)
    assert torch.equal(predicted, logits.argmax(-1))


def test_dpo_pair_logps_are_transformers_log_probs_of_the_capped_logits(gemma2, no_full_logits):
    """The pairs stages' log-probabilities (pipeline.train.preference.token_nll -> pair_logps, as dpo / orpo / simpo /
    kto read them; ppo and eval's preference metrics call the same reduction="none" forward): the policy's with
    gradients and the no-grad reference's are both transformers' sum of log_softmax(capped logits) at the targets,
    and bitwise each other (DPO's first step is exactly ln 2)."""
    ours, ref = _frozen_head(gemma2[0].eval()), gemma2[1].eval()
    x, labels = _batch(2, (4, 11))  # two pairs: rows 0-1 chosen, 2-3 rejected
    labels[:, :4] = -100  # the prompt is not scored
    batch = {"input_ids": x, "labels": labels, "attention_mask": torch.ones_like(x)}
    policy = pair_logps(token_nll(ours, batch), labels)
    with torch.no_grad():
        reference = pair_logps(token_nll(ours, batch), labels)
        log_p = torch.log_softmax(ref(x).logits.float(), -1)
    scored = labels != -100
    want = (log_p.gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * scored).sum(-1)
    got = torch.cat([policy.chosen, policy.rejected])
    assert torch.allclose(got, want, atol=1e-5), (got, want)
    assert torch.equal(torch.cat([reference.chosen, reference.rejected]), got.detach())
    got.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.requires_grad)
