"""LLaMA-Factory's BAdam, layer mode (`use_badam`, `badam_*`): block coordinate descent with Adam, one decoder
layer at a time, as badam 1.4's BlockOptimizer trains it there, here as the client optimizer DeepSpeed wraps.

What LLaMA-Factory 0.9.5 builds (train/trainer_utils.py `_create_badam_optimizer`): BlockOptimizer over torch's
AdamW with block_prefix_list None, so badam infers the blocks (block_optim.py:148-175) with include_embedding and
include_lm_head False: one block per decoder layer, the prefix `re.findall(r'.*layers.[^.]*\\.', name)` of its
transformers names (`model.layers.3.`); every other tensor (the embedding, the final norm, the output head) is in
no block and never trains. A tensor belongs to the active block when the block's prefix is a substring of its name
(block_optim.py:508). At a switch (block_optim.py:403-437, 490-528): the active block's tensors get requires_grad
True, the others False and their gradients dropped; the optimizer state is emptied, so every block starts Adam
afresh (step 1, zero moments, bias correction from 1); then the block index advances (block_optim.py:530-543):
ascending +1, descending -1 (both modulo the number of blocks), fixed stays, random pops the next index of a
permutation of all blocks drawn by torch.randperm, taken from its end, a new permutation when it runs out.
The first block is badam_start_block, else the last for descending, 0 for ascending, the permutation's first
for random (block_optim.py:95-104; fixed without a start block fails there, so it is refused here).

When: step() updates, counts the step, then switches when (steps + 1) % badam_switch_interval == 0 with steps
already counted (block_optim.py:217-237): the first block trains 1 step, every later one `interval` steps (with
interval 2: block 0 at step 1, block 1 at steps 2-3, block 2 at 4-5, ...). step() is one optimizer step (after
gradient accumulation: DeepSpeed calls it once per update), and a switch changes requires_grad after that
step's gradients were used, so the next micro-batches compute gradients for the new block only (and gradient
clipping sees only the active block's, as there). badam_switch_interval -1 is documented there as "never switch"
but `(n + 1) % -1 == 0` holds for every n, so badam switches after every step: refused, with fixed as the way
to keep one block.

Differences, kept here on purpose (docs/training.md):
- Precision. LLaMA-Factory loads the model in half precision under BAdam (model/adapter.py: "Pure bf16 / BAdam
  detected") and badam keeps fp32 copies of the active block only, stepped by AdamW and copied back
  (block_optim.py:515-528, 270-287). Here the weights stay in the recipe's precision: fp32, or bf16 compute with
  DeepSpeed's fp32 master weights. In fp32 the update is the same as badam's (its fp32 copy of an fp32 tensor is
  the tensor); what is not saved here is the memory of the fp32 weights of the inactive blocks.
- Weight decay. badam builds the active groups as {"weight_decay": ..., **AdamW.defaults}, so the defaults' key
  wins (block_optim.py:494-505) and every active tensor, norms and biases included, decays by torch AdamW's
  default 0.01 whatever weight_decay says (LLaMA-Factory's optimizer kwargs carry no weight_decay). Here the
  recipe's weight_decay applies, by transformers' rule (no decay for biases and norms: pipeline.train.optim).
- random order: torch.randperm from the global generator there (whose state depends on everything drawn
  before), from a generator seeded with the recipe's seed here, saved in checkpoints.

The update is torch's AdamW (LLaMA-Factory's default optim adamw_torch): decay p *= 1 - lr x wd, then Adam with
eps added after the bias correction. Blocks are told apart by position in the param groups, not by tensor
identity, so the same bookkeeping holds when DeepSpeed steps fp32 master copies (bf16) instead of the weights.

Ratio mode (`badam_mode: ratio`, RatioAdam): badam 1.4's BlockOptimizerRatio as LLaMA-Factory builds it
(update_ratio, mask_mode, include_embedding False; switch_every, preserve_threshold and keep_mask left at their
defaults 100, 100 and True). Every tensor trains except the embedding and the head (the first tensor whose name
holds `embed`, the first holding `lm_head`: block_optim.py:591-594, 615-625), but only a window of each one's
entries: k = int(numel x update_ratio) of them (block_optim.py:768-803). adjacent: the flat positions offset ..
offset + k - 1, wrapping past the end; scatter: the same window over a fixed random permutation of the positions.
The offset starts at 0 and moves on by k every 100 optimizer steps, when the window is redrawn and the Adam
state is emptied (block_optim.py:755-766, 836-838): steps 1-100 train window 0, 101-200 window 1, ... One window
per shape: badam keeps the first mask drawn for a shape for every tensor of that shape (keep_mask, 820-832).
The gradient outside the window is zeroed as the backward accumulates it (badam's post-accumulate-grad hook,
block_optim.py:805-838, makes it a sparse tensor there), so gradient clipping sees the window's gradient alone, as
there; a tensor under 100 entries gets 1e-9 added to its window's gradient by each backward, and so does every
tensor at update_ratio 1 (badam's add_(1e-9) before to_sparse, lines 814-818). The update is badam's sparse Adam
(block_optim.py:627-693) on the window's entries: m and v of k numbers each, eps added to sqrt(v) before the bias
correction (the step is lr x sqrt(1 - b2^t) / (1 - b1^t) x m / (sqrt(v) + eps)), and no weight decay (badam's
groups carry weight_decay, its update never reads it: a weight_decay is refused by the rules).
Differences: scatter's permutation is drawn per shape from a generator seeded with the recipe's seed (badam seeds
torch's global generator per tensor with torch.randint(0, 1000) drawn at start, re-seeding it at every redraw,
and a shape's permutation is that of whichever tensor's hook fires first); with gradient accumulation the window
moves once per redraw (badam's hook moves it at every micro-batch of the step before a redraw, and those
micro-batches' gradients are masked by different windows); with a tied head (no `lm_head` tensor) the embedding
is frozen, which freezes the head (badam fails there: its lm_head_layer is None). One rank only (LLaMA-Factory
refuses ratio mode distributed, the rules do here).
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch

from pipeline.errors import UserError
from pipeline.recipe.args import TrainArgs
from pipeline.runtime.deepspeed_compat import IN_TURN
from pipeline.train.decay import decays
from pipeline.model.optimizer_state import block_prefixes, ratio_trained
from pipeline.train.per_param import PerParameterOptimizer


class BlockOrder:
    """Which block trains next (block_optim.py:95-104 and 530-543), with a seeded generator for random mode."""

    def __init__(self, count: int, mode: str, start: int | None, seed: int) -> None:
        self.count, self.mode = count, mode
        self.generator = torch.Generator().manual_seed(seed)
        self.pending: list[int] = []  # random mode: the rest of the current permutation, next one last
        if start is not None:
            self.upcoming = start
        elif mode == "descending":
            self.upcoming = count - 1
        elif mode == "random":
            self.upcoming = self._draw()
        else:
            self.upcoming = 0

    def _draw(self) -> int:
        if not self.pending:
            self.pending = torch.randperm(self.count, generator=self.generator).tolist()
        return self.pending.pop()

    def advance(self) -> None:
        """badam's _update_active_block_idx."""
        if self.mode == "random":
            self.upcoming = self._draw()
        elif self.mode == "ascending":
            self.upcoming = (self.upcoming + 1) % self.count
        elif self.mode == "descending":
            self.upcoming = (self.upcoming - 1) % self.count

    def state(self) -> dict[str, Any]:
        return {"upcoming": self.upcoming, "pending": list(self.pending), "generator": self.generator.get_state()}

    def load(self, state: dict[str, Any]) -> None:
        self.upcoming, self.pending = int(state["upcoming"]), [int(i) for i in state["pending"]]
        self.generator.set_state(state["generator"])


class BlockAdamW(PerParameterOptimizer):
    """AdamW on one block of parameters at a time (see the module docstring). `blocks[g][i]` is the block of the
    i-th parameter of group g; `weights[g][i]` the model tensor whose requires_grad follows the active block (the
    parameter itself in fp32; under bf16 DeepSpeed swaps the groups' tensors for fp32 masters, the positions stay)."""

    def __init__(self, groups: list[dict[str, Any]], blocks: list[list[int]], order: BlockOrder, interval: int,
                 lr: float, betas: tuple[float, float], eps: float) -> None:
        self.weights = [list(g["params"]) for g in groups]
        for weight in (w for weights in self.weights for w in weights):
            setattr(weight, IN_TURN, True)  # trained, also while requires_grad is off (checkpoints, exports)
        self.blocks, self.order, self.interval = blocks, order, interval
        self.steps = 0
        self.active = -1
        self._owner: dict[int, int] = {}  # id of a tensor in the groups -> its block, as of the current step
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.switch()

    def switch(self) -> None:
        """The upcoming block becomes the active one, and the order moves on."""
        self._activate(self.order.upcoming)
        self.order.advance()

    def _activate(self, block: int) -> None:
        """requires_grad follows `block` (the others' gradients dropped); the Adam state starts afresh."""
        self.active = block
        for weights, blocks in zip(self.weights, self.blocks):
            for weight, owner in zip(weights, blocks):
                weight.requires_grad_(owner == block)
                if owner != block:
                    weight.grad = None
        self.state = defaultdict(dict)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """AdamW on the active block's tensors that have a gradient; then the step is counted and, when due, the
        next block takes over (block_optim.py:217-237)."""
        self._owner = {id(p): block for group, blocks in zip(self.param_groups, self.blocks)
                       for p, block in zip(group["params"], blocks)}  # the groups' tensors now (fp32 masters)
        loss = super().step(closure)
        self.steps += 1
        if (self.steps + 1) % self.interval == 0:
            self.switch()
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        if self._owner[id(param)] == self.active:
            self._adamw(param, group)

    def _adamw(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        """torch.optim.AdamW's single-tensor update (amsgrad off, maximize off)."""
        grad, state = param.grad, self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
        beta1, beta2 = group["betas"]
        lr = group["lr"]
        state["step"] += 1
        step = float(state["step"])
        param.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
        param.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** step))

    def state_dict(self) -> dict[str, Any]:
        """torch's, plus the block bookkeeping a resume needs: the active block, the step count that times the next
        switch, and the order (random mode's permutation and generator)."""
        saved = super().state_dict()
        saved["badam"] = {"active": self.active, "steps": self.steps, "order": self.order.state()}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        badam = state_dict.pop("badam")
        self.order.load(badam["order"])
        self._activate(int(badam["active"]))  # the saved active block (requires_grad) ...
        self.steps = int(badam["steps"])
        super().load_state_dict(state_dict)  # ... with its saved moments


REDRAW_EVERY = 100  # BlockOptimizerRatio's switch_every, which LLaMA-Factory leaves at its default
SMALL = 100  # its preserve_threshold: a tensor with fewer entries gets NUDGE added to its gradient (to_sparse)
NUDGE = 1e-9


class Windows:
    """Which entries of a tensor of each shape train (ratio mode, module docstring): the flat positions, ascending
    (the order of a coalesced sparse tensor's entries, which badam's moments follow), of window `window`."""

    def __init__(self, shapes: list[torch.Size], ratio: float, mode: str, seed: int) -> None:
        self.ratio, self.mode, self.window = ratio, mode, 0
        draw = torch.Generator().manual_seed(seed)
        self.seeds = {shape: int(torch.randint(0, 2 ** 31 - 1, (1,), generator=draw))
                      for shape in dict.fromkeys(shapes)}  # one permutation per shape (scatter)
        self._drawn: dict[tuple[torch.Size, torch.device], torch.Tensor] = {}

    def size(self, numel: int) -> int:
        """k, the window's entries: int(numel x update_ratio), as badam's num_ones."""
        return int(numel * self.ratio)

    def entries(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        if (shape, device) not in self._drawn:
            numel = math.prod(shape)
            k = self.size(numel)
            positions = (self.window * k + torch.arange(k)) % numel  # badam's offset moves on by k per redraw
            if self.mode == "scatter":
                perm = torch.randperm(numel, generator=torch.Generator().manual_seed(self.seeds[shape]))
                positions = perm[positions]
            self._drawn[(shape, device)] = positions.sort().values.to(device)
        return self._drawn[(shape, device)]

    def move_to(self, window: int) -> None:
        self.window = window
        self._drawn.clear()


class RatioAdam(PerParameterOptimizer):
    """badam's BlockOptimizerRatio (module docstring): sparse Adam on a window of each tensor's entries, the window
    redrawn and the state emptied every REDRAW_EVERY steps. `weights` are the model's tensors, whose gradients
    are masked as the backward accumulates them (under bf16 DeepSpeed steps fp32 masters of the same shapes)."""

    def __init__(self, groups: list[dict[str, Any]], windows: Windows, lr: float, betas: tuple[float, float],
                 eps: float) -> None:
        self.windows, self.steps = windows, 0
        for weight in (w for g in groups for w in g["params"]):
            weight.register_post_accumulate_grad_hook(self._mask_gradient)
        super().__init__(groups, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})

    @torch.no_grad()
    def _mask_gradient(self, weight: torch.Tensor) -> None:
        """Zero the gradient outside the window (block_optim.py:805-838), nudging small tensors' window."""
        grad = weight.grad.view(-1)
        entries = self.windows.entries(weight.shape, grad.device)
        kept = grad[entries]
        if weight.numel() < SMALL or self.windows.ratio == 1:
            kept += NUDGE
        grad.zero_()
        grad[entries] = kept

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The windows' update; then the step is counted and every REDRAW_EVERY steps the windows move on and the
        moments start afresh (block_optim.py:755-766)."""
        loss = super().step(closure)
        self.steps += 1
        if self.steps % REDRAW_EVERY == 0:
            self.state = defaultdict(dict)
            self.windows.move_to(self.steps // REDRAW_EVERY)
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        """badam's _sparse_adam (block_optim.py:676-691) on the window's entries."""
        flat = param.view(-1)
        entries = self.windows.entries(param.shape, flat.device)
        grad, state = param.grad.view(-1)[entries], self.state[param]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = float(state["step"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        direction = state["exp_avg"] / (state["exp_avg_sq"].sqrt() + group["eps"])
        step_size = group["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        flat.index_add_(0, entries, direction, alpha=-step_size)

    def state_dict(self) -> dict[str, Any]:
        """torch's, plus the step count that places the window and times the next redraw (scatter's permutations
        come from the recipe's seed, which a resume keeps)."""
        return {**super().state_dict(), "badam": {"steps": self.steps}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.steps = int(state_dict.pop("badam")["steps"])
        self.windows.move_to(self.steps // REDRAW_EVERY)
        super().load_state_dict(state_dict)


def ratio_groups(model: Any, train: TrainArgs) -> list[dict[str, Any]]:
    """One group over every tensor but the embedding and the head, which are frozen (ratio_trained); no weight
    decay (badam's sparse Adam has none)."""
    from pipeline.model.adapter import family_of_model

    to_hf = family_of_model(model).to_hf
    named = list(model.named_parameters())
    trained = ratio_trained([to_hf(name) for name, _ in named])
    for (_, param), keep in zip(named, trained):
        if not keep:
            param.requires_grad_(False)
    return [{"params": [p for (_, p), keep in zip(named, trained) if keep], "weight_decay": 0.0,
             "lr": train.learning_rate}]


def badam_groups(model: Any, train: TrainArgs) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The AdamW groups over the tensors of the decoder layers, decayed and not (the recipe's weight decay by
    transformers' rule, pipeline.train.decay.decays; every tensor, whichever block has requires_grad now) and
    each tensor's block; the tensors in no block (embedding, final norm,
    head) are frozen, as BAdam never trains them. Called again for the plan's summary, after switches: the
    groups do not depend on which block is active."""
    from pipeline.model.adapter import family_of_model

    to_hf = family_of_model(model).to_hf
    named = list(model.named_parameters())  # all of them: finetuning_type full (rules.optimizers.badam_fits), and
    # requires_grad is BAdam's to set: inactive blocks have it off after the first switch
    prefixes = block_prefixes(to_hf(name) for name, _ in named)
    if not prefixes:  # badam's block list is then empty, and LLaMA-Factory fails on its first block
        raise UserError(f"use_badam: BAdam trains the decoder layers its names call `layers.<i>.`, and this "
                        f"{family_of_model(model).name} model's transformers names have none; use a Llama-style "
                        "model (Llama, Qwen, Mistral), or remove use_badam")
    block_of = {}
    for name, param in named:
        hf = to_hf(name)
        owners = [i for i, prefix in enumerate(prefixes) if prefix in hf]
        if owners:
            block_of[id(param)] = owners[0]
        else:
            param.requires_grad_(False)
    inside = [(name, param) for name, param in named if id(param) in block_of]
    groups = [{"params": [p for n, p in inside if decays(n)], "weight_decay": train.weight_decay},
              {"params": [p for n, p in inside if not decays(n)], "weight_decay": 0.0}]
    groups = [{**g, "lr": train.learning_rate} for g in groups if g["params"]]
    return groups, [[block_of[id(p)] for p in g["params"]] for g in groups]


def make_badam(model: Any, train: TrainArgs) -> BlockAdamW | RatioAdam:
    """BlockAdamW over the model's decoder layers, per the recipe's badam_* keys; RatioAdam for ratio mode."""
    if train.badam_mode == "ratio":
        groups = ratio_groups(model, train)
        windows = Windows([p.shape for p in groups[0]["params"]], train.badam_update_ratio, train.badam_mask_mode,
                          train.seed)
        return RatioAdam(groups, windows, lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
                         eps=train.adam_epsilon)
    groups, blocks = badam_groups(model, train)
    count = len({b for group in blocks for b in group})
    start = train.badam_start_block
    if start is not None and not 0 <= start < count:
        raise UserError(f"badam_start_block: given {start}, but the model has {count} decoder layers (blocks "
                        f"0 to {count - 1})")
    order = BlockOrder(count, train.badam_switch_mode, start, train.seed)
    return BlockAdamW(groups, blocks, order, train.badam_switch_interval, lr=train.learning_rate,
                      betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_epsilon)


@contextlib.contextmanager
def every_block_trainable(optimizer: Any) -> Iterator[None]:
    """Around deepspeed.initialize: every block's tensors require gradients; then the active block alone again.
    DeepSpeed's bf16 / fp16 wrapper at ZeRO 0 (FP16_UnfusedOptimizer) makes fp32 master copies of the tensors that
    require gradients when it starts, and only of those, and BAdam's switches need one for every block (its
    zero-gradient start-up step is skipped for every optimizer: optim.no_startup_step). A no-op for other
    optimizers."""
    if not isinstance(optimizer, BlockAdamW):
        yield
        return
    for weight in (w for weights in optimizer.weights for w in weights):
        weight.requires_grad_(True)
    try:
        yield
    finally:
        optimizer._activate(optimizer.active)
