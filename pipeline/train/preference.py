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

The reference is the starting model: for LoRA the same weights with the adapters switched off
(lora.adapters_disabled: no second copy in memory), for full / freeze a frozen copy (a DeepSpeed engine of
its own under ZeRO-3, so it is partitioned like the policy), or ref_model when given.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F

from pipeline.errors import UserError

AVERAGED = ("ipo", "orpo", "simpo")  # losses on length-averaged log-probabilities
REFERENCE_FREE = ("orpo", "simpo")
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


@dataclass(frozen=True)
class PrefConfig:
    loss: str = "sigmoid"
    beta: float = 0.1
    ftx: float = 0.0
    label_smoothing: float = 0.0
    gamma: float = 0.5

    @classmethod
    def from_recipe(cls, r: Mapping[str, Any]) -> "PrefConfig":
        return cls(loss=r["pref_loss"], beta=float(r["pref_beta"]), ftx=float(r["pref_ftx"]),
                   label_smoothing=float(r["dpo_label_smoothing"]), gamma=float(r["simpo_gamma"]))

    @property
    def needs_reference(self) -> bool:
        return self.loss not in REFERENCE_FREE


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


def pair_logps(token_nll: torch.Tensor, labels: torch.Tensor) -> PairLogps:
    """From per-token cross-entropy (2B, T) (0 where unlabelled) of a concatenated chosen|rejected batch."""
    logps = -token_nll.sum(dim=-1)
    tokens = (labels != -100).sum(dim=-1)
    b = labels.shape[0] // 2
    return PairLogps(logps[:b], logps[b:], tokens[:b], tokens[b:])


def preference_loss(policy: PairLogps, reference: PairLogps | None, cfg: PrefConfig
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses (B,) and per-pair metrics (B,) under TRL's names (plus sft_loss / odds_ratio_loss for orpo)."""
    if cfg.needs_reference and reference is None:
        raise ValueError(f"pref_loss {cfg.loss} needs reference log-probabilities")
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


# ---------------------------------------------------------------------------------------------- the reference

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # batch -> per-token NLL (2B, T)


def token_nll(model: Callable[..., Any], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 reduction="none")


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """No dropout in the reference pass (TRL's disable_dropout), training mode back afterwards."""
    was = module.training
    module.train(False)
    try:
        yield
    finally:
        module.train(was)


class AdapterReference:
    """LoRA: the policy's own weights with the adapters switched off (no second copy in memory)."""

    description = "the starting model (the policy with its LoRA adapters switched off)"

    def __init__(self, engine: Any):
        from pipeline.model.lora import keep_starting_modules

        self.engine = engine
        keep_starting_modules(engine.module)  # additional_target modules as they start (train.run refuses ZeRO-3)

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        from pipeline.model.lora import adapters_disabled

        with adapters_disabled(self.engine.module), _eval_mode(self.engine.module):
            return token_nll(self.engine, batch)


class ModelReference:
    """A separate frozen model: a copy of the starting weights (full / freeze) or ref_model."""

    def __init__(self, model: torch.nn.Module, description: str):
        self.model = model
        self.description = description

    @torch.no_grad()
    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return token_nll(self.model, batch)


def build_reference(r: Mapping[str, Any], engine: Any) -> AdapterReference | ModelReference | None:
    """The reference the recipe asks for (None for orpo / simpo), placed and partitioned like the policy."""
    cfg = PrefConfig.from_recipe(r)
    if not cfg.needs_reference:
        return None
    if r["ref_model"] is None and r["finetuning_type"] == "lora":
        return AdapterReference(engine)
    from pipeline.model.build import apply_finetuning_type, load_base

    if r["ref_model"] is not None:
        from pipeline.model.weights import load_model

        model = load_model(r["ref_model"], seed=int(r["seed"]))
        check_vocabulary(model, engine.module, r)
        description = f"ref_model {r['ref_model']}"
    else:
        # the starting weights as the policy gets them (an adapter_name_or_path folded in), not trained
        model = apply_finetuning_type(load_base(r, dropout=False), {**r.to_dict(), "finetuning_type": "full"})
        description = "the starting model (a frozen copy)"
    model.requires_grad_(False).eval()
    return ModelReference(_place(model, r, engine), description)


def check_vocabulary(ref: torch.nn.Module, policy: torch.nn.Module, r: Mapping[str, Any]) -> None:
    ref_vocab, vocab = ref.cfg.vocab_size, policy.cfg.vocab_size
    if ref_vocab != vocab:
        raise UserError(f"ref_model {r['ref_model']}: a vocabulary of {ref_vocab:,} tokens, but the policy "
                        f"({r['model_name_or_path']}) has {vocab:,}; the reference must score the same tokens")


def _place(model: torch.nn.Module, r: Mapping[str, Any], engine: Any) -> Any:
    """On the policy's device and dtype; under ZeRO-3 a DeepSpeed engine of its own (partitioned, no optimizer)."""
    if r["zero_stage"] == 3:
        import copy

        import deepspeed

        config = copy.deepcopy(r.ds_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config.get("zero_optimization", {}).pop("offload_optimizer", None)
        ref_engine, *_ = deepspeed.initialize(model=model, config=config)
        ref_engine.eval()
        return ref_engine
    dtype = torch.bfloat16 if r["bf16"] else torch.float16 if r["fp16"] else torch.float32
    return model.to(device=engine.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- the objective

class PreferenceObjective:
    """What the trainer calls per micro-batch for stage dpo: (mean loss over the pairs, metric means)."""

    def __init__(self, r: Mapping[str, Any], engine: Any, reference: Any):
        self.cfg = PrefConfig.from_recipe(r)
        self.engine = engine
        self.reference = reference

    def scores(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses and metrics: the reference pass (no grad) first, then the policy's."""
        reference = pair_logps(self.reference(batch), batch["labels"]) if self.reference is not None else None
        policy = pair_logps(token_nll(self.engine, batch), batch["labels"])
        return preference_loss(policy, reference, self.cfg)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        losses, metrics = self.scores(batch)
        return losses.mean(), {k: float(v.float().mean()) for k, v in metrics.items()}

    @torch.no_grad()
    def evaluate(self, loader: Any) -> dict[str, float]:
        """eval_loss and eval_rewards/... over the whole val split (pairs repeated to fill ranks not counted)."""
        from pipeline.train import dist
        from pipeline.train.loop import _to_device

        self.engine.eval()
        sums: dict[str, float] = {}
        pairs = 0.0
        for batch in loader:
            batch = _to_device(batch, self.engine.device)
            losses, metrics = self.scores(batch)
            b = len(losses)
            real = (batch["labels"][:b] != -100).any(dim=-1)  # Loader masks the labels of repeated pairs
            for key, values in {"loss": losses, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + float(values.float()[real].sum())
            pairs += float(real.sum())
        self.engine.train()
        keys = list(sums)
        totals = dist.all_sum([sums[k] for k in keys] + [pairs])
        count = max(totals[-1], 1.0)
        return {f"eval_{k}": v / count for k, v in zip(keys, totals[:-1])}

