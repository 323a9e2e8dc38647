"""PPO's arithmetic (stage ppo), as TRL 0.9.6's PPOTrainer defines it -- the trainer LLaMA-Factory 0.9.5 runs.

Per response (T tokens after the query, mask 1 on the generated tokens, 0 on padding), with logp / ref the
policy / reference log-probability of each generated token, beta the KL coefficient and s the reward
model's score of the whole answer (TRL trl/trainer/ppo_trainer.py, compute_rewards / compute_advantages /
loss; trl/core.py masked_* and clip_by_value; trl/trainer/utils.py the KL controllers):

    kl_t       = logp_t - ref_t                              (kl_penalty "kl"; "abs" |.|, "mse" 0.5 (.)^2)
    r_t        = -beta kl_t, plus s at the last unmasked token
    delta_t    = r_t + gamma V_{t+1} - V_t                   (V_T = 0; values and rewards masked first)
    A_t        = delta_t + gamma lam A_{t+1}                 (GAE); returns R_t = A_t + V_t; A whitened
    pg loss    = mean_mask max(-A ratio, -A clamp(ratio, 1 - eps, 1 + eps)),  ratio = exp(logp_new - logp_old)
    value loss = vf_coef 0.5 mean_mask max((V' - R)^2, (clamp(V', V - eps_v, V + eps_v) - R)^2)

whiten_rewards (LF's ppo_whiten_rewards) whitens r over the mask, keeping its mean, before GAE. A batch whose
mean ratio exceeds ratio_threshold (TRL: 10) contributes zero loss, as TRL skips it. The adaptive KL
controller (Ziegler et al. 2019) moves beta by at most +-20 % x n_steps / horizon toward the target KL.
The loop that generates, scores and steps is pipeline.train.ppo; these functions only do arithmetic.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

KL_PENALTIES = ("kl", "abs", "mse")


@dataclass(frozen=True)
class PPOConfig:
    """TRL 0.9.6 PPOConfig's defaults for the keys LLaMA-Factory does not set."""

    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_penalty: str = "kl"
    whiten_rewards: bool = False
    ratio_threshold: float = 10.0


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased (Bessel-corrected) variance over the mask, as TRL's masked_var(unbiased=True)."""
    centered = values - masked_mean(values, mask)
    count = mask.sum()
    if count <= 1:
        raise ValueError("PPO needs at least two generated tokens in a mini-batch to whiten over them")
    return masked_mean(centered ** 2, mask) * count / (count - 1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / sqrt(var + 1e-8) over the mask; shift_mean=False adds the mean back (TRL's rewards)."""
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + 1e-8)
    return whitened if shift_mean else whitened + mean


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    diff = logprobs - ref_logprobs
    if kind == "kl":
        return diff
    if kind == "abs":
        return diff.abs()
    if kind == "mse":
        return 0.5 * diff.square()
    raise ValueError(f"kl_penalty {kind!r}: expected one of {', '.join(KL_PENALTIES)}")


def token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float, kind: str = "kl") -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) scores and (B, T) log-probs -> (B, T) rewards: -kl_coef x KL per token, the score added at each
    response's last unmasked token; and the (B, T) KL itself (for the logged mean KL)."""
    kls = kl_penalty(logprobs, ref_logprobs, kind)
    rewards = -kl_coef * kls
    last = mask.shape[1] - 1 - mask.flip(1).long().argmax(dim=1)  # index of each row's last 1
    rewards[torch.arange(len(scores), device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, kls


def advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
                           cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GAE over (B, T): -> (masked values, whitened advantages, returns = raw advantages + values)."""
    values = values * mask
    rewards = rewards * mask
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    length = rewards.shape[1]
    gae = torch.zeros_like(rewards[:, 0])
    reversed_advantages = []
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + cfg.gamma * next_values - values[:, t]
        gae = delta + cfg.gamma * cfg.lam * gae
        reversed_advantages.append(gae)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    returns = advantages + values
    return values, masked_whiten(advantages, mask).detach(), returns


def ppo_losses(old_logprobs: torch.Tensor, values: torch.Tensor, logprobs: torch.Tensor, vpreds: torch.Tensor,
               mask: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
               cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """-> (policy loss, vf_coef x value loss, stats): the clipped surrogate and the clipped value loss. Nothing is
    read on the host (each read stalls it until the device drains): TRL's skip of a batch whose mean ratio passes
    ratio_threshold is a factor on the device (x 1.0 leaves a loss and its gradient the same to the bit, x 0.0 is
    TRL's loss x 0), and the stats are 0-d device tensors (the trainer sums them unread until a log line)."""
    vpred_clipped = torch.max(torch.min(vpreds, values + cfg.cliprange_value), values - cfg.cliprange_value)
    vf_losses1 = (vpreds - returns) ** 2
    vf_losses2 = (vpred_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_losses1, vf_losses2), mask)
    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cfg.cliprange, 1.0 + cfg.cliprange)
    pg_loss = masked_mean(torch.max(pg_losses1, pg_losses2), mask)
    kept = 1.0 - (masked_mean(ratio, mask) > cfg.ratio_threshold).to(pg_loss.dtype)  # 0.0: TRL skips the batch
    pg_loss, vf_loss = pg_loss * kept, vf_loss * kept.to(vf_loss.dtype)
    stats = {"loss/policy": pg_loss.detach(), "loss/value": vf_loss.detach(),
             "policy/clipfrac": masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask),
             "policy/approxkl": (0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)).detach(),
             "val/clipfrac": masked_mean(torch.gt(vf_losses2, vf_losses1).float(), mask)}
    return pg_loss, cfg.vf_coef * vf_loss, stats


class FixedKLController:
    """beta stays put (TRL's adap_kl_ctrl=False)."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current: float, n_steps: int) -> None:
        """Fixed: nothing to do."""


class AdaptiveKLController:
    """beta x= 1 + clip(KL / target - 1, -0.2, 0.2) x n_steps / horizon after each PPO step."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current: float, n_steps: int) -> None:
        error = min(max(current / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon


def kl_controller(init_kl_coef: float, target: float | None, horizon: float) -> FixedKLController | AdaptiveKLController:
    """LLaMA-Factory sets adap_kl_ctrl=True with target = ppo_target; TRL's adaptive controller needs a target."""
    if target is None:
        return FixedKLController(init_kl_coef)
    return AdaptiveKLController(init_kl_coef, target, horizon)


Reduce = Callable[[torch.Tensor], torch.Tensor]  # a tensor -> its element-wise sum over the ranks


def local_statistics(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased variance, count) of one process's scores: TRL's RunningMoments.update on one process
    (trl/trainer/utils.py:613-614, torch.var_mean(xs, unbiased=False))."""
    xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
    return xs_mean, xs_var, xs.numel()


def global_statistics(xs: torch.Tensor, reduce: Reduce) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, biased variance, count) of every process's scores together: TRL's get_global_statistics
    (trl/trainer/utils.py:634-649): the sum and count reduced, then the squared deviations from that mean."""
    sum_and_count = reduce(torch.tensor([xs.sum(), xs.numel()], device=xs.device))
    global_sum, count = sum_and_count
    global_mean = global_sum / count
    global_var = reduce(torch.sum((xs - global_mean) ** 2)) / count
    return global_mean, global_var, count


class RunningMoments:
    """TRL's RunningMoments: the running mean and std of every score seen so far, for ppo_score_norm.

    The same operations in the same order as TRL's (python numbers until the first update, float32 tensors after),
    so the normalized scores are TRL's to the bit; state() / from_state() carry it through a checkpoint. With
    `reduce` (several ranks) a batch's moments are those of every rank's scores (TRL's accelerator.use_distributed
    branch, trl/trainer/utils.py:610-611), so every rank holds the same moments."""

    def __init__(self, reduce: Reduce | None = None) -> None:
        self.mean: float | torch.Tensor = 0
        self.std: float | torch.Tensor = 1
        self.var: float | torch.Tensor = 1
        self.count: float | torch.Tensor = 1e-24
        self.reduce = reduce

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> None:
        """Fold a batch's scores in (Chan et al.'s parallel update with the batch's biased variance)."""
        xs_mean, xs_var, xs_count = (local_statistics(xs) if self.reduce is None
                                     else global_statistics(xs, self.reduce))
        xs_mean, xs_var = xs_mean.float(), xs_var.float()
        delta = xs_mean - self.mean
        tot_count = self.count + xs_count
        new_sum = xs_var * xs_count
        old_sum = self.var * self.count + delta ** 2 * self.count * xs_count / tot_count
        # not in place: moments restored by from_state are CPU tensors, and a CPU tensor cannot be updated in place
        # by the CUDA scores' statistics (the same value either way: TRL's `+=` on its tensor)
        self.mean = self.mean + delta * xs_count / tot_count
        self.var = (old_sum + new_sum) / tot_count
        self.std = (self.var * tot_count / (tot_count - 1)).float().sqrt()
        self.count = tot_count

    def normalize(self, scores: torch.Tensor) -> torch.Tensor:
        """TRL's use_score_scaling + use_score_norm (LLaMA-Factory's ppo_score_norm): update with the batch, then
        (score - running mean) / (running std + eps of the scores' dtype)."""
        self.update(scores)
        kwargs = {"dtype": scores.dtype, "device": scores.device}
        return (scores - torch.as_tensor(self.mean).to(**kwargs)) / (
            torch.as_tensor(self.std).to(**kwargs) + torch.finfo(scores.dtype).eps)

    def state(self) -> dict[str, float]:
        """JSON-exact numbers (a float32 is a double exactly)."""
        return {"mean": float(self.mean), "std": float(self.std), "var": float(self.var), "count": float(self.count)}

    @classmethod
    def from_state(cls, saved: dict[str, float], reduce: Reduce | None = None) -> "RunningMoments":
        """The moments state() saved after at least one update: float32 tensors, as TRL's are then."""
        moments = cls(reduce)
        for key in ("mean", "std", "var"):
            setattr(moments, key, torch.tensor(saved[key], dtype=torch.float32))
        moments.count = float(saved["count"])
        return moments
