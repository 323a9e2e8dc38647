"""The preference losses against their definitions, computed here by hand with Python floats (math module).

References: DPO (Rafailov et al. 2023, eq. 7) with conservative label smoothing as in TRL's DPOTrainer.dpo_loss
(`-logsigmoid(beta h)(1 - eps) - logsigmoid(-beta h) eps`); IPO (Azar et al. 2023, eq. 17, TRL: length-averaged
log-probs, `(h - 1/(2 beta))^2`); hinge (SLiC, TRL: `relu(1 - beta h)`); ORPO (Hong et al. 2024, eq. 6-7 with
LLaMA-Factory's average log-probs); SimPO (Meng et al. 2024, eq. 6). One batch against TRL's own trainers:
tests/compat/test_trl_dpo.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.model.preference import PairLogps, PrefConfig, pair_logps, preference_loss

# two pairs: summed log-probs and token counts
PC, PR, NC, NR = [-3.0, -7.5], [-5.0, -6.0], [3, 5], [4, 2]
RC, RR = [-4.0, -7.0], [-4.5, -6.5]


def logps(c, r, nc=NC, nr=NR) -> PairLogps:
    return PairLogps(torch.tensor(c, dtype=torch.float64), torch.tensor(r, dtype=torch.float64),
                     torch.tensor(nc), torch.tensor(nr))


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def run(loss: str, **kw):
    cfg = PrefConfig(loss=loss, **kw)
    ref = logps(RC, RR) if cfg.needs_reference else None
    losses, metrics = preference_loss(logps(PC, PR), ref, cfg)
    return losses.tolist(), {k: v.tolist() for k, v in metrics.items()}


def test_policy_equal_to_reference_gives_ln2():
    losses, metrics = preference_loss(logps(PC, PR), logps(PC, PR), PrefConfig())
    assert losses.tolist() == [math.log(2)] * 2
    assert metrics["rewards/margins"].tolist() == [0.0, 0.0]
    assert metrics["rewards/accuracies"].tolist() == [0.0, 0.0]  # ties are not wins (TRL: chosen > rejected)


@pytest.mark.parametrize("beta, eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_sigmoid_with_label_smoothing(beta, eps):
    losses, metrics = run("sigmoid", beta=beta, label_smoothing=eps)
    for i in range(2):
        h = (PC[i] - PR[i]) - (RC[i] - RR[i])
        assert losses[i] == pytest.approx(-(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h), rel=1e-12)
        assert metrics["rewards/chosen"][i] == pytest.approx(beta * (PC[i] - RC[i]))
        assert metrics["rewards/rejected"][i] == pytest.approx(beta * (PR[i] - RR[i]))
        assert metrics["rewards/margins"][i] == pytest.approx(beta * h)
        assert metrics["rewards/accuracies"][i] == float(h > 0)
        assert metrics["logps/chosen"][i] == PC[i] and metrics["logps/rejected"][i] == PR[i]


def test_hinge():
    losses, _ = run("hinge", beta=0.5)
    for i in range(2):
        h = (PC[i] - PR[i]) - (RC[i] - RR[i])
        assert losses[i] == pytest.approx(max(0.0, 1 - 0.5 * h))


def test_ipo_uses_length_averaged_logps():
    beta = 0.1
    losses, metrics = run("ipo", beta=beta)
    for i in range(2):
        h = (PC[i] / NC[i] - PR[i] / NR[i]) - (RC[i] / NC[i] - RR[i] / NR[i])
        assert losses[i] == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
        assert metrics["logps/chosen"][i] == pytest.approx(PC[i] / NC[i])


def test_orpo_is_nll_plus_beta_times_odds_ratio_term():
    beta = 0.25
    losses, metrics = run("orpo", beta=beta)
    for i in range(2):
        c, r = PC[i] / NC[i], PR[i] / NR[i]
        log_odds = math.log(math.exp(c) / (1 - math.exp(c))) - math.log(math.exp(r) / (1 - math.exp(r)))
        ratio = -logsig(log_odds)
        assert losses[i] == pytest.approx(-c + beta * ratio, rel=1e-12)
        assert metrics["odds_ratio_loss"][i] == pytest.approx(ratio)
        assert metrics["sft_loss"][i] == pytest.approx(-c)
        assert metrics["rewards/chosen"][i] == pytest.approx(beta * c)  # no reference: beta * log pi


def test_simpo_is_length_normalised_with_margin_gamma():
    beta, gamma = 2.0, 0.7
    losses, _ = run("simpo", beta=beta, gamma=gamma)
    for i in range(2):
        margin = PC[i] / NC[i] - PR[i] / NR[i]
        assert losses[i] == pytest.approx(-logsig(beta * margin - gamma), rel=1e-12)


def test_pref_ftx_adds_the_chosen_nll_per_token():
    plain, _ = run("sigmoid")
    mixed, _ = run("sigmoid", ftx=0.5)
    for i in range(2):
        assert mixed[i] == pytest.approx(plain[i] + 0.5 * (-PC[i] / NC[i]))


def test_reference_losses_refuse_to_run_without_a_reference():
    with pytest.raises(ValueError):
        preference_loss(logps(PC, PR), None, PrefConfig(loss="sigmoid"))


def test_pair_logps_sums_the_scored_tokens_of_each_side():
    nll = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.0, 0.0], [0.25, 0.25, 0.25], [1.0, 1.0, 0.0]])
    labels = torch.tensor([[5, 6, -100], [7, -100, -100], [1, 2, 3], [4, 5, -100]])
    scores = pair_logps(nll, labels)
    assert scores.chosen.tolist() == [-1.5, -2.0] and scores.rejected.tolist() == [-0.75, -2.0]
    assert scores.chosen_tokens.tolist() == [2, 1] and scores.rejected_tokens.tolist() == [3, 2]


def test_gradient_of_dpo_matches_its_closed_form():
    """d loss / d pi_c = -beta sigmoid(-beta h) (the DPO paper's gradient weight)."""
    beta = 0.3
    pc = torch.tensor([PC[0]], dtype=torch.float64, requires_grad=True)
    losses, _ = preference_loss(PairLogps(pc, torch.tensor([PR[0]], dtype=torch.float64), torch.tensor([3]),
                                          torch.tensor([4])), logps(RC[:1], RR[:1], NC[:1], NR[:1]),
                                PrefConfig(beta=beta))
    losses.sum().backward()
    h = (PC[0] - PR[0]) - (RC[0] - RR[0])
    assert pc.grad.item() == pytest.approx(-beta / (1 + math.exp(beta * h)))
