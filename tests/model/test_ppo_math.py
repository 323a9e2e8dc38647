"""PPO's arithmetic (pipeline.model.ppo) against TRL 0.9.6's formulas re-typed here with Python floats.

Sources (trl-0.9.6 wheel): trl/trainer/ppo_trainer.py:1103-1139 compute_rewards, :1141-1155 _kl_penalty,
:1157-1183 compute_advantages, :1185-1272 loss; trl/core.py:152 masked_mean, :160 masked_var (unbiased),
:179 masked_whiten, :188 clip_by_value; trl/trainer/utils.py:54-69 AdaptiveKLController, :105-112
FixedKLController, :593-630 RunningMoments; trl/trainer/ppo_trainer.py:676-684 score scaling / normalization.
"""
from __future__ import annotations

import math
import threading
from typing import Callable

import pytest
import torch

from pipeline.model.ppo import (AdaptiveKLController, FixedKLController, PPOConfig, RunningMoments,
                                advantages_and_returns, kl_controller, ppo_losses, token_rewards)

MASK = [[1, 1, 1, 0], [1, 1, 1, 1]]
LOGP = [[-1.0, -2.0, -0.5, -9.0], [-0.3, -1.2, -2.2, -0.7]]
REF = [[-1.5, -1.0, -0.7, -3.0], [-0.4, -1.0, -2.0, -1.1]]
VALUES = [[0.2, -0.1, 0.4, 5.0], [0.0, 0.3, -0.2, 0.1]]
SCORES = [1.5, -0.5]


def t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def flat(rows) -> list[float]:
    return [v for row in rows for v in row]


def mmean(x, mask):
    return sum(v * m for rv, rm in zip(x, mask) for v, m in zip(rv, rm)) / sum(map(sum, mask))


def mvar(x, mask):
    mean, n = mmean(x, mask), sum(map(sum, mask))
    return mmean([[(v - mean) ** 2 for v in row] for row in x], mask) * n / (n - 1)


def mwhiten(x, mask, shift_mean=True):
    mean, var = mmean(x, mask), mvar(x, mask)
    return [[(v - mean) / math.sqrt(var + 1e-8) + (0 if shift_mean else mean) for v in row] for row in x]


def trl_rewards(beta):
    out = []
    for score, lp, rp, mask in zip(SCORES, LOGP, REF, MASK):
        reward = [-beta * (a - b) for a, b in zip(lp, rp)]
        last = max(i for i, m in enumerate(mask) if m)
        reward[last] += score
        out.append(reward)
    return out


def trl_gae(values, rewards, mask, gamma, lam, whiten_rewards=False):
    values = [[v * m for v, m in zip(rv, rm)] for rv, rm in zip(values, mask)]
    rewards = [[v * m for v, m in zip(rv, rm)] for rv, rm in zip(rewards, mask)]
    if whiten_rewards:
        rewards = mwhiten(rewards, mask, shift_mean=False)
    adv = []
    for vals, rews in zip(values, rewards):
        last, row = 0.0, []
        for i in reversed(range(len(rews))):
            nxt = vals[i + 1] if i < len(rews) - 1 else 0.0
            last = rews[i] + gamma * nxt - vals[i] + gamma * lam * last
            row.insert(0, last)
        adv.append(row)
    returns = [[a + v for a, v in zip(ra, rv)] for ra, rv in zip(adv, values)]
    return values, mwhiten(adv, mask), returns


def test_token_rewards_kl_per_token_and_score_at_last_response_token():
    rewards, kls = token_rewards(t(SCORES), t(LOGP), t(REF), t(MASK), kl_coef=0.2)
    assert rewards.flatten().tolist() == pytest.approx(flat(trl_rewards(0.2)), rel=1e-12)
    assert kls.flatten().tolist() == pytest.approx(flat([[a - b for a, b in zip(x, y)] for x, y in zip(LOGP, REF)]))


@pytest.mark.parametrize("gamma, lam, whiten", [(1.0, 0.95, False), (0.9, 0.5, False), (1.0, 0.95, True)])
def test_gae_returns_and_whitened_advantages(gamma, lam, whiten):
    rewards = trl_rewards(0.1)
    cfg = PPOConfig(gamma=gamma, lam=lam, whiten_rewards=whiten)
    values, adv, ret = advantages_and_returns(t(VALUES), t(rewards), t(MASK), cfg)
    gv, ga, gr = trl_gae(VALUES, rewards, MASK, gamma, lam, whiten)
    for got, want in ((values, gv), (adv, ga), (ret, gr)):
        assert got.flatten().tolist() == pytest.approx(flat(want), rel=1e-9, abs=1e-12)


def trl_loss(old, values, new, vpreds, mask, adv, ret, cfg):
    vf, pg = [], []
    for r in range(len(mask)):
        vf_row, pg_row = [], []
        for i in range(len(mask[r])):
            clipped = max(min(vpreds[r][i], values[r][i] + cfg.cliprange_value), values[r][i] - cfg.cliprange_value)
            vf_row.append(max((vpreds[r][i] - ret[r][i]) ** 2, (clipped - ret[r][i]) ** 2))
            ratio = math.exp(new[r][i] - old[r][i])
            pg_row.append(max(-adv[r][i] * ratio,
                              -adv[r][i] * min(max(ratio, 1 - cfg.cliprange), 1 + cfg.cliprange)))
        vf.append(vf_row)
        pg.append(pg_row)
    return mmean(pg, mask), cfg.vf_coef * 0.5 * mmean(vf, mask)


def test_clipped_policy_and_value_losses():
    cfg = PPOConfig()
    values, adv, ret = trl_gae(VALUES, trl_rewards(0.2), MASK, 1.0, 0.95)
    new = [[a + d for a, d in zip(row, deltas)] for row, deltas in zip(LOGP, [[0.3, -0.4, 0.05, 0.0],
                                                                               [0.0, 0.25, -0.1, 0.5]])]
    vpreds = [[v + d for v, d in zip(row, deltas)] for row, deltas in zip(values, [[0.5, -0.05, 0.3, 0.0],
                                                                                     [-0.4, 0.1, 0.0, 0.25]])]
    pg, vf, stats = ppo_losses(t(LOGP), t(values), t(new), t(vpreds), t(MASK), t(adv), t(ret), cfg)
    want_pg, want_vf = trl_loss(LOGP, values, new, vpreds, MASK, adv, ret, cfg)
    assert pg.item() == pytest.approx(want_pg, rel=1e-12)
    assert vf.item() == pytest.approx(want_vf, rel=1e-12)
    assert 0 < stats["policy/clipfrac"] < 1 and 0 < stats["val/clipfrac"] < 1  # both clips are exercised


def test_ratio_over_threshold_skips_the_batch():
    mask = t(MASK)
    pg, vf, _ = ppo_losses(t(LOGP), t(VALUES), t(LOGP) + 3.0, t(VALUES), mask, t(VALUES), t(VALUES), PPOConfig())
    assert pg.item() == 0.0 and vf.item() == 0.0


def test_kl_controllers():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, n_steps=8)  # error 0.5 clipped to 0.2
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 8 / 10000))
    ctl.update(5.4, n_steps=8)  # error -0.1
    assert ctl.value == pytest.approx(0.2 * (1 + 0.2 * 8 / 10000) * (1 - 0.1 * 8 / 10000))
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 8)
    assert fixed.value == 0.05
    assert isinstance(kl_controller(0.2, None, 10000), FixedKLController)


def trl_score_norm(batches: list[list[float]]) -> tuple[list[torch.Tensor], dict[str, float]]:
    """TRL 0.9.6's use_score_scaling + use_score_norm (LLaMA-Factory sets both to ppo_score_norm,
    llamafactory/train/ppo/trainer.py:111-112) on each step's float32 scores in turn, re-typed: RunningMoments
    (trl/trainer/utils.py:593-630, one process: the else branch of :610) and ppo_trainer.py:676-682.
    -> (each step's normalized scores, the final moments)."""
    mean, std, var, count = 0, 1, 1, 1e-24
    normalized = []
    for batch in batches:
        scores = torch.tensor(batch, dtype=torch.float32)
        xs_count = scores.numel()
        xs_var, xs_mean = torch.var_mean(scores, unbiased=False)
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - mean
        tot_count = count + xs_count
        new_sum = xs_var * xs_count
        old_sum = var * count + delta**2 * count * xs_count / tot_count
        tot_sum = old_sum + new_sum
        mean += delta * xs_count / tot_count
        var = tot_sum / tot_count
        std = (var * tot_count / (tot_count - 1)).float().sqrt()
        count = tot_count
        tensor_to_kwargs = dict(dtype=scores.dtype, device=scores.device)
        score_scaling_factor = std.to(**tensor_to_kwargs) + torch.finfo(scores.dtype).eps
        normalized.append((scores - mean.to(**tensor_to_kwargs)) / score_scaling_factor)
    return normalized, {"mean": float(mean), "std": float(std), "var": float(var), "count": count}


BATCHES = [[1.5, -0.5, 0.25, 2.0], [0.75, 0.8, -1.25, 3.5], [10.0, -4.0, 0.0, 1.0]]


def test_score_norm_is_trls_running_moments_to_the_bit():
    want, moments = trl_score_norm(BATCHES)
    running = RunningMoments()
    for batch, expected in zip(BATCHES, want):
        assert torch.equal(running.normalize(torch.tensor(batch, dtype=torch.float32)), expected)
    assert running.state() == moments


def test_score_moments_survive_a_checkpoint_exactly():
    """state() -> JSON -> from_state(): the next step normalizes as the uninterrupted moments do."""
    import json

    want, _ = trl_score_norm(BATCHES)
    running = RunningMoments()
    for batch in BATCHES[:2]:
        running.normalize(torch.tensor(batch, dtype=torch.float32))
    resumed = RunningMoments.from_state(json.loads(json.dumps(running.state())))
    assert torch.equal(resumed.normalize(torch.tensor(BATCHES[2], dtype=torch.float32)), want[2])



def two_rank_sum() -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """Two threads' all-reduce SUM (each gets the sum of both ranks' tensors), standing for torch.distributed."""
    barrier, posted = threading.Barrier(2), [None, None]

    def reducer(rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            posted[rank] = tensor.clone()
            barrier.wait()
            total = posted[0] + posted[1]
            barrier.wait()  # both have read before the next call posts again
            return total
        return reduce
    return reducer(0), reducer(1)


def test_score_moments_on_two_ranks_are_those_of_every_rank_s_scores():
    """TRL's distributed RunningMoments (trl/trainer/utils.py:610-611, get_global_statistics :634-649): each rank
    folds in the moments of both ranks' scores, so both hold what one process holds over all of them (the golden:
    TRL's one-process update re-typed, over each step's two halves together)."""
    halves = [[batch[:2] for batch in BATCHES], [batch[2:] for batch in BATCHES]]
    _, moments = trl_score_norm(BATCHES)
    found: list[dict[str, float]] = [{}, {}]

    def rank(index: int, reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        running = RunningMoments(reduce)
        for batch in halves[index]:
            running.normalize(torch.tensor(batch, dtype=torch.float32))
        found[index] = running.state()
    threads = [threading.Thread(target=rank, args=(i, r)) for i, r in enumerate(two_rank_sum())]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert found[0] == found[1] == pytest.approx(moments, rel=1e-6)
    assert found[0]["count"] == pytest.approx(12)  # both ranks' rows, not one's 6


def test_restored_score_moments_follow_the_scores_device():
    """A resumed run's moments come back as CPU tensors (from_state) while the scores are on the GPU: the update
    must leave the moments on the scores' device (an in-place update of the CPU mean failed there). The meta
    device stands for CUDA here."""
    resumed = RunningMoments.from_state({"mean": 0.5, "std": 1.0, "var": 1.0, "count": 4.0})
    resumed.update(torch.ones(3, device="meta"))
    assert {resumed.mean.device.type, resumed.var.device.type, resumed.std.device.type} == {"meta"}
