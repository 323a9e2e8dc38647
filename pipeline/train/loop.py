"""The training loop, top to bottom: micro-batches -> forward -> (+ L1) -> engine.backward -> engine.step.

DeepSpeed owns everything numerical around the step: gradient accumulation (engine.step only updates at
the accumulation boundary, and backward divides the loss by gradient_accumulation_steps), averaging over
ranks, mixed precision with fp32 master weights, fp16 loss scaling, clipping to max_grad_norm, ZeRO. This
loop feeds batches, watches the loss, and decides when to log, evaluate, save and stop.

pt / sft weigh every trained token of an update the same, however the tokens fall into micro-batches and
ranks: the loss of an update is the cross-entropy summed over all its labelled tokens (every micro-batch,
every rank) divided by their number, as transformers' Trainer does with num_items_in_batch and
average_tokens_across_devices (LLaMA-Factory's sft). A mean per micro-batch, averaged, would weigh the
tokens of a micro-batch with few trained tokens more: 2 ranks x 2 rows would not be 1 rank x 4 rows.

Epochs follow the recipe's step arithmetic: an epoch is floor(batches per rank / batches per step) optimizer
steps (pipeline.recipe.batches_per_step: the accumulation; stage ppo's PPO step x ppo_buffer_size); micro-batches
left over at the end of an epoch are not used. The data position (epoch, batch index)
advances with every micro-batch drawn, so a resumed run skips exactly what was consumed.
"""
from __future__ import annotations

import math
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping

from pipeline.data.packing import EXAMPLE_KEY, model_inputs
from pipeline.recipe.args import TrainArgs
from pipeline.recipe.evaluation import eval_due, periodic_due
from pipeline.errors import UserError
from pipeline.runtime import deepspeed_compat
from pipeline.runtime import dist
from pipeline.runtime.batches import host_floats, lm_batch, to_device, trained_tokens
from pipeline.runtime.log import progress_eta
from pipeline.train.accuracy import example_accuracy_sums
from pipeline.train.checkpoint import TrainState
from pipeline.train.step_profile import StepProfiler

MAX_CONSECUTIVE_SKIPS = 16  # nan_policy: skip gives up when this many micro-batches in a row are non-finite
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop finishes the current step, saves a checkpoint and returns.

    A second Ctrl-C gets the default behaviour (interrupts at once). A repeated SIGTERM is ignored: under the
    deepspeed launcher a job-wide SIGTERM (scancel, kill -TERM -PGID) reaches each rank twice, from the
    scheduler and forwarded by the launcher, and schedulers escalate to SIGKILL on their own.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        for signum in EXIT_CODES:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (tests driving run() from a thread): no handlers
                pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGTERM and self.signum == signal.SIGTERM:
            return  # the same stop, delivered twice
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            then = "press Ctrl-C again to stop at once"
        else:
            then = "a repeated SIGTERM is ignored; SIGKILL stops at once"
        if dist.is_main():  # sys.__stderr__: sys.stderr may be redirected at this moment (run.quietly)
            print(f"\n{signal.Signals(signum).name}: finishing the current step, then saving a checkpoint ({then})",
                  file=sys.__stderr__, flush=True)

    def requested(self) -> bool:
        """Agreed over ranks, so that every rank stops after the same step."""
        return dist.any_rank(self.signum is not None)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 1) if self.signum is not None else 0


class BatchStream:
    """Training micro-batches in order from a resumable position (epoch, batch index within the epoch).
    `per_step`: the micro-batches one step draws (pipeline.recipe.batches_per_step)."""

    def __init__(self, loader: Any, state: TrainState, per_step: int):
        self.loader, self.state, self.per_step = loader, state, per_step
        self._it: Iterator[dict] | None = None

    def next(self) -> dict:
        while True:
            if self._it is None:
                self.loader.set_epoch(self.state.epoch)
                self._it = self.loader.iter_from(self.state.batch_in_epoch)
            batch = next(self._it, None)
            if batch is not None:
                self.state.batch_in_epoch += 1
                return batch
            self.new_epoch()

    def end_of_step(self) -> None:
        """Start the next epoch when what is left of this one cannot fill an optimizer step."""
        if self.state.batch_in_epoch + self.per_step > len(self.loader):
            self.new_epoch()

    def new_epoch(self) -> None:
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        self._it = None

    @property
    def epoch_float(self) -> float:
        return self.state.epoch + self.state.batch_in_epoch / max(1, len(self.loader))


@dataclass
class Window:
    """Sums since the last log line (local to this rank; summed over ranks when logged).

    `loss`, `l1`, `fresh_loss` and the `extra` metrics of objectives that return device tensors (dpo, kto, rm:
    float64) become float64 device tensors once the loop adds to them: it adds each step's values on the device,
    unread, and train_metrics (at log points) or sums (at save points) read them in one
    transfer (host_floats). float64 does on the device exactly the double arithmetic Python did on the values read
    per micro-batch (a float32 loss widens exactly), so every logged value is the same to the bit."""

    steps: int = 0
    loss: Any = 0.0
    l1: Any = 0.0
    tokens: int = 0
    trained_tokens: int = 0
    lr: float = 0.0  # of the window's last step
    started: float = field(default_factory=time.monotonic)
    extra: dict[str, Any] = field(default_factory=dict)  # the objective's metrics (dpo: rewards/...), summed
    fresh_loss: Any = 0.0  # the part of `loss` trained by this process (a resumed window's saved part excluded)

    SAVED = ("steps", "loss", "l1", "tokens", "trained_tokens", "lr", "extra")

    def sums(self) -> dict[str, Any]:
        """What a checkpoint keeps of the window (per rank): a stop between two log lines would otherwise make the
        next line after the resume average only the resumed steps, unlike the uninterrupted run's. Plain numbers:
        the device sums are read here (one transfer)."""
        sums = {name: getattr(self, name) for name in self.SAVED}
        sums["loss"], sums["l1"], *extra = host_floats([self.loss, self.l1, *self.extra.values()])
        sums["extra"] = dict(zip(self.extra, extra))
        return sums

    @classmethod
    def resumed(cls, sums: Mapping[str, Any] | None) -> "Window":
        """The window a checkpoint saved (its clock restarts now); an empty one for checkpoints without it."""
        return cls(**{name: sums[name] for name in cls.SAVED if name in sums}) if sums else cls()

    @classmethod
    def regrouped(cls, saved: list[Mapping[str, Any] | None], world: int, rank: int) -> "Window":
        """This rank's window when the checkpoint's ranks (one `saved` sums each) were another number
        (pipeline.train.world_change): rank 0 takes every sum, the others none, so the next log line is the
        uninterrupted run's. The loss, l1 and the objective's metrics are logged as their sum over ranks / ranks
        (a rank's step loss carries the rank count: Trainer.step_scale), so they move from the saved rank count
        to this one; token counts are plain sums."""
        if not saved or any(s is None for s in saved):
            return cls()
        sums: list[Mapping[str, Any]] = [s for s in saved if s is not None]
        share = (world / len(sums)) if rank == 0 else 0.0
        mine = {**sums[0], "extra": {k: share * sum(s["extra"][k] for s in sums) for k in sums[0]["extra"]}}
        for name in ("loss", "l1"):
            mine[name] = share * sum(s[name] for s in sums)
        for name in ("tokens", "trained_tokens"):
            mine[name] = sum(s[name] for s in sums) if rank == 0 else 0
        return cls.resumed(mine)

    def add_loss(self, step_loss: Any) -> None:
        """One optimizer step's loss (the mean over its micro-batches; a float or a float64 device tensor, left
        unread), into the log line and the run's mean."""
        self.loss += step_loss
        self.fresh_loss += step_loss


def l1_penalty(params: list[Any], l1_lambda: float) -> Any:
    """l1_lambda * sum |w| over the trainable weights (in fp32)."""
    return l1_lambda * sum(p.float().abs().sum() for p in params)


def grad_norm(params: list[Any]) -> Any:
    """Global L2 norm of the (already averaged) gradients, for logging only: a device tensor, unread (host_floats
    reads it where it is logged; it must be taken before engine.step zeroes the gradients), 0.0 without gradients."""
    import torch

    norms = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else 0.0


def _nonfinite_message(fp16: bool, step: int, value: float, engine: Any, skipped: bool = False) -> str:
    scale = f" (fp16 loss scale {deepspeed_compat.loss_scale(engine):g})" if fp16 else ""
    lead = (f"{MAX_CONSECUTIVE_SKIPS} consecutive micro-batches had a non-finite loss, the last" if skipped
            else "the training loss")
    return (f"{lead} at optimizer step {step} is {value}{scale}; stopped before updating the weights (the last "
            "checkpoint is intact). Try a lower learning_rate, more warmup (warmup_ratio), max_grad_norm 1.0, bf16 "
            "instead of fp16, or nan_policy: skip to drop such batches")


class Trainer:
    """One training run on a DeepSpeed engine; `train()` is the loop."""

    def __init__(self, engine: Any, train: TrainArgs, state: TrainState, loader: Any, *,
                 evaluate: Callable[[], dict[str, float]] | None, save: Callable[[], Any], log: Any,
                 stop: StopRequest, objective: Callable[[dict[str, Any]], tuple[Any, dict[str, Any]]] | None = None,
                 profiler: StepProfiler | None = None):
        self.engine, self.args, self.state = engine, train, state
        self.objective = objective or self.language_model_loss  # batch -> (loss, metrics); dpo: PreferenceObjective
        # moe_aux_loss_coef on a model with sparse MoE blocks (pt / sft: the recipe rules refuse the other stages)
        self.moe_aux = moe_aux_coef(train, engine.module) if self.objective == self.language_model_loss else None
        # micro-batches a step draws: the accumulation (stage ppo: x ppo_buffer_size, pipeline.recipe.batches_per_step)
        self.data = BatchStream(loader, state, train.batches_per_step)
        self.evaluate, self.save, self.log, self.stop = evaluate, save, log, stop
        self.profiler = profiler or StepProfiler(None)  # PIPELINE_PROFILE: torch.profiler over chosen steps
        self.params = [p for p in engine.module.parameters() if deepspeed_compat.trains(p)]
        self.own_grad_norm = not deepspeed_compat.reports_grad_norm(engine)  # then the loop measures it itself
        self.last_saved_step: int | None = None
        self.window = Window()  # sums since the last log line; a resume restores the checkpoint's (Window.resumed)
        self.last_record: dict[str, Any] = {}
        self.loss_total, self.first_step = 0.0, state.global_step  # train_loss (mean_loss): this call's steps
        self._unflushed = [0, 0]  # this rank's tokens / trained tokens not yet added to state

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the objective beside the weights, optimizer, RNG and data position (stage
        dpo's BCO running mean; {} for the others): checkpoint.save's `objective`."""
        state = getattr(self.objective, "checkpoint_state", None)
        return state() if state is not None else {}

    def restore(self, saved: Mapping[str, Any]) -> None:
        """A resume's state from checkpoint_state (checkpoint.saved_objective)."""
        restore = getattr(self.objective, "restore", None)
        if restore is not None:
            restore(saved)

    # ------------------------------------------------------------------------------------------ one step
    def language_model_loss(self, batch: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        """pt / sft: cross-entropy (label-smoothed, or DFT / EAFT-weighted: loss_keywords) summed over the labelled
        tokens (step_scale divides by the update's count, LLaMA-Factory's num_items_in_batch)."""
        total, _ = self.engine(batch["input_ids"], labels=batch["labels"], reduction="sum", **model_inputs(batch),
                               **loss_keywords(self.args))
        if self.moe_aux is None:
            return total, {}
        from pipeline.model.moe import load_balancing_loss

        return total, {AUX_LOSS: load_balancing_loss(self.engine.module, batch[ROUTER_MASK])}

    def step_scale(self, batches: list[dict[str, Any]]) -> float:
        """What each micro-batch's loss is multiplied by before backward, so that the update follows the objective:
        DeepSpeed divides the backward by the accumulation steps and averages gradients over ranks, so the factor
        carries ranks x accumulation.

        pt / sft (summed losses): ranks x accumulation / the labelled tokens of the whole update (a collective:
        every rank's count). dpo (a mean per micro-batch): 1, each micro-batch's mean counts the same, as TRL's
        DPOTrainer. With nan_policy: skip, a micro-batch drawn to replace a dropped one keeps this factor: the
        micro-batches before it are already in the gradients, so every trained token still weighs the same, but that
        update's gradient is its token mean's times (tokens trained / tokens drawn); its logged loss is the mean over
        the tokens trained (optimizer_step)."""
        if self.objective != self.language_model_loss:
            return 1.0
        labelled = dist.all_sum([sum(trained_tokens(b) for b in batches)])[0]  # host batches: no device read
        return dist.world_size() * self.args.gradient_accumulation_steps / max(labelled, 1.0)

    def micro_batch(self, batch: dict[str, Any]) -> tuple[dict[str, Any], Any, dict[str, Any]]:
        """This micro-batch (or, when nan_policy: skip drops it, the next finite one): the host batch trained (its
        tokens are counted there), its loss and metrics.

        Only nan_policy: skip reads the loss here: it must decide before the backward whether the batch counts.
        nan_policy: stop reads the step's losses once, before the update is applied (stop_if_nonfinite)."""
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            device_batch = to_device(lm_batch(batch), self.engine.device)
            if self.moe_aux is not None:  # the router's loss counts the real tokens, also where the forward needs
                device_batch[ROUTER_MASK] = batch["attention_mask"].to(self.engine.device)  # no mask (right padding)
            loss, metrics = self.objective(device_batch)
            if self.args.nan_policy != "skip":
                return batch, loss, metrics
            value = float(checked_loss(loss, metrics))
            if not dist.any_rank(not math.isfinite(value)):
                return batch, loss, metrics
            self.state.skipped_batches += 1  # no backward: nothing of this batch reaches the gradients
            del loss
            batch = self.data.next()
        raise UserError(_nonfinite_message(self.args.fp16, self.state.global_step + 1, value, self.engine, skipped=True))

    def optimizer_step(self, window: Window) -> Any:
        """gradient_accumulation_steps micro-batches and one DeepSpeed update; returns the grad norm, unread (a
        device tensor, a float or None: train_metrics reads it at log points only).

        One device read per step on the default path (stop_if_nonfinite); the losses, the L1 penalty, the norm and
        the objective's metrics (dpo / kto / rm: device tensors) stay on the device until a log line needs them, and
        the tokens are counted on the host batches."""
        own_norm = None
        window.lr = float(self.engine.get_lr()[0])  # the rate this update uses (the scheduler steps after it)
        l1_lambda = self.args.l1_lambda
        accumulation = self.args.gradient_accumulation_steps
        batches = [self.data.next() for _ in range(accumulation)]
        scale = self.step_scale(batches)
        skipped, trained_batches, step_loss, step_aux, losses = self.state.skipped_batches, [], 0.0, 0.0, []
        for index, drawn in enumerate(batches):
            batch, loss, metrics = self.micro_batch(drawn)
            losses.append(checked_loss(loss, metrics))  # nan_policy stop checks what is trained, the aux term too
            aux = metrics.get(AUX_LOSS)  # the router's loss, with its graph: logged detached, trained below
            if aux is not None:
                metrics[AUX_LOSS] = aux.detach()
            trained_batches.append(batch)
            for key, value in metrics.items():
                window.extra[key] = window.extra.get(key, 0.0) + value / accumulation
            loss = loss * scale  # this micro-batch's share of the update, times ranks x accumulation
            total = loss
            if aux is not None:  # coef x aux in full per micro-batch, as transformers' Trainer adds it (its loss is
                # not divided by the accumulation, and is multiplied by the ranks: average_tokens_across_devices);
                # DeepSpeed's backward divides by both again. Logged in the loss as that Trainer logs it (moe_step_aux)
                weighted = self.moe_aux * dist.world_size() * accumulation * aux
                total = total + weighted
                step_aux += weighted.detach().double() / accumulation
            if l1_lambda:
                penalty = l1_penalty(self.params, l1_lambda)
                total = total + penalty
                window.l1 += penalty.detach().double() / accumulation  # unread: host_floats at log points
            self.engine.backward(total)
            if aux is not None:  # activation checkpointing's recompute stored the router logits again
                from pipeline.model.moe import release_router_logits

                release_router_logits(self.engine.module)
            if self.own_grad_norm and self.engine.is_gradient_accumulation_boundary():
                own_norm = grad_norm(self.params)
            if index == accumulation - 1 and self.args.nan_policy != "skip":
                self.stop_if_nonfinite(losses)  # before the boundary's engine.step applies the update
            self.engine_step()
            step_loss += loss.detach().double() / accumulation
            tokens, trained = int(batch["attention_mask"].sum()), trained_tokens(batch)  # the host batch
            window.tokens += tokens
            window.trained_tokens += trained
            self._unflushed[0] += tokens
            self._unflushed[1] += trained
        if self.state.skipped_batches != skipped:  # a micro-batch was replaced, on every rank (micro_batch agrees)
            step_loss *= self.step_scale(trained_batches) / scale  # divided by the tokens trained, not those drawn
        window.add_loss(step_loss + step_aux)
        self.data.end_of_step()
        norm = self.engine.get_global_grad_norm()
        return own_norm if norm is None else norm

    def stop_if_nonfinite(self, losses: list[Any]) -> None:
        """nan_policy: stop. The update's micro-batch losses, read in one transfer after the last backward and before
        the engine.step that applies the update (DeepSpeed updates at the accumulation boundary only), so a non-finite
        loss still stops the run before any weight changes. The ranks agree per micro-batch (one collective of
        `accumulation` flags, on every rank at every step), and the message names this rank's loss of the first
        micro-batch some rank found non-finite: what a check after each forward reported, without a read each."""
        values = host_floats(losses)
        flags = dist.all_sum([0.0 if math.isfinite(v) else 1.0 for v in values])
        for value, flag in zip(values, flags):
            if flag > 0:
                raise UserError(_nonfinite_message(self.args.fp16, self.state.global_step + 1, value, self.engine))

    def engine_step(self) -> None:
        try:
            self.engine.step()
        except Exception as err:  # DeepSpeed's fp16 scaler gives up when it cannot go below min_loss_scale
            if "loss scale" not in str(err).lower():
                raise
            raise UserError(
                f"fp16 gradients overflowed at optimizer step {self.state.global_step + 1} even at the minimum loss "
                f"scale {deepspeed_compat.loss_scale(self.engine)} (min_loss_scale {self.args.min_loss_scale}): "
                "the loss is diverging. "
                "Try a lower learning_rate, max_grad_norm 1.0, a lower min_loss_scale, or bf16 on GPUs that have it"
            ) from None

    # ------------------------------------------------------------------------------------------ the loop
    def train(self) -> str:
        """Runs to total_steps; returns 'done', or 'stopped' after a signal (a checkpoint is saved either way)."""
        from tqdm import tqdm

        args, state = self.args, self.state
        total = args.total_steps
        first_step, started = state.global_step, time.monotonic()
        self.first_step = first_step
        bar = tqdm(total=total, initial=first_step, desc="train", unit="step", file=sys.stderr,
                   disable=not dist.is_main(), dynamic_ncols=True)
        try:
            while state.global_step < total:
                window = self.window
                with self.profiler.step(state.global_step + 1):
                    norm = self.optimizer_step(window)
                state.global_step += 1
                window.steps += 1
                bar.update(1)
                step, last = state.global_step, state.global_step == total
                record: dict[str, Any] = {}
                if periodic_due(args.logging_strategy, args.logging_steps, step, args.steps_per_epoch) or last:
                    record.update(self.train_metrics(window, norm, started, bar))
                    window = self.window = Window()
                    bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
                if self.evaluate is not None and eval_due(args, step, last):
                    record.update(self.evaluate())
                if record:
                    record = {"step": step, "epoch": round(self.data.epoch_float, 4), **record}
                    self.log.write(record)
                    self.last_record.update(record)
                stopping = self.stop.requested()
                if periodic_due(args.save_strategy, args.save_steps, step, args.steps_per_epoch) or stopping:
                    self.flush_tokens()
                    self.save()
                    self.last_saved_step = step
                    # a signal during a periodic save: this step is saved already, stop here (not a step and a
                    # second save later)
                    stopping = stopping or self.stop.requested()
                if stopping:
                    return "stopped"
                if window.steps == 0:  # evaluation and saving do not count against the next window's tokens/s
                    window.started = time.monotonic()
        finally:
            bar.close()
            self.profiler.close(state.global_step)
        return "done"

    def mean_loss(self) -> float | None:
        """all_results.json's train_loss as transformers' Trainer computes it: every optimizer step's loss (the
        ranks' mean) summed over the steps this call trained, over their number; a resumed call's mean starts at
        the resumed step (transformers' `_total_loss_scalar` restarts there). None when this call trained no step.
        Every step is in some log line (the last step always logs), so loss_total is complete at the end."""
        steps = self.state.global_step - self.first_step
        return self.loss_total / steps if steps else None

    def flush_tokens(self) -> None:
        """Add every rank's token counts to the state (collective: at log and save points only)."""
        tokens, trained = dist.all_sum(self._unflushed)
        self.state.tokens_seen += int(tokens)
        self.state.trained_tokens_seen += int(trained)
        self._unflushed = [0, 0]

    def train_metrics(self, window: Window, norm: Any, started: float, bar: Any) -> dict[str, Any]:
        """The log line of the steps in `window`; its eta is the progress bar's own (runtime.log.progress_eta)."""
        args, state = self.args, self.state
        names = list(window.extra)  # the same on every rank: one objective
        loss, fresh, l1, norm, *extra = host_floats([window.loss, window.fresh_loss, window.l1, norm,
                                                      *window.extra.values()])  # one device read
        loss, fresh, l1, tokens, trained, *extra = dist.all_sum([
            loss, fresh, l1, window.tokens, window.trained_tokens, *extra])
        world = dist.world_size()
        self.loss_total += fresh / world
        self.flush_tokens()
        now = time.monotonic()
        seconds = max(now - window.started, 1e-9)
        elapsed = now - started
        record: dict[str, Any] = {
            "loss": loss / world / window.steps,
            "lr": window.lr,
            "grad_norm": norm,
            "tokens_per_s": tokens / seconds,
            "trained_tokens_per_s": trained / seconds,
            "tokens_seen": state.tokens_seen,
            "trained_tokens_seen": state.trained_tokens_seen,
            "elapsed": round(elapsed, 3),
        }
        eta = progress_eta(bar)
        if eta is not None:
            record["eta"] = round(eta, 3)
        record.update({name: value / world / window.steps for name, value in zip(names, extra)})
        finish = getattr(self.objective, "finish_metrics", None)  # kto: summed rewards -> means per side
        if finish is not None:
            record = finish(record)
        if args.l1_lambda:
            record["l1"] = l1 / world / window.steps
        if args.fp16:
            record["loss_scale"] = deepspeed_compat.loss_scale(self.engine)
        if state.skipped_batches:
            record["skipped_batches"] = state.skipped_batches
        return record


AUX_LOSS = "aux_loss"  # the router's load-balancing loss of a micro-batch (metrics key; logged as the mean)


def checked_loss(loss: Any, metrics: Mapping[str, Any]) -> Any:
    """What nan_policy checks of a micro-batch, detached: its loss plus the router's aux loss when the objective has
    one (moe_aux_loss_coef), since the update trains (and the log line shows) their sum: a non-finite aux loss
    beside a finite cross-entropy must stop or skip as a non-finite cross-entropy does."""
    aux = metrics.get(AUX_LOSS)
    return (loss if aux is None else loss + aux).detach()
ROUTER_MASK = "router_mask"  # the host batch's attention_mask, for the aux loss (model_inputs passes it to no model)


def moe_aux_coef(train: TrainArgs, model: Any) -> float | None:
    """moe_aux_loss_coef where the model has sparse MoE blocks (which then keep their router logits for
    pipeline.model.moe.load_balancing_loss), else None: LLaMA-Factory's configure_moe sets nothing on a dense model."""
    if not train.moe_aux_loss_coef:
        return None
    from pipeline.model.moe import collect_router_logits, sparse_blocks

    if next(sparse_blocks(model), None) is None:
        return None
    cfg = getattr(model, "cfg", None)
    if cfg is not None and not cfg.hf.moe.router_loss:  # gpt_oss (LLaMA-Factory sets no output_router_logits), the
        return None  # DeepSeek-V3 routers of glm4_moe / deepseek_v3 (balanced by their correction bias: no such loss)
    collect_router_logits(model)
    return float(train.moe_aux_loss_coef)


def loss_keywords(train: TrainArgs) -> dict[str, Any]:
    """The model's keywords for the pt / sft loss the recipe chose: label_smoothing (label_smoothing_factor) or
    token_weight (use_dft_loss, use_eaft_loss with eaft_alpha: LLaMA-Factory's weighted cross-entropy); none for
    the plain cross-entropy (the forward is the one it always was). The rules let one at most be set."""
    if train.use_dft_loss or train.use_eaft_loss:
        from pipeline.model.head_loss import TokenWeight

        return {"token_weight": TokenWeight("dft") if train.use_dft_loss else TokenWeight("eaft", train.eaft_alpha)}
    return {"label_smoothing": float(train.label_smoothing_factor)} if train.label_smoothing_factor else {}


def evaluate(engine: Any, loader: Any, accuracy: bool = False,
             loss: Mapping[str, Any] | None = None, moe_aux: float | None = None) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the whole val split (all ranks) and its perplexity; with `accuracy`
    (compute_accuracy) also eval_accuracy, the mean over all ranks' examples of each one's token accuracy
    (pipeline.train.accuracy). Without it the forward is the one it always was.

    With `loss` (loss_keywords: label_smoothing_factor, use_dft_loss, use_eaft_loss) eval_loss is that loss, the
    training objective, as transformers' Trainer reports it (its compute_loss applies the label smoother or
    compute_loss_func in evaluation too), so the train and eval curves compare; eval_perplexity is left out, since
    exp of such a loss is no perplexity (the eval command reports the plain cross-entropy and perplexity).

    With `moe_aux` (moe_aux_coef: moe_aux_loss_coef on a sparse MoE model) eval_loss adds moe_aux x the router's
    load-balancing loss as transformers' evaluation does (Qwen3MoeForCausalLM's forward adds router_aux_loss_coef x
    aux_loss to each batch's loss, without num_items_in_batch's scaling; the batches' losses are averaged weighted by
    their rows): the row-weighted mean of each val micro-batch's aux loss, logged also alone as eval_aux_loss;
    eval_perplexity stays exp of the cross-entropy.

    No device read per batch (each stops the host until the device drains): the sums stay float64 device tensors,
    the token and example counts and the right-padding question are answered on the host batch (lm_batch), and the
    end reads everything at once after dist.all_sum_unread's one all-reduce. float64 on the device is the double
    arithmetic Python did on the values read per batch before, so every number is the same to the bit."""
    import torch

    engine.eval()
    total: Any = 0.0  # float64 device sums, unread until the end (one all-reduce, one read)
    scores: Any = 0.0
    aux: Any = 0.0  # sum over micro-batches of rows x the router's loss (moe_aux)
    count = examples = rows = 0  # counted on the host batches
    with torch.no_grad():
        for host in loader:
            count += trained_tokens(host)
            batch = to_device(lm_batch(host), engine.device)
            out = engine(batch["input_ids"], labels=batch["labels"], reduction="sum", **model_inputs(batch),
                         **({"predict": True} if accuracy else {}), **(loss or {}))
            total = total + out[0].detach().double()
            if moe_aux is not None:
                from pipeline.model.moe import load_balancing_loss

                n = int(host["attention_mask"].shape[0])
                aux = aux + n * load_balancing_loss(engine.module, host["attention_mask"]).double()
                rows += n
            if accuracy:
                score, scored = example_accuracy_sums(host["labels"], out[2], host.get(EXAMPLE_KEY))
                scores = scores + score
                examples += scored
    engine.train()
    total, count, scores, examples, aux, rows = dist.all_sum_unread([total, count, scores, examples, aux,
                                                                     rows]).tolist()
    mean = total / max(count, 1)
    metrics = {"eval_loss": mean, **({} if loss else {"eval_perplexity": math.exp(min(mean, 700.0))})}
    if moe_aux is not None:
        metrics["eval_aux_loss"] = aux / max(rows, 1)
        metrics["eval_loss"] = mean + moe_aux * metrics["eval_aux_loss"]
    if accuracy:
        metrics["eval_accuracy"] = scores / max(examples, 1)
    return metrics
