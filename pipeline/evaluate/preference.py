"""Held-out preference metrics of a dpo recipe, base vs tuned (used by pipeline.evaluate.run).

For every held-out pair the model's summed log-probabilities of the chosen and the rejected response
(the training's pair batches and masks). From them:

- preference_accuracy: the fraction of pairs where log pi(chosen) - log pi(rejected) > 0;
- logp_margin: the mean of log pi(chosen) - log pi(rejected);
- reward_margin / reward_accuracy: the training's rewards (pipeline.model.preference, TRL's definition):
  the mean of beta ((pi_c - ref_c) - (pi_r - ref_r)) and the fraction where it is > 0, with the reference
  of training (ref_model, else the base model; for the base model itself the margin is 0 by definition);
  orpo / simpo have no reference and use beta x the length-averaged log-probabilities;
- pref_loss: the recipe's preference loss on the held-out pairs, on the plain summed log-probabilities and
  without the BCO term: ld_alpha's weighting is the trained policy's alone (the base row would score against
  itself with another weighting) and BCO's baseline is a running mean that only training keeps (its eval_loss
  has both, as LLaMA-Factory's);
- loss: the mean NLL per token of the chosen responses (the report's loss and perplexity).

A kto recipe's held-out rows are scored the same way (an example and its KL sequence in place of a pair,
pipeline.data.feedback), and give kto_summary's metrics: reward_chosen / reward_rejected (the mean of
beta (pi - ref) over the desirable / undesirable examples), reward_margin, kl (the KL estimate over the whole split),
kto_loss (the training loss on the split as one batch); loss is over the desirable responses.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import torch
from tqdm import tqdm

from pipeline.data.args import DataArgs
from pipeline.model.build import ModelArgs
from pipeline.model.preference import FeedbackLogps, PairLogps, kl_term, kto_loss, kto_means, pair_logps, \
    preference_loss
from pipeline.recipe.args import PreferenceArgs


@torch.no_grad()
def split_logps(model: torch.nn.Module, data: DataArgs, *, rank: int = 0, world: int = 1,
                label: str = "") -> PairLogps:
    """Log-probabilities of every val pair (every rank gets all of them, in split order)."""
    from pipeline.data.loaders import pair_loader
    from pipeline.runtime.batches import lm_batch, to_device

    loader = pair_loader(data, "val", rank=0, world_size=1, shuffle=False)
    device = next(model.parameters()).device
    scored: dict[int, list[torch.Tensor]] = {}
    for k in tqdm(range(rank, len(loader), world), desc=f"{label} pairs", unit="batch", disable=rank != 0,
                  leave=False):
        batch = to_device(lm_batch(loader.batch(k)), device)
        nll = model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
                    reduction="none")
        scores = pair_logps(nll.float(), batch["labels"])
        scored[k] = [scores.chosen, scores.rejected, scores.chosen_tokens, scores.rejected_tokens]
    columns = split_columns(scored, 4, world)
    return PairLogps(torch.tensor(columns[0], dtype=torch.float64), torch.tensor(columns[1], dtype=torch.float64),
                     torch.tensor(columns[2]).long(), torch.tensor(columns[3]).long())


def split_columns(scored: Mapping[int, Sequence[torch.Tensor]], columns: int, world: int) -> list[list[float]]:
    """The eval stage's per-pair values of the whole split: this rank's batches (`scored`, {batch index: its
    `columns` columns of per-row device values}) read in one transfer (host_columns), every rank's gathered
    (all_gather_object: every rank gets all of them), each column in split order. One place for split_logps and
    evaluate.reward.split_scores, which take every world-th batch of the same unsharded loader."""
    local = host_columns(scored)
    if world > 1:
        import torch.distributed as tdist

        parts: list[Any] = [None] * world
        tdist.all_gather_object(parts, local)
        local = {k: v for part in parts for k, v in part.items()}
    return [[x for k in sorted(local) for x in local[k][i]] for i in range(columns)]


def host_columns(scored: Mapping[int, Sequence[torch.Tensor]]) -> dict[int, list[list[float]]]:
    """{batch: [column values, ...]} as Python floats, from each batch's columns of per-row device values (float or
    integer, exact in float64), read in ONE transfer at the end of the split rather than one per batch: each read
    stops the host until the device drains (pipeline.runtime.batches.host_floats' reason)."""
    keys = sorted(scored)
    if not keys:
        return {}
    sizes = [len(scored[k][0]) for k in keys]
    flat = torch.cat([torch.stack([column.double() for column in scored[k]]) for k in keys], dim=1).tolist()
    local, start = {}, 0
    for k, size in zip(keys, sizes):
        local[k] = [values[start:start + size] for values in flat]
        start += size
    return local


def chosen_loss(scores: PairLogps) -> tuple[float, int, int]:
    """(summed NLL of the chosen responses, their tokens, pairs): the report's loss is over the chosen side."""
    return float(-scores.chosen.sum()), int(scores.chosen_tokens.sum()), len(scores.chosen)


def reference_logps(pref: PreferenceArgs, base: ModelArgs, data: DataArgs, scores: Mapping[str, PairLogps], *,
                    rank: int = 0, world: int = 1, device: torch.device | str = "cpu",
                    folded_adapter: str | None = None, dtype: torch.dtype = torch.float32) -> PairLogps | None:
    """The reference's log-probabilities as in training: ref_model, else the base model (already scored when
    eval_base is on), with `folded_adapter` (full / freeze training on top of adapter_name_or_path: training's
    frozen reference has that adapter folded in); None for orpo / simpo. In `dtype`, the evaluated models' (bf16
    after pure_bf16: training's reference was cast to it, pipeline.train.preference.starting_reference; an fp32
    reference beside bf16 models gave the base model, when it is the reference, a nonzero reward margin)."""
    if not pref.loss_config().needs_reference:
        return None
    if pref.ref_model is None and folded_adapter is None and "base" in scores:
        return scores["base"]
    if pref.ref_model is not None:
        from pipeline.model.build import load_ref_model

        model = load_ref_model(pref.ref_model, base, pref.ref_model_adapters).to(device=device, dtype=dtype).eval()
    elif folded_adapter is not None:  # folded in fp32, then cast, as training's reference
        from pipeline.model.build import fold_adapter, load_base

        model = fold_adapter(load_base(base, dropout=False), folded_adapter, key="adapter_name_or_path")
        model = model.to(device=device, dtype=dtype).eval()
    else:
        from pipeline.model.build import load_for_inference

        model = load_for_inference(base, "base", device=device, dtype=dtype)
    return split_logps(model, data, rank=rank, world=world, label="reference")


def summary(scores: PairLogps, reference: PairLogps | None, pref: PreferenceArgs) -> dict[str, Any]:
    """One model's preference metrics for metrics.json."""
    plain = dataclasses.replace(pref.loss_config(), ld_alpha=None, bco_weight=0.0)  # see the module's pref_loss
    losses, metrics = preference_loss(scores, reference, plain)
    margin = scores.chosen - scores.rejected
    return {
        "preference_accuracy": float((margin > 0).double().mean()),
        "logp_margin": float(margin.mean()),
        "reward_margin": float(metrics["rewards/margins"].mean()),
        "reward_accuracy": float(metrics["rewards/accuracies"].mean()),
        "pref_loss": float(losses.mean()),
        "pairs": len(margin),
    }


def feedback(scores: PairLogps, tags: Any) -> FeedbackLogps:
    """A kto split's scores (split_logps: "chosen" = the examples, "rejected" = their KL sequences) with the tags."""
    return FeedbackLogps(scores.chosen, scores.rejected, scores.chosen_tokens, torch.as_tensor(tags, dtype=torch.bool))


def desirable_loss(scores: PairLogps, tags: Any) -> tuple[float, int, int]:
    """(summed NLL of the desirable responses, their tokens, their count): a kto report's loss."""
    keep = torch.as_tensor(tags, dtype=torch.bool)
    return float(-scores.chosen[keep].sum()), int(scores.chosen_tokens[keep].sum()), int(keep.sum())


def kto_summary(scores: PairLogps, reference: PairLogps, tags: Any, pref: PreferenceArgs) -> dict[str, Any]:
    """One model's KTO metrics on the held-out rows for metrics.json."""
    policy, ref = feedback(scores, tags), feedback(reference, tags)
    loss, metrics = kto_loss(policy, ref, kl_term(policy, ref), pref.kto_config())
    means = kto_means({key: float(value) for key, value in metrics.items()})
    return {"kto_loss": float(loss), "reward_chosen": means.get("rewards/chosen"),
            "reward_rejected": means.get("rewards/rejected"), "reward_margin": means.get("rewards/margins"),
            "kl": means["kl"], "desirable": int(policy.desirable.sum()), "undesirable": int((~policy.desirable).sum())}
