"""Preference losses (stage dpo): DPO (sigmoid), hinge, IPO, ORPO and SimPO, as LLaMA-Factory / TRL define them.

A batch of B pairs is one (2B, T) forward: the B chosen sequences, then the B rejected ones
(pipeline.data.pairs). The model returns per-token cross-entropy (reduction="none", through the chunked
frozen-head path: no full fp32 logits), and a sequence's log-probability is minus its sum over the scored
response tokens. With pi / ref the policy / reference log-probabilities and beta = pref_beta:

    sigmoid (DPO)  h = (pi_c - pi_r) - (ref_c - ref_r);  -(1 - eps) log s(beta h) - eps log s(-beta h)   eps = dpo_label_smoothing
    hinge          max(0, 1 - beta h)
    ipo            (h - 1 / (2 beta))^2                                   log-probs averaged per token
    orpo           -pi_c + beta * -log s(log odds(pi_c) - log odds(pi_r))  averaged; odds(p) = p / (1 - p); no reference
    simpo          -log s(beta (pi_c - pi_r) - gamma)                     averaged; gamma = simpo_gamma; no reference

(s is the logistic sigmoid.) pref_ftx adds pref_ftx x the mean NLL per token of the chosen response. IPO,
ORPO and SimPO use length-averaged log-probabilities, as LLaMA-Factory and TRL do. Rewards are
beta (pi - ref) per side (beta pi without a reference), logged as TRL names them: rewards/chosen,
rewards/rejected, rewards/accuracies (chosen reward > rejected reward), rewards/margins, logps/chosen,
logps/rejected (batch means).

Two of LLaMA-Factory 0.9.5's extras change those terms (its train/dpo/trainer.py and train/trainer_utils.py):

- ld_alpha (LD-DPO): the POLICY's log-probability of each response is the sum over its first m scored tokens,
  m = the shorter response's length in that pair (the "public" part both share), plus ld_alpha x the sum over
  the rest (the "verbose" part only the longer one has); the reference's stays the plain sum (LF passes
  ld_alpha=None for the reference model). Token counts, and so the length averages, stay the full ones.
- pref_bco_weight (w): with a reference loss (sigmoid, hinge, ipo), losses become (loss + w x bco) / (1 + w),
  bco = -log s(beta (pi_c - ref_c) - delta) - log s(-(beta (pi_r - ref_r) - delta)), delta the running mean of
  the micro-batches' mean rewards (BcoBaseline in pipeline.train.preference keeps it) -- BCO's binary
  classifier of chosen vs rejected with a reward baseline.

The training objective and its reference model are in pipeline.train.preference; eval's preference
metrics (pipeline.evaluate.preference) use the same formulas from here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from pipeline.names import REFERENCE_FREE


AVERAGED = ("ipo", "orpo", "simpo")  # losses on length-averaged log-probabilities
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@dataclass(frozen=True)
class PrefConfig:
    loss: str = "sigmoid"
    beta: float = 0.1
    ftx: float = 0.0
    label_smoothing: float = 0.0
    gamma: float = 0.5
    ld_alpha: float | None = None  # LD-DPO's weight of the verbose tokens (policy only); None: plain sums
    bco_weight: float = 0.0  # pref_bco_weight

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE

    @property
    def adds_bco(self) -> bool:
        """LLaMA-Factory adds the BCO term above 1e-6 and only to the losses with a reference (its
        compute_preference_loss: orpo / simpo take the other branch); the rules refuse it with those."""
        return self.bco_weight > 1e-6 and self.needs_reference


# A micro-batch's mean reward -> the BCO baseline delta to use for it (training: updated running mean first)
Baseline = Callable[[torch.Tensor], "float | torch.Tensor"]  # the BCO delta: a float or a 0-dim device tensor, unread


@dataclass
class PairLogps:
    """Per pair (B,): summed response log-probabilities of each side and their token counts."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor

    def averaged(self) -> "PairLogps":
        return PairLogps(self.chosen / self.chosen_tokens.clamp(min=1), self.rejected / self.rejected_tokens.clamp(min=1),
                         self.chosen_tokens, self.rejected_tokens)


def pair_logps(token_nll: torch.Tensor, labels: torch.Tensor, ld_alpha: float | None = None) -> PairLogps:
    """From per-token cross-entropy (2B, T) (0 where unlabelled) of a concatenated chosen|rejected batch.
    ld_alpha: LD-DPO's sums (length_desensitized); the token counts stay the full ones either way."""
    scored = labels != -100
    tokens = scored.sum(dim=-1)
    logps = -token_nll.sum(dim=-1) if ld_alpha is None else -length_desensitized(token_nll, scored, ld_alpha)
    b = labels.shape[0] // 2
    return PairLogps(logps[:b], logps[b:], tokens[:b], tokens[b:])


def length_desensitized(token_nll: torch.Tensor, scored: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """Per sequence (2B,): the summed NLL of its first m scored tokens plus ld_alpha x that of the others, m = the
    shorter response of its pair (LD-DPO: the tokens past the shorter length are what makes a long response's
    log-probability small, so they count ld_alpha times). LLaMA-Factory marks the public part by position (first
    scored position + m, trainer_utils.get_batch_logps); counting scored tokens is the same on a pair's one
    contiguous response span, and stays right were the labels to have gaps."""
    b = scored.shape[0] // 2
    tokens = scored.sum(dim=-1)
    shorter = torch.minimum(tokens[:b], tokens[b:]).repeat(2)
    public = scored & (scored.cumsum(dim=-1) <= shorter.unsqueeze(-1))
    verbose = scored & ~public
    return (token_nll * public).sum(dim=-1) + ld_alpha * (token_nll * verbose).sum(dim=-1)


def bco_term(pi: PairLogps, ref: PairLogps, beta: float, baseline: Baseline) -> torch.Tensor:
    """BCO's loss per pair (LLaMA-Factory 0.9.5 CustomDPOTrainer.bco_loss): the chosen reward classified above the
    baseline delta, the rejected one below it; delta comes from `baseline` given this micro-batch's mean reward
    (over both sides, detached), which training folds into the running mean before reading it back."""
    chosen, rejected = beta * (pi.chosen - ref.chosen), beta * (pi.rejected - ref.rejected)
    delta = baseline(torch.cat((chosen, rejected)).mean().detach())
    return -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))


def preference_loss(policy: PairLogps, reference: PairLogps | None, cfg: PrefConfig, baseline: Baseline | None = None
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (B,) and per-pair metrics (B,) under TRL's names (plus sft_loss / odds_ratio_loss for orpo).
    `baseline`: the BCO delta's source, needed when cfg.adds_bco."""
    if cfg.needs_reference and reference is None:
        raise ValueError(f"pref_loss {cfg.loss} needs reference log-probabilities")
    if cfg.adds_bco and baseline is None:
        raise ValueError("pref_bco_weight needs a baseline (the running mean of the rewards)")
    sft_loss = -policy.chosen / policy.chosen_tokens.clamp(min=1)  # mean NLL per token of the chosen response
    pi = policy.averaged() if cfg.loss in AVERAGED else policy
    ref = None
    if cfg.needs_reference:
        assert reference is not None
        ref = reference.averaged() if cfg.loss in AVERAGED else reference
    beta = cfg.beta
    extra: dict[str, torch.Tensor] = {}
    if ref is not None:
        h = (pi.chosen - pi.rejected) - (ref.chosen - ref.rejected)
        if cfg.loss == "sigmoid":
            eps = cfg.label_smoothing
            losses = -F.logsigmoid(beta * h) * (1 - eps) - F.logsigmoid(-beta * h) * eps
        elif cfg.loss == "hinge":
            losses = torch.relu(1 - beta * h)
        elif cfg.loss == "ipo":
            losses = (h - 1 / (2 * beta)) ** 2
        else:
            raise ValueError(f"unknown pref_loss {cfg.loss!r}")
        if cfg.adds_bco:
            assert baseline is not None
            w = cfg.bco_weight  # LF: "re-weight W_p and W_q"
            losses = (losses + w * bco_term(pi, ref, beta, baseline)) / (1.0 + w)
        chosen_rewards = beta * (pi.chosen - ref.chosen).detach()
        rejected_rewards = beta * (pi.rejected - ref.rejected).detach()
    else:
        if cfg.loss == "orpo":
            log_odds = (pi.chosen - pi.rejected) - (torch.log1p(-torch.exp(pi.chosen))
                                                     - torch.log1p(-torch.exp(pi.rejected)))
            odds_ratio_loss = -F.logsigmoid(log_odds)
            losses = sft_loss + beta * odds_ratio_loss
            extra = {"sft_loss": sft_loss.detach(), "odds_ratio_loss": odds_ratio_loss.detach()}
        elif cfg.loss == "simpo":
            losses = -F.logsigmoid(beta * (pi.chosen - pi.rejected) - cfg.gamma)
        else:
            raise ValueError(f"unknown pref_loss {cfg.loss!r}")
        chosen_rewards, rejected_rewards = beta * pi.chosen.detach(), beta * pi.rejected.detach()
    if cfg.ftx > 1e-6:
        losses = losses + cfg.ftx * sft_loss
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": pi.chosen.detach(),
        "logps/rejected": pi.rejected.detach(),
        **extra,
    }
    return losses, metrics


# ---------------------------------------------------------------------------------------------- KTO (stage kto)
# Unpaired feedback: each example is a prompt, one response and a tag (desirable or not). A batch of B examples is
# one (2B, T) forward like a pair batch: the B examples, then their B mismatched "KL" sequences (pipeline.data.
# feedback: the prompt with another row's response), whose log-ratio estimates KL(policy || reference).
# The loss is LLaMA-Factory 0.9.5's (src/llamafactory/train/kto/trainer.py, get_batch_loss_metrics) on TRL's KTO
# term (trl 1.16, trl/trainer/kto_trainer.py, KTOTrainer._compute_loss, lines 1442-1483):
#     z      = mean over the batch (and over ranks) of (pi_KL - ref_KL), clamped at 0, detached
#     chosen   desirable_weight   * (1 - s(beta ((pi - ref) - z)))
#     rejected undesirable_weight * (1 - s(beta (z - (pi - ref))))
#     loss   = mean of those over the B examples + pref_ftx * mean NLL per token of the chosen responses * B / #chosen
# (the last factor is LLaMA-Factory's "rescale" of its sft term). Rewards are beta (pi - ref) per side.

KTO_SIDES = ("chosen", "rejected")
KTO_SUMMED = ("rewards", "logps")  # per side: logged as the mean over that side's examples of the whole window
KTO_METRICS = ("kl", *(f"{key}/{side}_sum" for side in KTO_SIDES for key in KTO_SUMMED),
               *(f"count/{side}" for side in KTO_SIDES))  # what kto_loss returns per micro-batch


@dataclass(frozen=True)
class KtoConfig:
    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    ftx: float = 0.0


@dataclass
class FeedbackLogps:
    """Per example (B,): summed log-probabilities of its response and of its KL sequence's response, the response's
    token count, and whether the example is desirable."""

    target: torch.Tensor
    kl: torch.Tensor
    tokens: torch.Tensor
    desirable: torch.Tensor


def feedback_logps(token_nll: torch.Tensor, labels: torch.Tensor, desirable: torch.Tensor) -> FeedbackLogps:
    """From per-token cross-entropy (2B, T) of an examples|KL-sequences batch (pipeline.data.loaders)."""
    pairs = pair_logps(token_nll, labels)
    return FeedbackLogps(pairs.chosen, pairs.rejected, pairs.chosen_tokens, desirable.bool())


def kl_gaps(policy: FeedbackLogps, reference: FeedbackLogps) -> torch.Tensor:
    """pi_KL - ref_KL per row, detached: the terms every KL estimate averages (kl_term over a micro-batch, training's
    KtoObjective.global_kl over every rank's rows)."""
    return (policy.kl - reference.kl).detach()


def kl_term(policy: FeedbackLogps, reference: FeedbackLogps) -> torch.Tensor:
    """This micro-batch's KL estimate before the mean over ranks and the clamp: the mean of its kl_gaps."""
    return kl_gaps(policy, reference).mean()


def kto_loss(policy: FeedbackLogps, reference: FeedbackLogps, kl: torch.Tensor | float, cfg: KtoConfig
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The micro-batch's KTO loss (a scalar: the KL estimate couples the examples) and its metrics as sums and
    counts per side plus "kl" (kto_means turns a window's sums into TRL's means). `kl`: kl_term averaged over ranks."""
    z = torch.as_tensor(kl, dtype=policy.target.dtype, device=policy.target.device).clamp(min=0).detach()
    chosen, rejected = policy.desirable, ~policy.desirable
    logratios = policy.target - reference.target
    losses = torch.where(chosen, cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (logratios - z))),
                         cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (z - logratios))))
    loss = losses.mean()
    if cfg.ftx > 1e-6:
        sft = -policy.target[chosen] / policy.tokens[chosen].clamp(min=1)
        if n_chosen := sft.numel():  # the chosen rows counted by the selection's shape: no read of the tags
            loss = loss + cfg.ftx * sft.mean() / n_chosen * len(losses)
    rewards = cfg.beta * logratios.detach()
    metrics = {"kl": z}
    for side, mask in zip(KTO_SIDES, (chosen, rejected)):
        metrics[f"rewards/{side}_sum"] = rewards[mask].sum()
        metrics[f"logps/{side}_sum"] = policy.target.detach()[mask].sum()
        metrics[f"count/{side}"] = mask.sum().to(rewards.dtype)
    return loss, metrics


def kto_means(record: dict[str, float], prefix: str = "") -> dict[str, float]:
    """A window's summed KTO metrics as TRL and LLaMA-Factory log them: rewards/logps per side = their sum over
    that side's examples / its count (absent when the window had none), rewards/margins when both sides are there.
    A record without KTO sums is returned as it is."""
    if f"{prefix}count/chosen" not in record:
        return record
    out = dict(record)
    for side in KTO_SIDES:
        count = out.pop(f"{prefix}count/{side}")
        for key in KTO_SUMMED:
            total = out.pop(f"{prefix}{key}/{side}_sum")
            if count > 0:
                out[f"{prefix}{key}/{side}"] = total / count
    if f"{prefix}rewards/chosen" in out and f"{prefix}rewards/rejected" in out:
        out[f"{prefix}rewards/margins"] = out[f"{prefix}rewards/chosen"] - out[f"{prefix}rewards/rejected"]
    return out
