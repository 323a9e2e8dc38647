"""Stage ppo: LLaMA-Factory 0.9.5's PPO (its train/ppo on TRL 0.9.6's PPOTrainer), one PPO step read top to bottom.

    prompts (per_device_train_batch_size x gradient_accumulation_steps x ppo_buffer_size rows of an sft-format
       dataset: TRL's batch_size as LLaMA-Factory sets it, llamafactory/train/ppo/trainer.py:99-106)
    -> the policy generates a response to each (the recipe's max_new_tokens, do_sample, temperature, top_k, top_p;
       stopping where LLaMA-Factory's rollouts stop, Template.ppo_stop_ids; the EOS it ends with is kept, as
       LLaMA-Factory's get_inputs keeps it; sampling seeded per micro-batch by rollout_seed)
    -> the reward model scores prompt + response (pipeline.model.reward: the token transformers pools), or a reward
       server its decoded text (reward_model_type api: pipeline.model.reward_server, LLaMA-Factory's request)
    -> no-grad passes, one update's rows at a time: the policy's log-probabilities and values, the reference's
       log-probabilities
       (the starting model, pipeline.train.preference.starting_reference: the policy with its LoRA / OFT adapters
       switched off, or a frozen copy under full / freeze)
    -> per-token rewards, GAE advantages and returns (pipeline.model.ppo; score normalisation and whitening over
       all the step's rows)
    -> ppo_epochs passes over all the step's rows in a seeded random order, per_device_train_batch_size rows a
       mini-batch: clipped policy loss + vf_coef x clipped value loss, engine.backward / engine.step (DeepSpeed
       updates every gradient_accumulation_steps mini-batches, as TRL's accelerator.accumulate: ppo_buffer_size
       updates an epoch, as TRL 0.9.6's step() slices its permutation into backward batches,
       trl/trainer/ppo_trainer.py:791-806)
    -> the KL controller moves its coefficient by the step's rows (TRL's n_steps = batch_size x processes,
       ppo_trainer.py:872-876); the learning-rate schedule steps once (TRL steps it per PPO step, :886-887)

Under ZeRO 3 the rollouts decode on the policy's gathered weights (deepspeed_compat.gathered_for_generation: every
parameter whole once per PPO step, DeepSpeed's per-layer hooks off, as TRL 0.9.6's unwrap_model_for_generation), so
ranks whose responses end at different lengths never wait on each other; the no-grad passes and the updates run
through the engine's hooks as any ZeRO-3 forward (every rank runs the same number of them). On several ranks each
rank takes its own prompts (the loader's shard) and gathers what TRL 0.9.6 gathers, nothing more: the KL
controller moves by the ranks' mean KL with batch = rows x ranks (trl/trainer/ppo_trainer.py:866-876,
gather_stats :926-946 all-reduces and divides by the number of processes), ppo_score_norm's moments are those of
every rank's scores (trl/trainer/utils.py:610-611, get_global_statistics :634-649); the whitening of rewards and
advantages stays per rank (ppo_trainer.py:1170-1181, the local masked_whiten), and the logged values are the
ranks' means (gather_stats; the base Trainer averages the log window over the ranks).

The value head is TRL's (dropout 0.1, then Linear(hidden, 1) with a bias) on the last hidden state (after the final
norm), trained beside the adapter by the same optimizer; it is saved beside the adapter as LLaMA-Factory's
value_head.safetensors (keys v_head.summary.weight / .bias). The rollout passes run in eval mode (no dropout, so
the old log-probabilities are the policy's own); the update passes in train mode.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.model.ppo import (PPOConfig, Reduce, RunningMoments, advantages_and_returns, kl_controller,
                                ppo_losses, token_rewards)
from pipeline.model.reward import RewardScorer, ServerScorer
from pipeline.names import V_HEAD_WEIGHTS
from pipeline.runtime import dist
from pipeline.runtime.deepspeed_compat import gathered_for_generation
from pipeline.train.export import Exporter
from pipeline.train.loop import Trainer, Window, grad_norm

V_HEAD_DROPOUT = 0.1  # TRL's ValueHead summary_dropout_prob when the config has none (LLaMA-Factory sets none)
INIT_KL_COEF, KL_HORIZON = 0.2, 10000  # TRL 0.9.6 PPOConfig's init_kl_coef and horizon (LLaMA-Factory keeps them)


class ValueHead(nn.Module):
    """TRL's ValueHead: a scalar per position from the last hidden state."""

    def __init__(self, emb_dim: int, dropout: float = V_HEAD_DROPOUT):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(emb_dim, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(self.dropout(hidden).to(self.summary.weight.dtype)).squeeze(-1)


def attach_value_head(model: nn.Module, seed: int) -> None:
    """model.v_head: a new value head (nn.Linear's own init, drawn from `seed` without touching the global RNG), in
    the model's dtype; a submodule, so the optimizer and DeepSpeed train it with the adapter."""
    dtype = next(model.parameters()).dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.v_head = ValueHead(model.cfg.emb_dim).to(dtype)


@contextlib.contextmanager
def last_hidden(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """The final norm's output of each forward in the block (transformers' hidden_states[-1], which TRL's value head
    reads), caught by a forward hook: the model's forward returns the loss only."""
    caught: list[torch.Tensor] = []
    handle = model.norm.register_forward_hook(lambda _module, _inputs, output: caught.append(output))
    try:
        yield caught
    finally:
        handle.remove()


def rank_sum() -> Reduce | None:
    """On several ranks: a tensor -> its element-wise sum over them (a copy, as accelerate's reduce returns); on
    one, None (the statistics stay the process's own, TRL's single-process branch)."""
    if dist.world_size() == 1:
        return None
    import torch.distributed as tdist

    def reduce(tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone()
        tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
        return out
    return reduce


def ranks_mean(value: torch.Tensor) -> float:
    """The mean of a scalar over the ranks, as TRL's gather_stats takes it (all-reduce SUM, then / the number of
    processes: trl/trainer/ppo_trainer.py:943-945)."""
    reduce = rank_sum()
    return float(value if reduce is None else reduce(value) / dist.world_size())


MASK64 = (1 << 64) - 1


def mix64(value: int) -> int:
    """SplitMix64's output function (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014;
    the finalizer of java.util.SplittableRandom): xor-shifts and odd multiplications modulo 2**64, each invertible, so
    it is a bijection of the 64-bit integers that spreads every input bit over the output."""
    value &= MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


def rollout_seed(seed: int, step: int, micro: int) -> int:
    """The sampling seed of a PPO step's micro-batch `micro` (0 .. accumulation x ppo_buffer_size - 1) at optimizer
    step `step`: a function of the three alone (a resumed run draws what the uninterrupted one drew), and for one
    `seed` a different one for every (step, micro) below 2**32 each: step and micro packed into 64 bits, xored with
    the mixed seed, mixed again; xor with a constant and mix64 are bijections, so distinct pairs never share a seed
    (seed + 1000 x step + micro, the earlier rule, repeated at 1,000 micro-batches a step and across steps)."""
    if not (0 <= step < 1 << 32 and 0 <= micro < 1 << 32):
        raise ValueError(f"rollout_seed: step {step} and micro-batch {micro} must each lie in [0, 2**32)")
    return mix64(mix64(seed) ^ (step << 32 | micro))


def prompt_ids(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """Each sft row's prompt: its tokens up to and including the last one before its last response (labels are
    shifted: labels[t] is the token after position t), so a conversation's earlier turns are its history, as
    LLaMA-Factory's PPO encodes the prompt: every message but the last response, with the assistant prefix."""
    prompts = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        labelled = [t for t, label in enumerate(labels) if label != -100]
        if not labelled:
            raise UserError("stage ppo: a row has no response tokens to tell its prompt by (every label is masked); "
                            "check the dataset's rows")
        start = labelled[-1]
        while start - 1 in labelled:
            start -= 1
        prompts.append(ids[:start + 1])
    return prompts


def sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
              device: torch.device) -> dict[str, torch.Tensor]:
    """prompt + response per row, right-padded with pad_id: input_ids, attention_mask and labels (shifted: the
    response tokens as targets, -100 elsewhere), as the preference batches are laid out."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    labels = torch.full((len(prompts), width), -100, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        ids[row, :len(p) + len(r)] = torch.tensor(p + r)
        mask[row, :len(p) + len(r)] = 1
        labels[row, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(r)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def unmasked(rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """sequences' rows without their attention mask, for the policy's and the reference's forwards: the rows are
    right-padded by construction (prompt + response, then pads), which needs no mask (pipeline.runtime.batches.
    lm_batch's reason: the model would read the device mask in every forward to find that out, a sync), so the
    forward is the one the model ran after dropping the mask itself."""
    return {k: v for k, v in rows.items() if k != "attention_mask"}


def policy_pass(engine: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities of the labelled tokens (B, T), 0 elsewhere; values (B, T)) in one forward, on sequences'
    right-padded rows (unmasked)."""
    with last_hidden(engine.module) as caught:
        nll = engine(batch["input_ids"], labels=batch["labels"], reduction="none")
    return -nll, engine.module.v_head(caught[-1]).float()


def load_reward_model(path: str, kind: str, base: Any, device: Any, dtype: torch.dtype, pad_id: int) -> RewardScorer:
    """The frozen reward model in eval mode and the token it scores at (pipeline.model.reward_folder says which form
    scores how): a score head as saved (full), or (lora) the policy's base built as a reward model with the rm run's
    adapter folded in (its LoRA updates and its score head: the scores LLaMA-Factory gets by swapping the reward
    adapter into the policy); LLaMA-Factory's causal LM (its adapter folded into the policy's base, or its full
    folder) with its value head. `pad_id`: the policy tokenizer's, which a stage rm run here pooled with."""
    from dataclasses import replace

    from pipeline.model.adapter import cast_keeping_adapters
    from pipeline.model.build import fold_adapter, load_base
    from pipeline.model.lora import load_adapter
    from pipeline.model.reward_folder import reward_source
    from pipeline.model.weights import load_model
    from pipeline.recipe.run_folders import reward_folder

    source = reward_source(reward_folder(path, kind), kind, hidden=None)  # the rule checked it against the policy
    if kind == "lora":  # LLaMA-Factory's adapter is a causal LM's: onto the base as it is, a score head's onto stage rm's
        built = load_base(base if source.value_head else replace(base, stage="rm"), dropout=False)
        if base.quantization_bit is None:
            model = fold_adapter(built, str(source.folder), key="reward_model")
        else:  # a 4/8-bit base takes no fold: the adapter stays beside it, as LLaMA-Factory swaps it into its policy
            load_adapter(built, source.folder)
            model = built
    else:
        model = load_model(source.folder)
    if source.value_head:
        model, pad = with_value_head(model, source.value_head), None
    else:
        pad = pad_id if kind == "lora" else saved_pad_id(source.folder, pad_id)
    # in `dtype`, an unfolded adapter's own weights kept fp32 (as PEFT holds them; LLaMA-Factory upcasts them too)
    model = cast_keeping_adapters(model.to(device=device), dtype)
    return RewardScorer(model.eval().requires_grad_(False), pad, source.form)


def with_value_head(model: nn.Module, path: Path) -> nn.Module:
    """The causal LM `model` as LLaMA-Factory's reward model: its LM head replaced by the value head saved at
    `path` (TRL's ValueHead, Linear(hidden, 1) with its bias, on the last hidden state; dropout off in eval)."""
    from safetensors.torch import load_file

    from pipeline.model.reward_folder import V_HEAD_KEYS

    tensors = load_file(str(path))
    head = nn.Linear(model.cfg.emb_dim, 1, bias=True, dtype=tensors[V_HEAD_KEYS[0]].dtype)
    with torch.no_grad():
        head.weight.copy_(tensors[V_HEAD_KEYS[0]])
        head.bias.copy_(tensors[V_HEAD_KEYS[1]])
    model.lm_head, model.score = None, head  # GPTModel's forward returns score(x) when it has no lm_head
    model.cfg = model.cfg.replace(num_labels=1)
    return model


def saved_pad_id(folder: Path, pad_id: int) -> int | None:
    """The pad id a full reward model scores with, as transformers reads its config.json: its pad_token_id; none
    there, the last attended token (what transformers computes for one sequence; it refuses a batch of more);
    a checkpoint of this pipeline (model/ of a full rm run) pooled in training with the tokenizer's `pad_id`."""
    from pipeline.model.config import checkpoint_kind, read_raw

    raw = read_raw(folder / "config.json")
    saved = raw.get("pad_token_id")
    if saved is not None:
        return int(saved[0] if isinstance(saved, list) else saved)
    return pad_id if checkpoint_kind(raw) != "hf" else None


class ValueHeadExporter(Exporter):
    """adapter/ (LoRA / OFT) or model/ as for sft, plus value_head.safetensors beside it (LLaMA-Factory's
    fix_valuehead_checkpoint)."""

    def filled(self, state: dict[str, Any]) -> Any:
        self._value_head = {k: v for k, v in state.items() if k.startswith("v_head.")}
        return super().filled({k: v for k, v in state.items() if not k.startswith("v_head.")})

    def _save(self, model: Any, directory: str | Path) -> Path:
        from safetensors.torch import save_file

        target = super()._save(model, directory)
        save_file({k: v.contiguous() for k, v in self._value_head.items()}, str(target / V_HEAD_WEIGHTS),
                  metadata={"format": "pt"})
        return target


class PPOTrainer(Trainer):
    """Trainer whose optimizer step is one PPO step (module docstring); logging, saving and stopping as the base."""

    def __init__(self, *args: Any, reward_model: RewardScorer | ServerScorer, reference: Any, pad_id: int,
                 stop_ids: tuple[int, ...], generation: Any, ppo: Any, scheduler: Any, seed: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reward_model, self.reference, self.pad_id, self.stop_ids = reward_model, reference, pad_id, stop_ids
        self.generation, self.scheduler, self.seed = generation, scheduler, seed
        self.epochs = ppo.ppo_epochs
        self.config = PPOConfig(whiten_rewards=bool(ppo.ppo_whiten_rewards))
        self.kl_ctl = kl_controller(INIT_KL_COEF, float(ppo.ppo_target), KL_HORIZON)
        self.moments = RunningMoments(rank_sum()) if ppo.ppo_score_norm else None  # every score so far (score_norm)
        # the last update's, where DeepSpeed reports none (the base's own_norm): loop.grad_norm's device tensor,
        # unread (train_metrics reads it at log points)
        self.last_norm: Any = None

    def generate(self, policy: nn.Module, prompts: list[list[int]], micro: int) -> list[list[int]]:
        """Responses of the policy (adapters on), sampled from a generator seeded by (seed, step, micro-batch):
        rollout_seed."""
        from pipeline.model.generate import generate

        g = self.generation
        return generate(policy, prompts, max_new_tokens=g.max_new_tokens, do_sample=g.do_sample,
                        temperature=g.temperature, top_k=g.top_k, top_p=g.top_p, stop_ids=self.stop_ids,
                        seed=rollout_seed(self.seed, self.state.global_step, micro), pad_id=self.pad_id,
                        repetition_penalty=g.repetition_penalty, keep_stop=True)

    def responses(self, batches: list[dict[str, Any]]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompts, responses) of the step's rows: one gather of the policy's weights under ZeRO 3 for all of
        the step's micro-batches (deepspeed_compat.gathered_for_generation), then each rank decodes alone."""
        prompts, responses = [], []
        with gathered_for_generation(self.engine) as policy:
            for micro, batch in enumerate(batches):
                queries = prompt_ids(batch)
                prompts += queries
                # LF: an empty response is one pad
                responses += [r or [self.pad_id] for r in self.generate(policy, queries, micro)]
        return prompts, responses

    @torch.no_grad()
    def rollout(self, prompts: list[list[int]], responses: list[list[int]]) -> dict[str, torch.Tensor]:
        """Score the step's rows (its whole buffer: self.responses) and take the no-grad passes over them; rewards,
        advantages (whitened over all of them, as TRL's compute_advantages over its batch_size rows) and returns."""
        data = sequences(prompts, responses, self.pad_id, self.engine.device)
        mask = (data["labels"] != -100).float()
        # the passes in slices of one update's rows (ppo_buffer_size slices): the memory of a buffer of 1 whatever
        # the buffer (TRL's batched_forward_pass slices the padded batch too); rows do not depend on each other
        size = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        passes = [self.passes({k: v[start:start + size] for k, v in data.items()})
                  for start in range(0, len(prompts), size)]
        logprobs, values, ref_logprobs, scores = (torch.cat(parts) for parts in zip(*passes))
        used = scores if self.moments is None else self.moments.normalize(scores)
        rewards, kls = token_rewards(used, logprobs, ref_logprobs, mask, self.kl_ctl.value, self.config.kl_penalty)
        values, advantages, returns = advantages_and_returns(values, rewards, mask, self.config)
        return {**data, "mask": mask, "logprobs": logprobs, "values": values, "advantages": advantages,
                "returns": returns, "scores": scores, "kl": (kls * mask).sum(1)}

    def passes(self, rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The no-grad passes over some rows: the policy's log-probabilities and values (eval mode: no dropout), the
        reference's log-probabilities, the reward model's scores."""
        from pipeline.train.preference import _eval_mode

        with _eval_mode(self.engine.module):
            logprobs, values = policy_pass(self.engine, rows)
        scores = self.reward_model(rows["input_ids"], rows["attention_mask"])  # pools at the mask's last token
        return logprobs, values, -self.reference(unmasked(rows)), scores

    def optimizer_step(self, window: Window) -> Any:
        """One PPO step (module docstring); returns the last update's grad norm, unread as the base's (a device
        tensor, a float or None: train_metrics reads it at log points only).

        Besides the generation (which reads each new token to know when to stop), one device read a step: the mean
        KL the controller moves by (as TRL 0.9.6 reads it, ppo_trainer.py:866-876), and one per update (nan_policy
        stop's check of its mini-batch losses, before the engine.step that applies it). The losses and stats are
        summed as float64 device tensors into the Window (the double arithmetic the values read per mini-batch
        had, to the bit) and the tokens counted on the host prompts and responses."""
        window.lr = float(self.engine.get_lr()[0])
        batches = [self.data.next() for _ in range(self.data.per_step)]  # accumulation x ppo_buffer_size
        prompts, responses = self.responses(batches)
        data = self.rollout(prompts, responses)
        rows, size = len(prompts), self.args.per_device_train_batch_size
        generator = torch.Generator().manual_seed(self.seed + self.state.global_step)
        sums: dict[str, Any] = {}
        updates, losses = 0, []
        for _ in range(self.epochs):
            order = torch.randperm(rows, generator=generator)
            for start in range(0, rows, size):
                stats = self.update({k: v[order[start:start + size].to(v.device)] for k, v in data.items()}, losses)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value.double()  # a float32 widens exactly
                updates += 1
        mean_kl = data["kl"].mean()
        metrics = {"reward": data["scores"].mean().double(), "kl": mean_kl.double(), "kl_coef": self.kl_ctl.value,
                   **{key: value / updates for key, value in sums.items() if key != "loss"}}
        self.kl_ctl.update(ranks_mean(mean_kl), rows * dist.world_size())
        if self.scheduler is not None:
            self.scheduler.step()
        window.add_loss(sums["loss"] / updates)
        for key, value in metrics.items():
            window.extra[key] = window.extra.get(key, 0.0) + value
        # sequences' attention mask and labels: prompt + response tokens a row, the response ones labelled
        tokens = sum(len(p) + len(r) for p, r in zip(prompts, responses))
        trained = sum(len(r) for r in responses)
        window.tokens += tokens
        window.trained_tokens += trained
        self._unflushed[0] += tokens
        self._unflushed[1] += trained
        self.data.end_of_step()
        norm = self.engine.get_global_grad_norm()
        return self.last_norm if norm is None else norm

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps beside the weights, optimizer, RNG and data position: the KL coefficient (the
        adaptive controller's history) and ppo_score_norm's running moments. The schedule needs nothing: it stands
        at the PPO step (run.py sets it there on resume); the rollouts' sampling is seeded by the step."""
        return {"kl_coef": self.kl_ctl.value,
                **({"score_moments": self.moments.state()} if self.moments is not None else {})}

    def restore(self, saved: dict[str, Any]) -> None:
        """A resume's state from checkpoint_state. ppo_score_norm set only on resume (no moments saved) starts
        its running moments at the resumed step, as a fresh run does at step 1."""
        self.kl_ctl.value = float(saved["kl_coef"])
        if self.moments is not None and "score_moments" in saved:
            self.moments = RunningMoments.from_state(saved["score_moments"], rank_sum())

    def update(self, mini: dict[str, torch.Tensor], losses: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """One mini-batch: the clipped losses (pipeline.model.ppo.ppo_losses), backward, engine step; its loss and
        stats returned unread. `losses` gathers the mini-batch losses of the update under way: at its boundary
        (DeepSpeed applies the update there only) they are checked finite in one read before the engine.step
        (stop_if_nonfinite, every policy: ppo has no skip), so a non-finite loss stops the run before any weight
        changes, as the check of each mini-batch's loss did."""
        logprobs, vpreds = policy_pass(self.engine, mini)
        pg_loss, vf_loss, stats = ppo_losses(mini["logprobs"], mini["values"], logprobs, vpreds, mini["mask"],
                                             mini["advantages"], mini["returns"], self.config)
        loss = pg_loss + vf_loss
        losses.append(loss.detach())
        self.engine.backward(loss)
        if self.engine.is_gradient_accumulation_boundary():
            if self.own_grad_norm:
                self.last_norm = grad_norm(self.params)
            self.stop_if_nonfinite(losses)
            losses.clear()
        self.engine_step()
        return {"loss": loss.detach(), **stats}


def describe(reward_model: str, kind: str, scorer: RewardScorer | ServerScorer, ppo: Any, generation: Any,
             reference: str) -> None:
    """The run's PPO settings on stderr (rank 0), as dpo's line says its loss and reference."""
    if dist.is_main():
        sampling = (f"sampling (temperature {generation.temperature}, top_k {generation.top_k}, top_p "
                    f"{generation.top_p})" if generation.do_sample else "greedy")
        print(f"ppo: reward_model {reward_model} ({kind}), scoring with {scorer}; ppo_epochs {ppo.ppo_epochs}, ppo_target {ppo.ppo_target}, "
              f"{generation.max_new_tokens} new tokens at most, {sampling}; reference: {reference}", file=sys.stderr,
              flush=True)
