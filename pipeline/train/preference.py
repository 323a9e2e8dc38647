"""The preference training objectives (stage dpo, stage kto): reference model and per-micro-batch losses for the loop.

The losses (DPO, hinge, IPO, ORPO, SimPO; KTO) are pipeline.model.preference. The reference is the starting
model: for LoRA the same weights with the adapters switched off (lora.adapters_disabled: no second copy in
memory), for full / freeze a frozen copy (a DeepSpeed engine of its own under ZeRO-3, so it is partitioned
like the policy), or ref_model when given (its ref_model_adapters folded in: pipeline.model.build.load_ref_model).
Stage sft's ASFT loss (pipeline.train.asft) scores against the same reference (starting_reference).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from pipeline.errors import UserError
from pipeline.model import head_loss
from pipeline.model.preference import KTO_METRICS, Baseline, FeedbackLogps, feedback_logps, kl_gaps, kto_loss, kto_means, \
    pair_logps, preference_loss
from pipeline.names import trains_adapter
from pipeline.recipe.args import PreferenceArgs, RecipeModel

if TYPE_CHECKING:
    from pipeline.model.build import ModelArgs


# ---------------------------------------------------------------------------------------------- the reference

Forward = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # batch -> per-token NLL (2B, T)
Scorer = Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]  # (model, batch) -> what a loss reads of it


def token_nll(model: Callable[..., Any], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_ids"], attention_mask=batch.get("attention_mask"), labels=batch["labels"],
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


def disable_dropout(model: torch.nn.Module) -> None:
    """The policy trains without dropout, as TRL's DPOTrainer (disable_dropout=True) and LLaMA-Factory do. The
    reference is scored without it; a policy scored with it is a noisy, lower log-probability of the same weights,
    so step one was not ln 2 and every reward carried the dropout's bias. Both the nn.Dropout modules (embedding,
    residual, LoRA branch) and attention's own dropout_p (drop_rate) go to 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if getattr(module, "drop_rate", 0.0):
            module.drop_rate = 0.0


class AdapterReference:
    """LoRA or OFT: the policy's own weights with the adapters switched off (no second copy in memory)."""

    def __init__(self, engine: Any, base: ModelArgs | None = None, starting_adapter: str | None = None):
        """`starting_adapter`: the adapter_name_or_path the policy continues (`base`: the recipe's base model).
        Switching the adapters off removes it too, so the reference is then the base without it (as in
        LLaMA-Factory), not the model training starts from: the description says so, and the additional_target
        modules the adapter trained (its modules_to_save) go back to the base's too, as PEFT's disable_adapter
        does; kept as loaded, the reference was base Linears with the adapter's norms / head, neither model."""
        from pipeline.model.lora import keep_starting_modules

        self.description = "the starting model (the policy with its adapters switched off)"
        self.engine = engine
        self.plain_head = head_trains(engine.module)  # additional_target lm_head: score as the policy does
        keep_starting_modules(engine.module)  # additional_target modules as they start (train.run refuses ZeRO-3)
        if starting_adapter and base is not None:
            self.description = (f"the base model {base.model_name_or_path} WITHOUT adapter_name_or_path "
                                f"{starting_adapter} (the policy with its adapters switched off, as in "
                                "LLaMA-Factory); for that adapter's model as the reference, merge it and start from "
                                "the merged model, or set ref_model to it")
            restore_base_modules(engine.module, base)

    @torch.no_grad()
    def scored(self, forward: Scorer, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """forward(model, batch) on the reference: the policy with its adapters off, in eval mode."""
        from pipeline.model.lora import adapters_disabled

        with adapters_disabled(self.engine.module), _eval_mode(self.engine.module), \
                head_loss.plain_head() if self.plain_head else contextlib.nullcontext():
            return forward(self.engine, batch)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.scored(token_nll, batch)


def restore_base_modules(model: torch.nn.Module, base: ModelArgs) -> None:
    """The kept starting copies of the additional_target modules (lora.keep_starting_modules) get the base model's
    weights, read from its checkpoint (only those tensors). A tied head's copy shares the embedding copy's weight,
    so it takes the embedding's tensor."""
    from pipeline.model.build import base_subset

    starting = getattr(model, "_lora_starting", {})
    if not starting:
        return
    tied = model.lm_head.weight is model.embed_tokens.weight
    alias = {"lm_head.weight": "embed_tokens.weight"} if tied else {}
    tensors = {f"{name}.{key}": tensor for name, module in starting.items()
               for key, tensor in module.state_dict(keep_vars=True).items()}
    weights = base_subset(base, {alias.get(n, n) for n in tensors})
    with torch.no_grad():
        for name, tensor in tensors.items():
            tensor.copy_(weights[alias.get(name, name)])


def head_trains(model: torch.nn.Module) -> bool:
    """Whether the policy's output head takes gradients (full fine-tuning, additional_target lm_head): then its
    log-probabilities come from the plain head path, and a frozen reference must take that path too."""
    return any(p.requires_grad for p in model.lm_head.parameters())


class ModelReference:
    """A separate frozen model: a copy of the starting weights (full / freeze) or ref_model. `plain_head`: the
    policy's head trains, so the reference computes its log-probabilities the way the policy does (its own head is
    frozen, which would otherwise take the row-block path and round differently)."""

    def __init__(self, model: torch.nn.Module, description: str, plain_head: bool = False):
        self.model = model
        self.description = description
        self.plain_head = plain_head

    @torch.no_grad()
    def scored(self, forward: Scorer, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """forward(model, batch) on the frozen reference model."""
        with head_loss.plain_head() if self.plain_head else contextlib.nullcontext():
            return forward(self.model, batch)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.scored(token_nll, batch)


def build_reference(pref: PreferenceArgs, models: RecipeModel, engine: Any, *,
                    zero3_config: Mapping[str, Any] | None = None,
                    dtype: torch.dtype = torch.float32) -> AdapterReference | ModelReference | None:
    """The reference the recipe asks for (None for orpo / simpo): starting_reference with its ref_model."""
    if not pref.loss_config().needs_reference:
        return None
    return starting_reference(pref.ref_model, pref.ref_model_adapters, models, engine, zero3_config=zero3_config,
                              dtype=dtype)


def starting_reference(ref_model: str | None, ref_model_adapters: str | None, models: RecipeModel, engine: Any, *,
                       zero3_config: Mapping[str, Any] | None = None,
                       dtype: torch.dtype = torch.float32) -> AdapterReference | ModelReference:
    """The starting model (or ref_model) as a frozen reference, for dpo / kto and sft's ASFT loss, placed and
    partitioned like the policy: on the policy's device in `dtype`, or under ZeRO-3 (zero3_config: the run's
    DeepSpeed config) an engine of its own. Built from the base checkpoint, never from a checkpoint a run resumes,
    so a resumed run scores against the model its first step started from."""
    if ref_model is None and trains_adapter(models.finetune.finetuning_type):
        return AdapterReference(engine, models.model, models.finetune.adapter_name_or_path)
    import dataclasses

    from pipeline.model.build import apply_finetuning_type, load_base

    if ref_model is not None:
        from pipeline.model.build import load_ref_model

        model = load_ref_model(ref_model, models.model, ref_model_adapters)
        check_vocabulary(model, engine.module, ref_model, models.model.model_name_or_path)
        description = f"ref_model {ref_model}" + (f" with ref_model_adapters {ref_model_adapters} folded in"
                                                  if ref_model_adapters else "")
    else:
        # the starting weights as the policy gets them (an adapter_name_or_path folded in), not trained
        model = apply_finetuning_type(load_base(models.model, dropout=False),
                                      dataclasses.replace(models.finetune, finetuning_type="full"))
        description = "the starting model (a frozen copy)"
    model.requires_grad_(False).eval()
    return ModelReference(_place(model, engine, zero3_config, dtype), description,
                          plain_head=head_trains(engine.module))


def check_vocabulary(ref: torch.nn.Module, policy: torch.nn.Module, ref_model: str, policy_name: str) -> None:
    ref_vocab, vocab = ref.cfg.vocab_size, policy.cfg.vocab_size
    if ref_vocab != vocab:
        raise UserError(f"ref_model {ref_model}: a vocabulary of {ref_vocab:,} tokens, but the policy "
                        f"({policy_name}) has {vocab:,}; the reference must score the same tokens")


def _place(model: torch.nn.Module, engine: Any, zero3_config: Mapping[str, Any] | None, dtype: torch.dtype) -> Any:
    """On the policy's device and dtype; under ZeRO-3 a DeepSpeed engine of its own (partitioned, no optimizer)."""
    if zero3_config is not None:
        import copy

        import deepspeed

        config = copy.deepcopy(dict(zero3_config))
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        config.get("zero_optimization", {}).pop("offload_optimizer", None)
        from pipeline.model.moe import zero_stage_policy
        from pipeline.runtime.deepspeed_compat import z3_leaf_modules

        z3_leaf_modules(model, zero_stage_policy(model, config))
        ref_engine, *_ = deepspeed.initialize(model=model, config=config)
        ref_engine.eval()
        return ref_engine
    return model.to(device=engine.device, dtype=dtype)


# ---------------------------------------------------------------------------------------------- the objective

@dataclass
class BcoBaseline:
    """pref_bco_weight's reward baseline delta: the running mean of the micro-batches' mean rewards, as LLaMA-Factory
    0.9.5 keeps it (trl's RunningMoments, trl 0.24 trl/trainer/utils.py:460-498, fed one scalar per micro-batch).

    Every training micro-batch updates it before its BCO term reads it: each rank's mean reward counts once, all
    ranks together (trl's get_global_statistics sums them and their count over ranks), so delta is the plain mean
    of every rank's every micro-batch so far (count starts at 1e-24: the first update is that batch's mean).
    It is training state: a checkpoint saves it and a resume restores it (trainer_state.json "objective"), so a
    resumed run's delta is the uninterrupted run's (LLaMA-Factory itself starts it over at 0 on resume).
    Evaluation reads it without updating it (trl's BCOTrainer does; LLaMA-Factory's prediction_step would also
    fold the eval batches in, which made the training trajectory depend on eval_steps). A micro-batch whose
    rewards are not finite (its loss is not either: nan_policy decides about it) leaves it as it was.

    `mean` and `count` are floats as restored, float64 device tensors once training updates them: the update runs
    on the device, unread (each host read stops the host until the device has drained), in the double arithmetic it
    did on the host; state() reads them at save points."""

    mean: Any = 0.0
    count: Any = 1e-24

    def update(self, batch_mean: torch.Tensor) -> torch.Tensor:
        """Fold this micro-batch's mean reward (every rank's: a collective) in; the new delta (unread)."""
        from pipeline.runtime import dist

        total, ranks = dist.all_sum_unread([batch_mean.detach(), 1.0])
        finite = torch.isfinite(total)
        count = self.count + ranks
        self.mean = torch.where(finite, self.mean + (total / ranks - self.mean) * ranks / count, self.mean)
        self.count = torch.where(finite, count, self.count)
        return self.mean

    def current(self, batch_mean: torch.Tensor) -> Any:
        """Evaluation's delta: the running mean as training left it."""
        return self.mean

    def state(self) -> dict[str, float]:
        """Plain numbers for trainer_state.json (one read of the device values)."""
        from pipeline.runtime.batches import host_floats

        return dict(zip(("mean", "count"), host_floats([self.mean, self.count])))


class PreferenceObjective:
    """What the trainer calls per micro-batch for stage dpo: (mean loss over the pairs, metric means)."""

    def __init__(self, pref: PreferenceArgs, engine: Any, reference: Any):
        disable_dropout(engine.module)
        self.cfg = pref.loss_config()
        self.engine = engine
        self.reference = reference
        self.bco = BcoBaseline() if self.cfg.adds_bco else None

    def scores(self, batch: Mapping[str, torch.Tensor], baseline: Baseline | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses and metrics: the reference pass (no grad) first, then the policy's (LD-DPO's length
        weighting, ld_alpha, is the policy's only, as in LLaMA-Factory). `baseline`: the BCO delta's source
        (training passes the updating one; None: the running mean as it stands)."""
        reference = pair_logps(self.reference(batch), batch["labels"]) if self.reference is not None else None
        policy = pair_logps(token_nll(self.engine, batch), batch["labels"], self.cfg.ld_alpha)
        if baseline is None and self.bco is not None:
            baseline = self.bco.current
        return preference_loss(policy, reference, self.cfg, baseline)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        losses, metrics = self.scores(batch, self.bco.update if self.bco is not None else None)
        return losses.mean(), metric_means(metrics)

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the objective: the BCO running mean ({} without the BCO term)."""
        return {"bco_baseline": self.bco.state()} if self.bco is not None else {}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """A resume's state from checkpoint_state. A checkpoint trained without the BCO term (pref_bco_weight
        applied from the resumed step on) has none: the running mean then starts there."""
        if self.bco is not None and "bco_baseline" in saved:
            self.bco = BcoBaseline(**saved["bco_baseline"])

    def evaluate(self, loader: Any) -> dict[str, float]:
        """eval_loss and eval_rewards/... over the whole val split (pairs repeated to fill ranks not counted)."""
        return evaluate_pairs(self.engine, loader, self.scores)


def metric_means(metrics: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A micro-batch's per-pair metrics as their means, float64 device tensors left unread (stage dpo's, stage rm's):
    the loop sums them in its Window and reads them at log points only (pipeline.runtime.batches.host_floats), since
    each read stops the host until the device has drained. The mean is taken in float32 and widened exactly, so each value is the
    float(mean) the loop was given before, and the Window's float64 sums are Python's double sums of those."""
    return {k: v.detach().float().mean().double() for k, v in metrics.items()}


PairScores = Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, Mapping[str, torch.Tensor]]]


@torch.no_grad()
def evaluate_pairs(engine: Any, loader: Any, scores: PairScores) -> dict[str, float]:
    """eval_loss and eval_<metric>: the means over every held-out pair of every rank of a pairwise objective's
    per-pair values (stage dpo's losses, stage rm's); pairs repeated to fill the ranks are not counted. The sums stay
    float64 device tensors (the float32 sum of each batch's pairs, widened exactly: what float() read per batch
    before), the pairs are counted on the host batch, and the end reads them once (loop.evaluate's reasons)."""
    from pipeline.runtime import dist
    from pipeline.runtime.batches import labelled_rows, lm_batch, to_device

    engine.eval()
    sums: dict[str, Any] = {}
    pairs = 0
    for host in loader:
        batch = to_device(lm_batch(host), engine.device)
        losses, metrics = scores(batch)
        real = labelled_rows(host["labels"][:len(losses)])  # Loader masks the labels of repeated pairs
        pairs += len(real)
        real = real.to(engine.device, non_blocking=True)
        for key, values in {"loss": losses, **metrics}.items():
            sums[key] = sums.get(key, 0.0) + values.float()[real].sum().double()
    engine.train()
    keys = list(sums)
    totals = dist.all_sum_unread([sums[k] for k in keys] + [pairs]).tolist()
    count = max(totals[-1], 1.0)
    return {f"eval_{k}": v / count for k, v in zip(keys, totals[:-1])}


class KtoObjective(PreferenceObjective):
    """stage kto: LLaMA-Factory's KTO loss per micro-batch of B rows (pipeline.model.preference.kto_loss), with the
    same reference as dpo. One (2B, T) forward scores the examples and their KL sequences: the KL half gets no
    gradient through the loss (its estimate is detached, as in TRL), which is why one forward can hold both.
    The KL estimate is over every rank's micro-batch, as TRL gathers it (global_kl)."""

    def __init__(self, pref: PreferenceArgs, engine: Any, reference: Any):
        super().__init__(pref, engine, reference)
        self.kto = pref.kto_config()

    def logps(self, batch: Mapping[str, torch.Tensor]) -> tuple[FeedbackLogps, FeedbackLogps]:
        """(policy, reference) log-probabilities of the examples and their KL sequences: the reference pass first."""
        tags = batch["kto_tags"]
        reference = feedback_logps(self.reference(batch), batch["labels"], tags)
        return feedback_logps(token_nll(self.engine, batch), batch["labels"], tags), reference

    @staticmethod
    def global_kl(policy: FeedbackLogps, reference: FeedbackLogps) -> torch.Tensor:
        """The KL estimate over every rank's micro-batch (a collective: every rank calls it, even with no rows): the
        mean of pi_KL - ref_KL over all their rows, which is TRL's mean of the ranks' means when, as in training,
        every rank holds as many rows. Not kl_term times the rows: a rank left without rows (eval) adds 0, not NaN,
        and the sum is not rounded through a mean. A float64 device tensor, unread (dist.all_sum_unread): no host
        read per micro-batch; the double arithmetic of the float it was before."""
        from pipeline.runtime import dist

        total, rows = dist.all_sum_unread([kl_gaps(policy, reference).sum(), float(len(policy.kl))])
        return total / rows.clamp(min=1.0)

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and the metrics as float64 device tensors, unread: the loop sums them in its Window and reads
        them at log points; finish_metrics gets the read sums."""
        policy, reference = self.logps(batch)
        loss, metrics = kto_loss(policy, reference, self.global_kl(policy, reference), self.kto)
        return loss, {k: v.detach().double() for k, v in metrics.items()}

    @staticmethod
    def finish_metrics(record: dict[str, float]) -> dict[str, float]:
        """A log window's summed metrics as TRL's means (the loop calls this on every record)."""
        return kto_means(record)

    @torch.no_grad()
    def evaluate(self, loader: Any) -> dict[str, float]:
        """eval_loss (the mean of the micro-batch losses, weighted by their rows), eval_rewards/chosen & co. (means
        over the examples of each side) and eval_kl (the mean over batches) over the whole val split. Rows repeated
        to fill the ranks are left out of every number. No device read per batch: evaluate_pairs' way."""
        from pipeline.runtime import dist
        from pipeline.runtime.batches import labelled_rows, lm_batch, to_device

        self.engine.eval()
        sums: dict[str, Any] = dict.fromkeys(("loss", *KTO_METRICS), 0.0)  # the same keys on every rank, for the all-reduce
        rows = batches = 0
        for host in loader:
            batch = to_device(lm_batch(host), self.engine.device)
            real = labelled_rows(host["labels"][:len(host["kto_tags"])])  # Loader masks repeated rows
            n = len(real)
            real = real.to(self.engine.device, non_blocking=True)
            policy, reference = (_rows(logps, real) for logps in self.logps(batch))
            kl = self.global_kl(policy, reference)
            if not n:  # only repeated rows on this rank (a val split smaller than the ranks)
                continue
            loss, metrics = kto_loss(policy, reference, kl, self.kto)
            sums["loss"] = sums["loss"] + loss.double() * n  # float64 device sums, read once at the end
            for key, value in metrics.items():
                sums[key] = sums[key] + value.double()
            rows, batches = rows + n, batches + 1
        self.engine.train()
        keys = list(sums)
        *values, rows, batches = dist.all_sum_unread([sums[k] for k in keys] + [rows, batches]).tolist()
        out = {f"eval_{k}": v for k, v in zip(keys, values)}
        out["eval_loss"] /= max(rows, 1.0)
        out["eval_kl"] /= max(batches, 1.0)
        return kto_means(out, prefix="eval_")


def _rows(logps: FeedbackLogps, keep: torch.Tensor) -> FeedbackLogps:
    return FeedbackLogps(logps.target[keep], logps.kl[keep], logps.tokens[keep], logps.desirable[keep])
