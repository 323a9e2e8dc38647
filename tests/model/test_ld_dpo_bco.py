"""LD-DPO (ld_alpha) and the BCO term (pref_bco_weight) against LLaMA-Factory 0.9.5's and trl 0.24's formulas,
re-typed here on hand-made per-token log-probabilities:

- LD-DPO: llamafactory/train/trainer_utils.py:592-636 (get_batch_logps: the public part by position, first scored
  position + the pair's shorter length; the rest x ld_alpha), the policy's only (train/dpo/trainer.py:231-233);
- BCO: train/dpo/trainer.py:168-185 (bco_loss) and :210-214 ((loss + w bco) / (1 + w)), its baseline trl 0.24's
  RunningMoments.update (trl/trainer/utils.py:472-498) with get_global_statistics (:518-536) across ranks.
The whole path through the CLI: tests/acceptance/test_dpo_ld_bco_cli.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.preference import PairLogps, PrefConfig, pair_logps, preference_loss
from pipeline.train.preference import BcoBaseline, PreferenceObjective

# two pairs (2B = 4 rows, chosen then rejected), per-token NLL in the frame of their labels; -100 = not scored
LABELS = torch.tensor([[-100, -100, 5, 6, 7, -100],     # chosen 0: 3 tokens
                       [-100, 5, 6, 7, 8, 9],           # chosen 1: 5 tokens
                       [-100, -100, 5, 6, -100, -100],  # rejected 0: 2 tokens
                       [-100, 5, 6, 7, -100, -100]])    # rejected 1: 3 tokens
NLL = torch.tensor([[0.0, 0.0, 1.0, 2.0, 4.0, 0.0],
                    [0.0, 0.5, 1.5, 2.5, 3.5, 4.5],
                    [0.0, 0.0, 3.0, 1.0, 0.0, 0.0],
                    [0.0, 2.0, 2.0, 6.0, 0.0, 0.0]], dtype=torch.float64)


def lf_ld_logps(nll: torch.Tensor, labels: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """get_batch_logps's ld_alpha branch (trainer_utils.py:614-632) on per-token log-probs -nll."""
    per_token, loss_mask = -nll, labels != -100
    valid = loss_mask.sum(-1)
    n = labels.shape[0] // 2
    shorter = torch.min(valid[:n], valid[n:])
    public = torch.argmax(loss_mask.int(), dim=1) + torch.cat([shorter, shorter])
    ld_mask = torch.arange(labels.shape[-1]).expand_as(per_token) < public.unsqueeze(1)
    return (per_token * (ld_mask * loss_mask)).sum(-1) + ld_alpha * (per_token * (~ld_mask * loss_mask)).sum(-1)


def test_ld_alpha_counts_the_tokens_past_the_shorter_response_alpha_times():
    plain = pair_logps(NLL, LABELS)
    ld = pair_logps(NLL, LABELS, ld_alpha=0.25)
    # by hand: pair 0 shares 2 tokens: chosen -(1 + 2) - 0.25 * 4; rejected -(3 + 1) (the shorter: all public);
    # pair 1 shares 3: chosen -(0.5 + 1.5 + 2.5) - 0.25 * (3.5 + 4.5); rejected -(2 + 2 + 6)
    assert ld.chosen.tolist() == [-4.0, -6.5] and ld.rejected.tolist() == [-4.0, -10.0]
    want = lf_ld_logps(NLL, LABELS, 0.25)
    assert torch.equal(torch.cat([ld.chosen, ld.rejected]), want)
    assert torch.equal(ld.chosen_tokens, plain.chosen_tokens) and ld.rejected_tokens.tolist() == [2, 3]
    one = pair_logps(NLL, LABELS, ld_alpha=1.0)  # alpha 1: the plain sums
    assert torch.equal(one.chosen, plain.chosen) and torch.equal(one.rejected, plain.rejected)


def test_ld_logps_are_averaged_over_every_scored_token_for_the_averaged_losses():
    """LF divides the weighted sum by valid_length, the full count (dpo/trainer.py:234-235)."""
    ld = pair_logps(NLL, LABELS, ld_alpha=0.25)
    cfg = PrefConfig(loss="simpo", beta=2.0, gamma=0.5, ld_alpha=0.25)
    losses, metrics = preference_loss(ld, None, cfg)
    avg_c, avg_r = [-4.0 / 3, -6.5 / 5], [-4.0 / 2, -10.0 / 3]
    assert metrics["logps/chosen"].tolist() == pytest.approx(avg_c, rel=1e-12)
    for i in range(2):  # SimPO, LF's simpo_loss (dpo/trainer.py:160-166)
        want = -math.log(1 / (1 + math.exp(-(2.0 * ((avg_c[i] - avg_r[i]) - 0.5 / 2.0)))))
        assert losses[i].item() == pytest.approx(want, rel=1e-12)


POLICY = PairLogps(torch.tensor([-3.0, -7.5], dtype=torch.float64), torch.tensor([-5.0, -6.0], dtype=torch.float64),
                   torch.tensor([3, 5]), torch.tensor([4, 2]))
REFERENCE = PairLogps(torch.tensor([-4.0, -7.0], dtype=torch.float64), torch.tensor([-4.5, -6.5], dtype=torch.float64),
                      torch.tensor([3, 5]), torch.tensor([4, 2]))


def lf_bco(pi: PairLogps, ref: PairLogps, beta: float, delta: float) -> torch.Tensor:
    """bco_loss (dpo/trainer.py:175-184) given the running mean delta."""
    chosen, rejected = beta * (pi.chosen - ref.chosen), beta * (pi.rejected - ref.rejected)
    return -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))


def trl_dpo(loss: str, pi: PairLogps, ref: PairLogps, beta: float) -> torch.Tensor:
    """trl's dpo_loss for the three reference losses (ipo on LF's length-averaged log-probs)."""
    if loss == "ipo":
        pi, ref = (PairLogps(p.chosen / p.chosen_tokens, p.rejected / p.rejected_tokens, p.chosen_tokens,
                             p.rejected_tokens) for p in (pi, ref))
    h = (pi.chosen - pi.rejected) - (ref.chosen - ref.rejected)
    return {"sigmoid": -F.logsigmoid(beta * h), "hinge": torch.relu(1 - beta * h),
            "ipo": (h - 1 / (2 * beta)) ** 2}[loss]


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_bco_term_is_weighted_into_the_reference_losses(loss):
    beta, w = 0.5, 0.3
    seen: list[float] = []

    def baseline(batch_mean: torch.Tensor) -> float:
        seen.append(float(batch_mean))
        return 0.2

    cfg = PrefConfig(loss=loss, beta=beta, bco_weight=w, ftx=0.7)
    losses, metrics = preference_loss(POLICY, REFERENCE, cfg, baseline)
    pi, ref = POLICY, REFERENCE
    if loss == "ipo":
        pi, ref = POLICY.averaged(), REFERENCE.averaged()
    rewards = torch.cat([beta * (pi.chosen - ref.chosen), beta * (pi.rejected - ref.rejected)])
    assert seen == [pytest.approx(float(rewards.mean()), rel=1e-12)]  # the batch's mean reward, both sides
    sft = -POLICY.chosen / POLICY.chosen_tokens  # pref_ftx after the re-weighting (dpo/trainer.py:300-302)
    want = (trl_dpo(loss, POLICY, REFERENCE, beta) + w * lf_bco(pi, ref, beta, 0.2)) / (1 + w) + 0.7 * sft
    assert torch.allclose(losses, want, rtol=1e-12, atol=0)
    assert metrics["rewards/chosen"].tolist() == pytest.approx((beta * (pi.chosen - ref.chosen)).tolist())


def test_a_bco_weight_without_a_baseline_or_at_lf_s_threshold():
    with pytest.raises(ValueError, match="baseline"):
        preference_loss(POLICY, REFERENCE, PrefConfig(bco_weight=0.5))
    plain, _ = preference_loss(POLICY, REFERENCE, PrefConfig())
    tiny, _ = preference_loss(POLICY, REFERENCE, PrefConfig(bco_weight=1e-7))  # LF: bco_gemma > 1e-6
    assert torch.equal(plain, tiny)


def trl_running_means(batches: list[list[float]]) -> list[float]:
    """trl 0.24 RunningMoments (mean 0, var 1, count 1e-24) fed each step's per-rank scalars: get_global_statistics
    over ranks is the mean and count of those scalars (utils.py:526-536), then update's float32 arithmetic."""
    mean, var, count, out = 0.0, 1.0, 1e-24, []
    for ranks in batches:
        xs = torch.tensor(ranks)
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        delta = xs_mean.float() - mean
        tot_count = count + xs_count
        old_sum = var * count + delta ** 2 * count * xs_count / tot_count
        mean += (delta * xs_count / tot_count).item()
        var = ((old_sum + xs_var.float() * xs_count) / tot_count).item()
        count = tot_count
        out.append(mean)
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_the_baseline_is_trl_s_running_mean_over_every_rank(monkeypatch, world):
    from pipeline.runtime import dist

    steps = [[0.3, -0.1], [1.2, 0.4], [-0.5, 0.9], [0.05, 0.15]]
    steps = [ranks[:world] for ranks in steps]
    current: dict[str, list[float]] = {}
    # the collective: every rank's [mean reward, 1] summed on the device (this process plays all the ranks)
    monkeypatch.setattr(dist, "all_sum_unread", lambda values: torch.tensor(
        [sum(current["ranks"]), float(len(current["ranks"]))], dtype=torch.float64))
    baseline, got = BcoBaseline(), []
    for ranks in steps:
        current["ranks"] = ranks
        got.append(float(baseline.update(torch.tensor(ranks[0], dtype=torch.float64))))
    assert got == pytest.approx(trl_running_means(steps), rel=1e-6)
    assert got[0] == pytest.approx(sum(steps[0]) / world, rel=1e-12)  # the first update is that step's mean
    assert baseline.state()["count"] == pytest.approx(world * len(steps))


def test_a_non_finite_reward_leaves_the_running_mean():
    baseline = BcoBaseline()
    baseline.update(torch.tensor(0.4))
    assert float(baseline.update(torch.tensor(float("nan")))) == pytest.approx(0.4)
    assert baseline.state()["count"] == pytest.approx(1.0)


class Scored(torch.nn.Module):
    """A stand-in policy engine / reference: the fixed per-token NLL whatever the batch."""

    def __init__(self, nll: torch.Tensor):
        super().__init__()
        self.nll = nll
        self.module = self

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.nll


def test_training_updates_the_baseline_evaluation_reads_it_and_a_checkpoint_restores_it():
    from pipeline.recipe.args import PreferenceArgs

    pref = PreferenceArgs(pref_loss="sigmoid", pref_beta=0.1, pref_ftx=0.0, dpo_label_smoothing=0.0,
                          simpo_gamma=0.5, ref_model=None, pref_bco_weight=0.5, ld_alpha=0.5)
    objective = PreferenceObjective(pref, Scored(NLL), Scored(NLL))
    batch = {"input_ids": LABELS, "attention_mask": LABELS, "labels": LABELS}
    objective(batch)
    objective(batch)
    assert objective.bco is not None and objective.bco.state()["count"] == pytest.approx(2.0)
    policy, reference = pair_logps(NLL, LABELS, 0.5), pair_logps(NLL, LABELS)
    mean = float(0.1 * torch.cat([policy.chosen - reference.chosen, policy.rejected - reference.rejected]).mean())
    assert objective.bco.state()["mean"] == pytest.approx(mean, rel=1e-12)  # step 1 = step 2 here: their mean is it
    objective.scores(batch)  # evaluation: no update
    assert objective.bco.state()["count"] == pytest.approx(2.0)
    saved = objective.checkpoint_state()
    resumed = PreferenceObjective(pref, Scored(NLL), Scored(NLL))
    resumed.restore(saved)
    assert resumed.bco.state() == objective.bco.state() == saved["bco_baseline"]
    plain = PreferenceObjective(PreferenceArgs(**{**pref.__dict__, "pref_bco_weight": 0.0}), Scored(NLL), Scored(NLL))
    assert plain.checkpoint_state() == {} and plain.bco is None


def test_eval_s_pref_loss_is_the_plain_loss():
    """The eval command has no running mean and scores the base with the tuned model's weighting alike: its
    pref_loss is the recipe's loss without the BCO term (and split_logps's sums are the plain ones)."""
    from pipeline.evaluate.preference import summary
    from pipeline.recipe.args import PreferenceArgs

    keys = dict(pref_loss="sigmoid", pref_beta=0.1, pref_ftx=0.0, dpo_label_smoothing=0.0, simpo_gamma=0.5,
                ref_model=None)
    assert summary(POLICY, REFERENCE, PreferenceArgs(**keys, pref_bco_weight=0.5, ld_alpha=0.5)) == \
        summary(POLICY, REFERENCE, PreferenceArgs(**keys))
