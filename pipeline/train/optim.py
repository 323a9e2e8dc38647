"""The client optimizer handed to DeepSpeed: torch AdamW, weight decay as transformers' Trainer decides it, fused kernel.

Which tensors decay is transformers' Trainer.get_decay_parameter_names (5.x) rule, for every group built here: no
decay for a name (lower-cased) that contains `bias`, `layernorm` or `rmsnorm`, or has a `norm` or `*_norm`
component (nor for parameters of an nn.LayerNorm, whose names here all match those already: input_layernorm,
post_attention_layernorm, norm, q_norm, k_norm); everything else decays, matrices, LoRA's A and B and DoRA's
1-D magnitude vector alike (PEFT's lora_magnitude_vector is decayed there, so a DoRA recipe with weight_decay
trains as it does there). DeepSpeed wraps this optimizer (fp32 master weights under bf16/fp16, ZeRO
partitioning) and steps it.

LoRA+ (`loraplus_lr_ratio`, Hayou et al. 2024) splits the learning rates as LLaMA-Factory 0.9.5's
`_create_loraplus_optimizer` does (train/trainer_utils.py): B gets learning_rate x loraplus_lr_ratio, A and every
other matrix learning_rate, and the 1-D parameters go with B (LLaMA-Factory: "lora_B in name or ndim == 1"). Its
decay follows the rule above; LLaMA-Factory's own _get_decay_parameter_names there exempts only biases and
nn.LayerNorm parameters, so it decays an RMSNorm weight that additional_target trains (Llama, Qwen) where this and
transformers' Trainer do not (docs/coming-from-llama-factory.md). Its fourth group, LoRA on embedding layers
(`lora_embedding_B`, at loraplus_lr_embedding), has no parameters here: lora_target selects Linear layers only, and
an additional_target embedding trains in full at learning_rate, as a modules_to_save embedding does there. Each
group carries its own `lr`; the schedule's LambdaLR multiplies every group's initial lr by the same factor, so the
ratio holds at every step.

Why fused: torch's default AdamW on a CPU is its per-tensor loop (foreach and fused are defaults on CUDA
only), about ten small ops per trainable tensor per step: 320 for a 4-block LoRA model. Each op is
microseconds of work but opens a parallel region, and on a loaded machine each of those waits for a
descheduled thread: in a profile of a packed LoRA step under load, `sqrt`, `mul_`, `lerp_`, `addcdiv_` of the
optimizer took 20 ms a call (bench/README.md, packing). The fused kernel (torch's `_fused_adamw_`, CPU and
CUDA) is one op for all tensors of a group; its update equals the loop's to float rounding (a few ulp), and
a resumed run continues with the implementation its checkpoint's param groups name, so resume stays exact.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator

from pipeline.model.optimizer_state import OTHER_OPTIMS, optim_kwargs
from pipeline.recipe.args import TrainArgs
from pipeline.train.decay import decays

FUSED_DEVICES = ("cpu", "cuda")
LORA_B = ("lora", "B")  # the last two parts of a LoRALayer B's name (pipeline.model.lora): LoRA+'s faster matrix
def _ndim(param: Any) -> int:
    """A parameter's dimensions, also when ZeRO-3 has partitioned it (DeepSpeed keeps the shape in ds_shape)."""
    return len(getattr(param, "ds_shape", param.shape))


def param_groups(named_params: Iterable[tuple[str, Any]], weight_decay: float, learning_rate: float | None = None,
                 loraplus_lr_ratio: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters, empty ones left out, in a fixed order (a resume re-derives
    each group's lr and decay from it: pipeline.train.checkpoint.apply_changes): (lr, decayed), with LoRA+ (lr x
    ratio, decayed) and (lr x ratio, not decayed) for B and the 1-D parameters, then (lr, not decayed). Decay is
    `decays`' rule. `lr` is set per group when learning_rate is given."""
    lr = learning_rate if learning_rate is not None else 0.0
    fast = lr * loraplus_lr_ratio if loraplus_lr_ratio is not None else lr
    groups: list[dict[str, Any]] = [{"params": [], "weight_decay": weight_decay, "lr": lr},
                                    {"params": [], "weight_decay": weight_decay, "lr": fast},
                                    {"params": [], "weight_decay": 0.0, "lr": fast},
                                    {"params": [], "weight_decay": 0.0, "lr": lr}]
    for name, param in named_params:
        if not param.requires_grad:
            continue
        quick = loraplus_lr_ratio is not None and (tuple(name.split("."))[-2:] == LORA_B or _ndim(param) < 2)
        groups[(1 if quick else 0) if decays(name) else (2 if quick else 3)]["params"].append(param)
    if learning_rate is None:
        for group in groups:
            del group["lr"]
    return [g for g in groups if g["params"]]


def fused_supported(groups: list[dict[str, Any]]) -> bool:
    """torch's fused AdamW takes floating-point tensors on a CPU or CUDA device (not meta, not mixed)."""
    params = [p for g in groups for p in g["params"]]
    return (all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params)
            and len({p.device.type for p in params}) == 1)


def train_groups(model: Any, train: TrainArgs) -> list[dict[str, Any]]:
    """The recipe's groups: Muon's (pipeline.train.muon.muon_groups, by the parameters' transformers names) with
    use_muon, LLaMA-Factory's GaLore or APOLLO groups (pipeline.train.galore.galore_groups,
    pipeline.train.apollo.apollo_groups) with use_galore or use_apollo, Adam-mini's blocks
    (pipeline.train.adam_mini.model_groups) with use_adam_mini, BAdam's (pipeline.train.badam) with use_badam, else
    param_groups with its weight decay, learning rate and LoRA+ ratio (optim adafactor: split by the layout each
    tensor is stored in, pipeline.train.adafactor.split_transposed)."""
    if train.use_muon:
        from pipeline.model.adapter import family_of_model
        from pipeline.train.muon import muon_groups

        return muon_groups(model.named_parameters(), family_of_model(model).to_hf, train.weight_decay,
                           train.learning_rate)
    if train.use_galore:
        from pipeline.train.galore import galore_groups

        return galore_groups(model, train)
    if train.use_apollo:
        from pipeline.train.apollo import apollo_groups

        return apollo_groups(model, train)
    if train.use_adam_mini:
        from pipeline.train.adam_mini import model_groups

        return model_groups(model, train)
    if train.use_badam:
        from pipeline.train.badam import badam_groups, ratio_groups

        return ratio_groups(model, train) if train.badam_mode == "ratio" else badam_groups(model, train)[0]
    groups = param_groups(model.named_parameters(), train.weight_decay, train.learning_rate, train.loraplus_lr_ratio)
    if train.optim == "adafactor":
        from pipeline.train.adafactor import split_transposed, transposed_params

        return split_transposed(groups, transposed_params(model))
    return groups


def describe(groups: list[dict[str, Any]]) -> str:
    """One line for the start of a run: each group's tensors (Muon's or AdamW's where use_muon, GaLore's with its
    rank where use_galore, APOLLO's where use_apollo, Adam-mini's block kind where use_adam_mini), learning rate and weight decay."""
    def kind(group: dict[str, Any]) -> str:
        if group.get("low_rank") and "scale_type" in group:
            return (f" by APOLLO (rank {group['rank']}, {group['proj']} {group['proj_type']}, {group['scale_type']}, "
                    f"every {group['update_proj_gap']} steps)")
        if group.get("low_rank"):
            return f" by GaLore (rank {group['rank']}, {group['proj_type']}, every {group['update_proj_gap']} steps)"
        if "block" in group:
            return f" by Adam-mini ({group['block']})"
        if "muon" in group:
            return " by Muon" if group["muon"] else " by AdamW"
        return " by AdamW" if "low_rank" in group else ""

    return " | ".join(f"{len(g['params'])} tensors{kind(g)} at lr {g['lr']:.3g}, weight decay {g['weight_decay']:g}"
                      for g in groups)


def make_optimizer(model: Any, train: TrainArgs) -> Any:
    """AdamW over the trainable parameters, weight decay as transformers' Trainer (param_groups), fused where torch
    has it; with use_muon, LLaMA-Factory's Muon + AdamW (pipeline.train.muon); with use_galore, galore_torch's
    GaLoreAdamW (pipeline.train.galore); with use_apollo, apollo_torch's APOLLOAdamW
    (pipeline.train.apollo); with use_adam_mini, adam-mini's Adam_mini (pipeline.train.adam_mini); with use_badam,
    BAdam's block-wise AdamW (pipeline.train.badam). Else `optim` as transformers' Trainer builds it over the same
    groups: sgd, adagrad, rmsprop are torch's classes with learning_rate, the optim_args keys transformers reads for
    them (optimizer_state.optim_kwargs) and torch's defaults for the rest (weight decay per group, added to the
    gradient), adafactor transformers' Adafactor (pipeline.train.adafactor).

    torch's Adagrad makes its state (step 0, a `sum` of initial_accumulator_value) for every parameter in its
    constructor, the others at their first step. Under bf16 mixed precision DeepSpeed then swaps each group's
    parameters for its fp32 masters, whose state Adagrad makes at their first step as the others do: the
    constructor's entries stayed behind, keyed by tensors no group holds (a second copy of every trained weight) that
    torch's state_dict cannot number, so the run's first checkpoint failed (KeyError). Emptied here, each entry is
    made at the first step with the same values (Adagrad._init_group) on the tensors that are stepped (ZeRO 1-3:
    kept_adagrad)."""
    import torch

    groups = train_groups(model, train)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    betas = (train.adam_beta1, train.adam_beta2)
    if train.use_muon:
        from pipeline.train.muon import MuonAdamW

        return MuonAdamW(groups, lr=train.learning_rate, betas=betas, eps=train.adam_epsilon)
    if train.use_galore:
        from pipeline.train.galore import GaLoreAdamW

        return GaLoreAdamW(groups, lr=train.learning_rate, betas=betas, eps=train.adam_epsilon)
    if train.use_apollo:
        from pipeline.train.apollo import APOLLOAdamW

        return APOLLOAdamW(groups, lr=train.learning_rate, betas=betas, eps=train.adam_epsilon,
                           layerwise=train.apollo_layerwise)
    if train.use_adam_mini:
        from pipeline.train.adam_mini import AdamMini

        return AdamMini(groups, lr=train.learning_rate, betas=betas, eps=train.adam_epsilon)
    if train.use_badam:
        from pipeline.train.badam import make_badam

        return make_badam(model, train)
    if train.optim == "adafactor":
        from pipeline.train.adafactor import Adafactor

        return Adafactor(groups, lr=train.learning_rate)
    if train.optim in OTHER_OPTIMS:  # sgd, adagrad, rmsprop: transformers' _get_sgd / _get_adagrad / _get_rmsprop
        optimizer = getattr(torch.optim, OTHER_OPTIMS[train.optim])(groups, lr=train.learning_rate,
                                                                    **optim_kwargs(train.optim, train.optim_args))
        optimizer.state.clear()  # Adagrad's, made at construction: see the docstring
        return optimizer
    return torch.optim.AdamW(groups, lr=train.learning_rate, betas=betas,
                             eps=train.adam_epsilon, weight_decay=train.weight_decay,
                             fused=True if fused_supported(groups) else None)


@contextlib.contextmanager
def no_startup_step(optimizer: Any) -> Iterator[None]:
    """Around deepspeed.initialize: the optimizer ignores step(). DeepSpeed's bf16 / fp16 wrapper at ZeRO 0
    (FP16_UnfusedOptimizer.initialize_optimizer_states) steps the client optimizer once with zero gradients as it
    starts, to allocate the optimizer's state. torch's AdamW counts that step, so its bias correction runs one step
    behind for the whole run (the first real update ~0.74x AdamW's: m / (1 - b1^2) over sqrt(v / (1 - b2^2))), and
    it decays every weight once by the starting learning rate x weight_decay; BAdam would count it towards its
    first switch. Skipped, the state is created at the first real step, as under fp32 and ZeRO 1-3, which never take
    that step."""
    own = vars(optimizer).get("step")  # a step set on the instance itself (none for torch's optimizers)
    optimizer.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        if own is None:
            del optimizer.step
        else:
            optimizer.step = own


@contextlib.contextmanager
def kept_adagrad(optimizer: Any) -> Iterator[None]:
    """Around deepspeed.initialize: torch's Adagrad is not one to DeepSpeed. ZeRO 1-3 (stage_1_and_2.py, stage3.py
    initialize_optimizer_states) swap a client `torch.optim.Adagrad` for a new `Adagrad(<the fp32 partitions>,
    **client.defaults)`, because Adagrad made its state in its constructor: one group holding every partition, so
    the weight decay groups, LoRA+'s rates and the schedule (which drives the client's groups) never reached it, and a
    second group stopped the first backward (IndexError at param_groups[1]). The client's groups already hold the
    partitions by then and its state is made at the first step (make_optimizer empties the constructor's), so it is
    kept: for the length of initialize it is of a class with Optimizer's methods alone, which the check does not
    match. DeepSpeed never calls its step there (no_startup_step)."""
    import torch

    if type(optimizer) is not torch.optim.Adagrad:
        yield
        return
    optimizer.__class__ = type("ClientAdagrad", (torch.optim.Optimizer,), {})
    try:
        yield
    finally:
        optimizer.__class__ = torch.optim.Adagrad
