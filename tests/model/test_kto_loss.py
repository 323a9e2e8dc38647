"""Stage kto's loss against its definition, computed here by hand with Python floats (math module).

The definition is TRL 1.16's KTO term (trl/trainer/kto_trainer.py, KTOTrainer._compute_loss, lines 1442-1483:
`kl = (KL_logps - ref_KL_logps).mean().detach()`, averaged over ranks and `.clamp(min=0)`; chosen losses
`1 - sigmoid(beta * (chosen_logratios - kl))`, rejected `1 - sigmoid(beta * (kl - rejected_logratios))`, weighted by
desirable_weight / undesirable_weight and `nanmean`ed over the batch; rewards `beta * logratios`) as LLaMA-Factory
0.9.5 uses it (src/llamafactory/train/kto/trainer.py, get_batch_loss_metrics: + pref_ftx * mean(-chosen_logps_avg)
/ #chosen * batch size; logs rewards/chosen etc. as sums over counts, and kl)."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.model.preference import FeedbackLogps, KtoConfig, feedback_logps, kl_term, kto_loss, kto_means


def f64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


TAGS = torch.tensor([True, False, True])
POLICY = FeedbackLogps(f64([-3.0, -6.0, -8.0]), f64([-10.0, -9.0, -12.0]), torch.tensor([3, 2, 4]), TAGS)
REFERENCE = FeedbackLogps(f64([-3.5, -5.0, -8.4]), f64([-10.6, -9.1, -11.9]), torch.tensor([3, 2, 4]), TAGS)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_loss_and_metrics_by_hand():
    kl = kl_term(POLICY, REFERENCE)
    assert float(kl) == pytest.approx((0.6 + 0.1 - 0.1) / 3)  # mean of pi_KL - ref_KL
    cfg = KtoConfig(beta=0.5, desirable_weight=1.5, undesirable_weight=0.7, ftx=0.3)
    loss, metrics = kto_loss(POLICY, REFERENCE, kl, cfg)
    z = 0.2  # log-ratios 0.5 (desirable), -1.0 (undesirable), 0.4 (desirable)
    per_example = [1.5 * (1 - sig(0.5 * (0.5 - z))), 0.7 * (1 - sig(0.5 * (z + 1.0))), 1.5 * (1 - sig(0.5 * (0.4 - z)))]
    sft = (3 / 3 + 8 / 4) / 2  # mean NLL per token of the desirable responses
    assert float(loss) == pytest.approx(sum(per_example) / 3 + 0.3 * sft / 2 * 3)  # LLaMA-Factory's rescale
    got = {k: float(v) for k, v in metrics.items()}
    assert got == pytest.approx({"kl": z, "rewards/chosen_sum": 0.5 * 0.5 + 0.5 * 0.4, "logps/chosen_sum": -11.0,
                                 "count/chosen": 2, "rewards/rejected_sum": -0.5, "logps/rejected_sum": -6.0,
                                 "count/rejected": 1})
    assert kto_means(got) == pytest.approx({"kl": z, "rewards/chosen": 0.225, "logps/chosen": -5.5,
                                            "rewards/rejected": -0.5, "logps/rejected": -6.0, "rewards/margins": 0.725})


def test_kl_is_the_given_one_clamped_at_zero_and_gets_no_gradient():
    """The KL passed in (the mean over ranks) is used, not the local one; a negative estimate counts as 0."""
    policy = FeedbackLogps(f64([-2.0, -4.0]).requires_grad_(), f64([-1.0, -1.0]), torch.tensor([1, 1]),
                           torch.tensor([True, False]))
    ref = FeedbackLogps(f64([-2.0, -4.0]), f64([0.0, 0.0]), torch.tensor([1, 1]), torch.tensor([True, False]))
    loss, metrics = kto_loss(policy, ref, -3.0, KtoConfig(beta=0.1))
    assert float(metrics["kl"]) == 0.0 and float(loss.detach()) == pytest.approx(0.5)  # policy = reference, z = 0
    loss, _ = kto_loss(policy, ref, 2.0, KtoConfig(beta=0.1))
    assert float(loss.detach()) == pytest.approx(((1 - sig(0.1 * -2.0)) + (1 - sig(0.1 * 2.0))) / 2)
    loss.backward()
    # d/dx of 1 - s(b (x - z)) is -b s'(.) / 2 for the desirable; + b s'(.) / 2 for the undesirable
    slope = 0.1 * sig(-0.2) * (1 - sig(-0.2)) / 2
    assert policy.target.grad.tolist() == pytest.approx([-slope, slope])


def test_one_sided_batches_log_only_their_side_and_no_ftx_without_desirable_rows():
    only_bad = FeedbackLogps(f64([-2.0]), f64([-1.0]), torch.tensor([2]), torch.tensor([False]))
    loss, metrics = kto_loss(only_bad, only_bad, 0.0, KtoConfig(ftx=1.0))
    assert float(loss) == pytest.approx(0.5)  # no desirable response: no sft term (LLaMA-Factory's guard)
    means = kto_means({k: float(v) for k, v in metrics.items()})
    assert "rewards/chosen" not in means and "rewards/margins" not in means and means["rewards/rejected"] == 0.0
    assert kto_means({"loss": 1.0}) == {"loss": 1.0}  # a dpo record is left alone


def test_feedback_logps_splits_the_examples_from_their_kl_sequences():
    nll = torch.tensor([[1.0, 2.0], [0.5, 0.0], [3.0, 0.0], [0.25, 0.25]])  # 2 examples, then their 2 KL sequences
    labels = torch.tensor([[5, 6], [7, -100], [8, -100], [9, 9]])
    out = feedback_logps(nll, labels, torch.tensor([1, 0]))
    assert out.target.tolist() == [-3.0, -0.5] and out.kl.tolist() == [-3.0, -0.5]
    assert out.tokens.tolist() == [2, 1] and out.desirable.tolist() == [True, False]
