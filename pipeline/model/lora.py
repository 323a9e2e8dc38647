"""LoRA the book's way (LoRALayer, LinearWithLoRA, replace_linear_with_lora), grown into a feature.

Scaling: the book's notes compute alpha * (x @ A @ B). Here the update is scaled by alpha / rank
(alpha / sqrt(rank) with use_rslora), as in the LoRA paper and PEFT. Two reasons: the effective
step size then does not grow with the rank, so a learning rate tuned at r=8 still works at r=64
(keeping alpha = 2 r, the recipe default, gives the same scale 2 at every rank); and the exported
adapter means the same thing when PEFT loads it. The book's behaviour is alpha_book = alpha / rank.

Init follows the book: A (in x r) kaiming-uniform(a=sqrt(5)), B (r x out) zeros, so a fresh adapter
leaves the model's output unchanged. In PEFT's file layout lora_A.weight is A^T (r x in) and
lora_B.weight is B^T (out x r) whatever the base layer; GPT-2's Conv1D base layers make the config say
fan_in_fan_out: true (Llama / Qwen nn.Linear: false). Targets and file keys use the family's HF module
names (pipeline.model.families): c_attn / c_proj / c_fc for GPT-2, q_proj .. down_proj for Llama and Qwen.

DoRA (use_dora, Liu et al. 2024) is LinearWithDoRA: the same LoRA branch, plus a trainable magnitude per output
feature that rescales the updated weight (PEFT's DoraLinearLayer, saved as its lora_magnitude_vector).

PiSSA (pissa_init, Meng et al. 2024) starts A and B from the base weight's r principal singular vectors and trains
them on the residual W - s B0 A0, as PEFT's init_lora_weights="pissa" (exact SVD) or "pissa_niter_<k>" (randomized,
seeded here). Such an adapter only means something on the residual base, so save_adapter always writes PEFT's
conversion (path_initial_model_for_weight_conversion): [A | A0] and [B | -B0], rank 2r, a plain LoRA on the
original base. Its second half keeps A0 and B0 exactly, which is how a resume rebuilds the same residual.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from pipeline.errors import UserError
from pipeline.io import atomic_dir, write_json
from pipeline.model.adapter import (TIED, AdapterLinear, adapter_targets, embedding_names, family_of_model, head_is_tied,
                                    is_reward_model, linear_names, replace_linears, saved_modules, train_additional,
                                    upcast_adapter)
from pipeline.model.config import (adapted_and_saved, adapted_and_saved_message, default_lora_alpha, expert_spelling,
                                   lora_candidates, matches, moe_blocked, router_name)
from pipeline.model.expert_lora import FUSED, PAIR, ROUTER_PARAMETER, concatenated, expert_of, fuse, \
    fused_parts, parts_of_config, peft_fields, peft_module, router_of, split
from pipeline.model.families import Family
from pipeline.model.quantize import adapter_dtype, dequantized_weight, parameter_count
from pipeline.model.peft_targets import pattern_problem, target_names
from pipeline.model.untaken_lora import untaken_message, untaken_modules
from pipeline.model.weights import read_tensors
from pipeline.names import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX, VOCAB_ROWS

PISSA_EXACT = -1  # pissa_iter: the exact SVD (PEFT's init_lora_weights="pissa"); k >= 0: "pissa_niter_<k>"


class LoRALayer(nn.Module):
    """The low-rank update x @ A @ B, scaled by alpha / rank (alpha / sqrt(rank) with rsLoRA)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, use_rslora: bool = False,
                 generator: torch.Generator | None = None, peft_fan_in: bool = False):
        super().__init__()
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        # as the book, fan_in = rank (A is in x rank); peft_fan_in (an expert's LoRA): PEFT's ParamWrapper draws its
        # lora_A, an nn.Linear(in, r E) (peft/tuners/lora/layer.py:2455), by the same kaiming_uniform_ (a = sqrt(5),
        # :338) over fan_in = in_dim: bound 1 / sqrt(in_dim), drawn here on A's transpose (rank x in)
        nn.init.kaiming_uniform_(self.A.t() if peft_fan_in else self.A, a=math.sqrt(5), generator=generator)
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.rank, self.alpha, self.use_rslora = rank, alpha, use_rslora
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = scaling * (x @ A @ B); scaling the (rank x out) B instead of the (tokens x out) product saves a
        # pass over every adapted activation, forward and backward (bench/README.md, dense step)
        return (x @ self.A) @ (self.B * self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """The update in nn.Linear layout (out x in)."""
        return self.scaling * (self.A @ self.B).t()


class LinearWithLoRA(AdapterLinear):
    """linear(x) + lora(dropout(x)); the wrapped Linear keeps its weights (frozen by apply_lora)."""

    use_dora = False  # what adapter_config.json's use_dora says about this layer
    RECIPE_KEYS = {"r": "lora_rank", "lora_alpha": "lora_alpha", "use_rslora": "use_rslora", "use_dora": "use_dora"}

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 generator: torch.Generator | None = None, peft_fan_in: bool = False):
        super().__init__(linear)
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, use_rslora, generator, peft_fan_in)
        self.lora.to(device=linear.weight.device, dtype=adapter_dtype(linear))  # a quantized base: its compute dtype
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def peft_config(self, family: Family) -> dict[str, Any]:
        return {"r": self.lora.rank, "lora_alpha": self.lora.alpha,
                "lora_dropout": self.dropout.p if isinstance(self.dropout, nn.Dropout) else 0.0,
                "use_rslora": self.lora.use_rslora, "use_dora": self.use_dora, "fan_in_fan_out": bool(family.conv1d),
                "init_lora_weights": True}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.linear(x)
        result = self.linear(x)
        # PEFT's Linear.forward: the input cast to the adapter's dtype (fp32 on a bf16 base: upcast_adapter), the
        # sum formed in the wider dtype and cast back to the base layer's
        return (result + self.lora(self.dropout(x.to(self.lora.A.dtype)))).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        return self.linear.weight.float() + self.lora.delta_weight().float()

    def peft_params(self) -> dict[str, tuple[nn.Parameter, bool]]:
        """PEFT's name for each trained tensor (after the module's key) -> (ours, stored transposed). The one map
        save_adapter and load_adapter both read: PEFT's lora_A.weight is A^T (r x in), lora_B.weight is B^T."""
        return {"lora_A.weight": (self.lora.A, True), "lora_B.weight": (self.lora.B, True)}

    def unchanged_by(self) -> str | None:
        """The PEFT tensor that makes this layer's update nothing (all zero), or None when the update is real:
        merging an adapter whose update is nothing changes nothing, which says it was never trained."""
        return next((name for name, param in (("lora_B", self.lora.B), ("lora_A", self.lora.A))
                     if not param.any()), None)


class LinearWithDoRA(LinearWithLoRA):
    """DoRA: the weight W + s B A split into a direction and a trained magnitude m per output feature,
    W' = m * (W + s B A) / ||W + s B A||_c, computed as PEFT's DoraLinearLayer computes it.

    m starts at the row norms of W (one per output feature, nn.Linear layout), so a fresh adapter (B = 0) leaves
    the output unchanged. The norm ||.||_c is detached, as the paper suggests (section 4.3) and PEFT does: it
    follows the update but takes no gradient, so no (out x in) matrix is kept for the backward. The forward never
    forms W': linear(x) + (m/n - 1) x W^T + (m/n) lora(x); with dropout in training the last two use dropout(x),
    whose x W^T is one more product (PEFT's order, so that gradients match it too).
    """

    use_dora = True

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__(linear, rank, alpha, dropout, use_rslora, generator)
        self.magnitude = nn.Parameter(self.weight_norm())

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """||W + s B A|| per output feature, in the adapter's dtype (formed in fp32); a constant for autograd."""
        weight = dequantized_weight(self.linear)  # a quantized base's dequantized weight, as PEFT's bnb DoRA reads it
        return torch.linalg.norm(weight.float() + self.lora.delta_weight().float(), dim=1).to(self.lora.A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.linear(x)
        result = self.linear(x)
        x = x.to(self.lora.A.dtype)  # as LoRA's forward; PEFT's DoRA takes W in that dtype too
        scale = self.magnitude / self.weight_norm()
        if isinstance(self.dropout, nn.Identity) or not self.training:
            dropped = x
            base = result if self.linear.bias is None else result - self.linear.bias
        else:
            dropped = self.dropout(x)
            base = F.linear(dropped, dequantized_weight(self.linear).to(x.dtype))
        return (result + (scale - 1) * base + scale * self.lora(dropped)).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        weight = super().merged_weight()
        return (self.magnitude.float() / torch.linalg.norm(weight, dim=1)).unsqueeze(1) * weight

    def peft_params(self) -> dict[str, tuple[nn.Parameter, bool]]:
        return {**super().peft_params(), "lora_magnitude_vector": (self.magnitude, False)}

    def unchanged_by(self) -> str | None:
        """B = 0 with the magnitude at its start (the norms of W) is nothing; a trained magnitude alone is not."""
        zero = super().unchanged_by()
        if zero is None or not torch.allclose(self.magnitude, self.weight_norm()):
            return None
        return zero


class LinearWithFusedLoRA(AdapterLinear):
    """One expert's gate_proj or up_proj under the LoRA PEFT trains on transformers 5's fused gate_up_proj
    (pipeline.model.expert_lora): one pair of rank 2 rank and alpha 2 alpha over the expert's [gate; up] rows, A
    shared by both halves, B dense (2I x 2 rank). The gate_proj wrapper holds the pair (`lora`, a LoRALayer hidden ->
    2I); the up_proj wrapper reads it (`owner`) and adds the second half of the rows. Same scale as a LoRA of rank r
    (2 alpha / 2r), rsLoRA's 2 alpha / sqrt(2r) as PEFT's alpha_pattern and rank_pattern give it."""

    RECIPE_KEYS = LinearWithLoRA.RECIPE_KEYS
    use_dora = False

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, use_rslora: bool = False,
                 generator: torch.Generator | None = None, owner: "LinearWithFusedLoRA | None" = None):
        super().__init__(linear)
        self.rank, self.alpha = rank, alpha  # the recipe's, as adapter_config.json's r / lora_alpha say them
        self.half = 0 if owner is None else 1  # gate_proj's rows, then up_proj's
        if owner is None:
            self.lora = LoRALayer(linear.in_features, 2 * linear.out_features, 2 * rank, 2 * alpha, use_rslora,
                                  generator, peft_fan_in=True)
            self.lora.to(device=linear.weight.device, dtype=adapter_dtype(linear))
        self._owner = (owner,) if owner is not None else ()  # a tuple: the pair is registered once, on gate_proj

    @property
    def pair(self) -> LoRALayer:
        return self._owner[0].lora if self._owner else self.lora

    def _rows(self) -> slice:
        out = self.linear.out_features
        return slice(self.half * out, (self.half + 1) * out)

    def peft_config(self, family: Family) -> dict[str, Any]:
        return {"r": self.rank, "lora_alpha": self.alpha, "lora_dropout": 0.0, "use_rslora": self.pair.use_rslora,
                "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.linear(x)
        if self.disabled:
            return result
        pair = self.pair
        update = (x.to(pair.A.dtype) @ pair.A) @ (pair.B[:, self._rows()] * pair.scaling)
        return (result + update).to(result.dtype)

    def merged_weight(self) -> torch.Tensor:
        return self.linear.weight.float() + self.pair.delta_weight()[self._rows()].float()

    def peft_params(self) -> dict[str, tuple[nn.Parameter, bool]]:
        """The pair's tensors on the gate_proj wrapper (upcast_adapter, Adafactor's layout read them); the file holds
        them fused over the experts (expert_lora.fuse), not under this module's name."""
        return {} if self._owner else {"lora_A.weight": (self.lora.A, True), "lora_B.weight": (self.lora.B, True)}

    def unchanged_by(self) -> str | None:
        pair = self.pair
        return next((name for name, param in (("lora_B", pair.B[:, self._rows()]), ("lora_A", pair.A))
                     if not param.any()), None)


def wrap_experts(model: nn.Module, paths: list[str], rank: int, alpha: float, use_rslora: bool,
                 generator: torch.Generator | None) -> list[str]:
    """The expert Linears and routers among `paths` as PEFT's ParamWrapper adapts them (pipeline.model.expert_lora):
    each expert's gate_proj and up_proj as one LinearWithFusedLoRA pair (gate_proj's holds it), each down_proj and
    router a LinearWithLoRA; A drawn over PEFT's fan-in (LoRALayer's peft_fan_in)."""
    wrapped = []
    for path in sorted(p for p in paths if p.endswith(".gate_proj")):
        up = path.removesuffix("gate_proj") + "up_proj"
        gate = upcast_adapter(LinearWithFusedLoRA(model.get_submodule(path), rank, alpha, use_rslora, generator))
        model.set_submodule(path, gate.train(gate.linear.training))
        second = LinearWithFusedLoRA(model.get_submodule(up), rank, alpha, owner=gate)
        model.set_submodule(up, second.train(second.linear.training))
        wrapped += [path, up]
    singles = {p for p in paths if p.endswith(".down_proj") or router_of(p)}
    return wrapped + replace_linears(model, lambda linear: LinearWithLoRA(linear, rank, alpha, 0.0, use_rslora,
                                                                         generator, peft_fan_in=True), singles)


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float, *, targets: set[str] | None = None,
                             dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False,
                             generator: torch.Generator | None = None, prefix: str = "") -> list[str]:
    """The book's recursive walk over named_children; `targets` (full module paths) limits which Linears;
    use_dora wraps them with LinearWithDoRA instead."""
    wrap = LinearWithDoRA if use_dora else LinearWithLoRA
    return replace_linears(model, lambda linear: wrap(linear, rank, alpha, dropout, use_rslora, generator),
                           targets, prefix)


def lora_modules(model: nn.Module) -> dict[str, AdapterLinear]:
    """The adapted Linears by path: LoRA's, or OFT's (pipeline.model.oft), which merge and export alike."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLinear)}


def apply_lora(model: nn.Module, targets: str | Iterable[str] | None = "all", rank: int = 8,
               alpha: float | None = None, dropout: float = 0.0, use_rslora: bool = False, use_dora: bool = False,
               seed: int | None = None, additional_targets: str | Iterable[str] | None = None,
               pissa_iter: int | None = None, pissa_start: Mapping[str, torch.Tensor] | None = None,
               blocks: Iterable[int] | None = None) -> list[str]:
    """Freeze the model, wrap the targeted Linears (not the output head) with LoRA; returns their paths.

    pissa_iter (None: the book's init) starts every pair from its base weight's principal singular vectors
    (init_pissa); pissa_start gives those starting pairs instead (a resume: pissa_start_of its converted adapter).

    Patterns are the family's HF module names, matched by suffix (PEFT's rule): for GPT-2 'c_attn',
    'attn.c_proj', 'c_proj' (both projections), 'h.0.attn.c_attn' (one block); for Llama / Qwen 'q_proj',
    'mlp.down_proj', 'layers.0.self_attn.q_proj'; 'all' = every Linear except lm_head. A pattern that
    matches nothing is a UserError naming the available modules. additional_targets are trained in full, and so
    is a reward model's score head (it starts random: PEFT's task_type SEQ_CLS adds it to modules_to_save).
    blocks (use_llama_pro): only the targets inside these blocks take LoRA.
    """
    alpha = default_lora_alpha(rank) if alpha is None else alpha
    chosen, extra = adapter_targets(model, targets, additional_targets, blocks)
    model.requires_grad_(False)
    # a CPU generator whatever the model's device: LoRALayer draws A on the host before moving it to the base
    # layer's device (a CUDA generator cannot draw into a CPU tensor), so a seed gives the same A on every machine
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    experts = [n for n in chosen if expert_of(n) is not None or router_of(n) is not None]
    if experts and (dropout or use_dora):  # PEFT's ParamWrapper refuses both
        raise ValueError("LoRA on MoE experts and routers takes no lora_dropout and no DoRA (PEFT's ParamWrapper"
                         " refuses both)")
    replaced = replace_linear_with_lora(model, rank, alpha, targets=set(chosen) - set(experts), dropout=dropout,
                                        use_rslora=use_rslora, use_dora=use_dora, generator=generator)
    replaced += wrap_experts(model, experts, rank, alpha, use_rslora, generator)
    if pissa_iter is not None or pissa_start is not None:
        init_pissa(model, PISSA_EXACT if pissa_iter is None else pissa_iter, seed, pissa_start)
    train_additional(model, extra)
    return replaced


def keep_starting_modules(model: nn.Module) -> None:
    """Remember frozen copies of the additional_target modules (trained in full) as they are now, so that
    adapters_disabled() gives the starting model back; PEFT's modules_to_save keep their original the same way.
    One deepcopy memo for all: a tied head's copy shares the embedding copy's weight, as the originals do (two
    copies would cost a second vocabulary matrix). Not for ZeRO-3-partitioned weights (a copy of a partition is
    not the module)."""
    import copy

    memo: dict[int, Any] = {}
    starting = {name: copy.deepcopy(model.get_submodule(name), memo).requires_grad_(False)
                for name in getattr(model, "_lora_additional", [])}
    model._lora_starting = starting  # type: ignore[assignment]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """The model without its LoRA updates (and with the kept starting copies of additional_target modules):
    the base model a LoRA run started from, without a second copy of its weights in memory."""
    wrappers = list(lora_modules(model).values())
    swapped = []
    for name, original in getattr(model, "_lora_starting", {}).items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        swapped.append((owner, child, getattr(owner, child)))
        setattr(owner, child, original)
    for wrapper in wrappers:
        wrapper.disabled = True
    try:
        yield model
    finally:
        for wrapper in wrappers:
            wrapper.disabled = False
        for owner, child, module in swapped:
            setattr(owner, child, module)


def trainable_report(model: nn.Module) -> tuple[int, int, float, str]:
    """(trainable, total, percent, printable line), PEFT's print_trainable_parameters line; a tied weight counts once,
    a parameter by quantize.parameter_count (a 4-bit weight by its values, not its packed bytes, so a QLoRA run says
    the same total as the unquantized one; a ZeRO-3 partitioned one by its full size: the line said 0 of 0)."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        size = parameter_count(p)
        total += size
        trainable += size if p.requires_grad else 0
    pct = 100.0 * trainable / max(total, 1)
    return trainable, total, pct, f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


# ------------------------------------------------------------------------------------------------
# PiSSA: principal singular values and vectors as the starting adapter
# ------------------------------------------------------------------------------------------------

def pissa_pair(weight: torch.Tensor, rank: int, scaling: float, niter: int,
               seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's pissa_init for one (out x in) weight: (lora_A, lora_B) in PEFT's layout (r x in, out x r), fp32, with
    scaling * lora_B @ lora_A the weight's best rank-r approximation. niter -1 is the exact SVD; k >= 0 torch's
    randomized svd_lowrank with k power iterations, drawn from `seed` (PEFT draws from the global RNG, which a
    resume or another rank would not repeat)."""
    weight = weight.float()
    if niter == PISSA_EXACT:
        v, s, uh = torch.linalg.svd(weight, full_matrices=False)
        v, s, uh = v[:, :rank], s[:rank], uh[:rank]
    else:
        with torch.random.fork_rng(devices=[weight.device] if weight.is_cuda else []):
            torch.manual_seed(0 if seed is None else seed)  # the test matrix svd_lowrank draws on the weight's device
            v, s, u = torch.svd_lowrank(weight, rank, niter=niter)
        uh = u.t()
    root = torch.sqrt(s / scaling)
    return torch.diag(root) @ uh, v @ torch.diag(root)


@torch.no_grad()
def init_pissa(model: nn.Module, niter: int, seed: int | None = None,
               start: Mapping[str, torch.Tensor] | None = None) -> None:
    """Start every LoRA wrapper from its PiSSA pair and make its base weight the residual W - s B0 A0 (formed in
    fp32, cast back to the weight's dtype, as PEFT). The pairs, fp32 and keyed as PEFT saves them, are kept as
    model._lora_pissa for save_adapter's conversion. `start` gives them (a resume) instead of the SVD: the same
    pairs give the same residual, bit for bit, whatever the SVD would give on another machine.

    The weights must be whole: the model is built on the host before DeepSpeed partitions it (ZeRO-3). Every rank
    computes its own pairs; deepspeed.initialize then broadcasts rank 0's weights (ZeRO 0-3), and rank 0's pairs
    convert the adapter it writes, so ranks agree even where their SVDs would differ in the last bits."""
    family = family_of_model(model)
    starting: dict[str, torch.Tensor] = {}
    for name, wrapper in lora_modules(model).items():
        if wrapper.use_dora:
            raise ValueError("PiSSA and DoRA do not combine (PEFT refuses init_lora_weights='pissa' with DoRA)")
        key = PEFT_PREFIX + family.to_hf(name)
        linear, lora = wrapper.linear, wrapper.lora
        if start is not None:
            lora_a, lora_b = start[f"{key}.lora_A.weight"].float(), start[f"{key}.lora_B.weight"].float()
        else:
            lora_a, lora_b = pissa_pair(linear.weight, lora.rank, lora.scaling, niter, seed)
        # through the base's dtype, as PEFT moves the new pair to the base layer's dtype before upcast_adapter's cast
        lora.A.copy_(lora_a.t().to(linear.weight.dtype))
        lora.B.copy_(lora_b.t().to(linear.weight.dtype))
        linear.weight.copy_((linear.weight.float() - lora.scaling * lora_b @ lora_a).to(linear.weight.dtype))
        starting[f"{key}.lora_A.weight"], starting[f"{key}.lora_B.weight"] = lora_a.clone(), lora_b.clone()
    model._lora_pissa = starting  # type: ignore[assignment]


def pissa_start(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The starting PiSSA pairs (PEFT keys, fp32) of a model init_pissa set up, else None."""
    return getattr(model, "_lora_pissa", None)


def pissa_converted(tensors: Mapping[str, torch.Tensor],
                    start: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """PEFT's conversion of a PiSSA adapter to a plain LoRA on the original base (save_pretrained with
    path_initial_model_for_weight_conversion): W + dW = W_res + s B A = W + s (B A - B0 A0) = W + s [B | -B0] [A | A0],
    rank 2r (pissa_converted_config keeps the scale); other tensors (modules_to_save) as they are."""
    out = dict(tensors)
    for key, value in tensors.items():
        if key.endswith(".lora_A.weight"):
            out[key] = torch.cat([value, start[key].to(value)], dim=0)
        elif key.endswith(".lora_B.weight"):
            out[key] = torch.cat([value, -start[key].to(value)], dim=1)
    return out


def pissa_converted_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The converted adapter's config, PEFT's way: r x 2, lora_alpha x 2 (x sqrt(2) under rsLoRA: the same scale),
    init_lora_weights true (a plain LoRA)."""
    alpha = config["lora_alpha"] * (2 ** 0.5 if config.get("use_rslora") else 2)
    return {**config, "r": 2 * config["r"], "lora_alpha": alpha, "init_lora_weights": True}


def adapter_state(model: nn.Module, start: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The tensors save_adapter writes: lora_state_dict, converted when PiSSA `start` pairs are given."""
    tensors = lora_state_dict(model)
    return pissa_converted(tensors, start) if start is not None else tensors


def pissa_start_of(directory: str | Path) -> dict[str, torch.Tensor]:
    """The starting pairs inside a converted adapter (its second half: A0, and B0 negated), as init_pissa takes."""
    directory = Path(directory)
    rank = int(read_adapter_config(directory)["r"]) // 2
    start = {}
    for _, key, tensor in read_tensors([directory / ADAPTER_WEIGHTS]):
        if key.endswith(".lora_A.weight"):
            start[key] = tensor[rank:].float()
        elif key.endswith(".lora_B.weight"):
            start[key] = -tensor[:, rank:].float()
    return start


# ------------------------------------------------------------------------------------------------
# Merge / unmerge
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def fold_lora(wrapper: AdapterLinear) -> nn.Linear:
    """A new Linear whose weight is the wrapper's merged_weight (the base weight + scale * (A @ B)^T; DoRA's
    rescaled by magnitude / norm); the wrapper is left as it was.

    The weight is formed in fp32 and cast back to the base dtype; the bias and buffers are shared. Leaving the wrapper
    intact lets the merge stage check each folded layer against the base it came from, and lets
    unmerge_lora put the exact base back.
    """
    linear = wrapper.linear
    weight = linear.weight
    merged = nn.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
    merged.weight = nn.Parameter(wrapper.merged_weight().to(weight.dtype), requires_grad=weight.requires_grad)
    merged.bias = linear.bias
    for name, buffer in linear.named_buffers(recurse=False):  # a DeepSeek-V3 router's e_score_correction_bias
        merged.register_buffer(name, buffer, persistent=name not in linear._non_persistent_buffers_set)
    return merged.train(linear.training)


@torch.no_grad()
def merge_lora(model: nn.Module, keep_original: bool = False) -> list[str]:
    """Put each LoRA layer's folded Linear (fold_lora) in its place; returns the paths.

    The wrapper (with its base weight) is dropped, so memory stays one model plus one layer.
    keep_original=True keeps it on the folded Linear so that unmerge_lora restores it bit for bit.
    """
    merged = []
    for name in list(lora_modules(model)):  # names only: a held wrapper would keep its base weight alive
        wrapper = model.get_submodule(name)
        linear = fold_lora(wrapper)
        if keep_original:
            linear._lora_unmerge = (wrapper,)  # type: ignore[assignment]  # in a tuple: not a submodule
        model.set_submodule(name, linear)
        merged.append(name)
    return merged


@torch.no_grad()
def unmerge_lora(model: nn.Module) -> list[str]:
    """Undo merge_lora(keep_original=True): the LoRA wrappers, with their exact base weights, come back."""
    restored = []
    for name, module in list(model.named_modules()):
        saved = getattr(module, "_lora_unmerge", None)
        if saved is None:
            continue
        del module._lora_unmerge
        model.set_submodule(name, saved[0])
        restored.append(name)
    if not restored:
        raise ValueError("nothing to unmerge: merge_lora(model, keep_original=True) was not called")
    return restored


# ------------------------------------------------------------------------------------------------
# Adapter files (PEFT layout)
# ------------------------------------------------------------------------------------------------

def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors (+ additional_target modules), keyed as PEFT saves them for the family's HF class."""
    family = family_of_model(model)
    out: dict[str, torch.Tensor] = {}
    for name, wrapper in lora_modules(model).items():
        if expert_of(name):  # fused over the experts below
            continue
        key = peft_key(family, name)
        for suffix, (param, transposed) in wrapper.peft_params().items():
            out[f"{key}.{suffix}"] = param.detach().t() if transposed else param.detach()
    for name in getattr(model, "_lora_additional", []):
        for pname, tensor in model.get_submodule(name).state_dict().items():
            out[f"{PEFT_PREFIX}{family.to_hf(name)}.{pname}"] = _hf_layout(family, f"{name}.{pname}", tensor.detach())
    for key, (params, _) in expert_params(model).items():
        lora_a, lora_b = fuse([(a.detach().t(), b.detach().t()) for a, b in params])
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = lora_a, lora_b
    return out


def peft_key(family: Family, name: str) -> str:
    """PEFT's key of an adapted module (ours): the family's HF name, but a router's is its transformers 5 path (PEFT's
    ParamWrapper on mlp.gate.weight: Mixtral's too, whose hub name is block_sparse_moe.gate)."""
    return PEFT_PREFIX + (family.prefix + name if router_of(name) else family.to_hf(name))


def expert_params(model: nn.Module) -> dict[str, tuple[list[tuple[nn.Parameter, nn.Parameter]], str]]:
    """PEFT's key of each fused expert adapter (expert_lora.peft_module, prefixed) -> (each expert's (A, B), ours,
    in expert order; the fused parameter): gate_up_proj's pairs held by the gate_proj wrappers, down_proj's by the
    down_proj LinearWithLoRAs. Every expert of a block is adapted (lora_target takes the names on every expert)."""
    family = family_of_model(model)
    wrappers = {n: w for n, w in lora_modules(model).items() if expert_of(n)}
    parts = fused_parts(wrappers)
    found: dict[str, dict[int, tuple[nn.Parameter, nn.Parameter]]] = {}
    fused: dict[str, str] = {}
    for name, wrapper in wrappers.items():
        block, expert, linear = expert_of(name)  # type: ignore[misc]
        if linear == "up_proj":
            continue
        part = "gate_up_proj" if linear == "gate_proj" else "down_proj"
        key = PEFT_PREFIX + family.prefix + peft_module(block, part, parts)
        found.setdefault(key, {})[expert] = (wrapper.lora.A, wrapper.lora.B)
        fused[key] = part
    return {key: ([pairs[e] for e in sorted(pairs)], fused[key]) for key, pairs in found.items()}


def _per_expert_tensors(model: nn.Module, config: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                        weights: Path) -> dict[str, torch.Tensor]:
    """The tensors with an adapter's per-expert pairs fused as the model's expert wrappers hold them, as PEFT 0.21 loads
    an adapter PEFT wrote on transformers 4: there each expert's gate_proj / up_proj / down_proj was its own Linear
    with its own rank-r pair, keyed by its hub name (base_model.model.model.layers.N.mlp.experts.E.gate_proj.lora_A.
    weight; Mixtral's block_sparse_moe.experts.E.w1), and the router an nn.Linear under its hub name (Mixtral's
    block_sparse_moe.gate). gate and up become one pair of rank 2r per expert (expert_lora.concatenated), the experts
    fused as save_adapter writes them (expert_lora.fuse). A fused key already present, or no per-expert key of a block,
    leaves the tensors as they are (the shape check names what does not fit); a block with some experts' pairs and not
    others' is refused in one message naming the missing ones (the shape check said every tensor of the block).

    Under use_rslora that conversion changes the model (PEFT scales the fused pair 2 alpha / sqrt(2r), sqrt(2) times
    the alpha / sqrt(r) each pair was trained with): such an adapter is refused, since PEFT's model of it is not the
    trained one."""
    family = family_of_model(model)
    wrappers = [n for n in lora_modules(model) if expert_of(n)]
    parts = fused_parts(wrappers)
    found: dict[str, dict[int, dict[str, str]]] = {}  # fused key -> expert -> its Linear -> that Linear's old key
    for name in wrappers:
        block, expert, linear = expert_of(name)  # type: ignore[misc]
        key = PEFT_PREFIX + family.prefix + peft_module(block, FUSED[linear], parts)
        found.setdefault(key, {}).setdefault(expert, {})[linear] = PEFT_PREFIX + family.to_hf(name)
    out, fused, lacking = dict(tensors), False, []
    for key, experts in found.items():
        olds = [[per[linear] for linear in PAIR + ("down_proj",) if linear in per] for _, per in sorted(experts.items())]
        wanted = [f"{old}.lora_{ab}.weight" for keys in olds for old in keys for ab in "AB"]
        if f"{key}.lora_A.weight" in out or not any(k in out for k in wanted):
            continue
        if not all(k in out for k in wanted):  # some experts' pairs: PEFT writes one for every expert it targets
            lacking += sorted({k.rsplit(".lora_", 1)[0].removeprefix(PEFT_PREFIX) for k in wanted if k not in out})
            continue
        try:
            pairs = [concatenated([(out[f"{old}.lora_A.weight"], out[f"{old}.lora_B.weight"]) for old in keys])
                     for keys in olds]
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = fuse(pairs)
        except RuntimeError:  # shapes that do not line up: left to the shape check
            continue
        for k in wanted:
            del out[k]
        fused = fused or len(olds[0]) == 2  # gate and up concatenated: the pair whose scale rsLoRA changes
    for name in (n for n in lora_modules(model) if router_of(n)):
        new, old = peft_key(family, name), PEFT_PREFIX + family.to_hf(name)
        for suffix in ("lora_A.weight", "lora_B.weight"):
            if new != old and f"{old}.{suffix}" in out and f"{new}.{suffix}" not in out:
                out[f"{new}.{suffix}"] = out.pop(f"{old}.{suffix}")
    if lacking:
        shown = ", ".join(lacking[:4]) + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else "")
        raise UserError(f"{weights}: one LoRA per expert and Linear (the layout PEFT wrote on transformers 4) without "
                        f"the pair of {shown}: PEFT writes lora_A and lora_B for every expert of a Linear it targets, "
                        "and fuses all of a block's experts into one tensor on transformers 5, so this file is "
                        "incomplete (or written for a model with fewer experts than this one); save the adapter again, "
                        "or copy it whole")
    if fused and config.get("use_rslora"):
        raise UserError(f"{weights}: one LoRA per expert and Linear (the layout PEFT wrote on transformers 4, each "
                        "expert's gate_proj and up_proj a Linear of its own) with use_rslora: true. PEFT 0.21 loads it"
                        " onto transformers 5's fused gate_up_proj as one pair of rank 2r scaled 2 lora_alpha /"
                        " sqrt(2r), sqrt(2) times the lora_alpha / sqrt(r) it was trained with, so PEFT's model is not"
                        " the trained one; fold the adapter into its base with PEFT's merge_and_unload() under"
                        " transformers 4 and use that checkpoint as model_name_or_path")
    return out


def _hf_layout(family: Family, param: str, tensor: torch.Tensor) -> torch.Tensor:
    """Conv1D weights are stored transposed in HF GPT-2 (the transpose is its own inverse)."""
    return tensor.t() if family.is_conv1d(param) else tensor


def _target_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Short HF suffixes (c_attn, q_proj, ...) when they select exactly `names` among the Linears, else full paths.
    A MoE model's experts and router are no Linears in transformers 5 (moe_blocked), so no suffix can select them
    there: Qwen2-MoE's gate_proj names the shared expert's and the dense blocks' (as LLaMA-Factory writes it).
    A wrapped model's (an image-text checkpoint's decoder) are always full paths: its vision tower has Linears of the
    same leaf names (SigLIP's q_proj), which a suffix would adapt in PEFT too (LLaMA-Factory's patch_target_modules
    lists the language model's modules by full name for the same reason)."""
    family = family_of_model(model)
    names = [n for n in names if not (expert_of(n) or router_of(n))]  # PEFT's target_parameters (peft_fields)
    if not names:
        return []
    if family.carried:
        return [family.to_hf(n) for n in names]
    candidates = [n for n in lora_candidates(linear_names(model)) + list(lora_modules(model))
                  if not moe_blocked(family, n, "lora_target", set())]

    def leaf(n: str) -> str:
        return family.to_hf(n).rsplit(".", 1)[-1]

    leaves = sorted({leaf(n) for n in names})
    if {n for n in candidates if leaf(n) in leaves} == set(names):
        return leaves
    return [family.to_hf(n) for n in names]


def expert_fields(settings: Mapping[str, Any], parts: set[str]) -> dict[str, Any]:
    """adapter_config.json's fields for LoRA on MoE experts (expert_lora.peft_fields), {} without expert targets:
    only LoRA's settings have the r / lora_alpha they read (an OFT adapter's have neither)."""
    return peft_fields(parts, settings["r"], settings["lora_alpha"]) if parts else {}


def save_adapter(model: nn.Module, directory: str | Path, cfg_info: Mapping[str, Any] | None = None,
                 start: Mapping[str, torch.Tensor] | None = None) -> Path:
    """adapter_config.json + adapter_model.safetensors, loadable by peft.PeftModel.from_pretrained.

    cfg_info adds to / overrides the config (e.g. {"base_model_name_or_path": "models/gpt2"}). start: the PiSSA
    starting pairs (pissa_start; the model's own by default): the adapter is written converted, for the original base.
    """
    start = pissa_start(model) if start is None else start
    wrappers = lora_modules(model)
    if not wrappers:
        raise ValueError("the model has no LoRA modules to save")
    family = family_of_model(model)
    first = next(iter(wrappers.values()))
    settings = {json.dumps(w.peft_config(family), sort_keys=True) for w in wrappers.values()}
    if len(settings) != 1:
        raise ValueError(f"mixed adapter settings cannot be described by one adapter_config: {sorted(settings)}")
    additional = getattr(model, "_lora_additional", [])
    # a trained tied matrix: both modules in modules_to_save and both tensors in the file, with
    # ensure_weight_tying. Without the flag PEFT keeps the head on the base embedding (another model), without
    # the head's tensor it fails to load, and without lm_head listed it ties nothing for GPT-2 (PEFT finds the
    # pair by the names embed_tokens / lm_head)
    tied = head_is_tied(model) and "lm_head" in additional
    config = {
        "peft_type": first.peft_type,
        "task_type": "SEQ_CLS" if is_reward_model(model) else "CAUSAL_LM",  # what PEFT wraps the base as
        "base_model_name_or_path": None,
        **first.peft_config(family),
        "target_modules": _target_modules(model, list(wrappers)),
        **expert_fields(first.peft_config(family), fused_parts(wrappers)),
        "bias": "none",
        "modules_to_save": [family.to_hf(n) for n in additional] or None,
        "inference_mode": True,
        **({"ensure_weight_tying": True} if tied else {}),
        **(dict(cfg_info) if cfg_info else {}),
    }
    if start is not None:
        config = pissa_converted_config(config)
    tensors: dict[str, torch.Tensor] = {}
    for key, value in adapter_state(model, start).items():
        value = value.contiguous().cpu()
        shared = any(value.untyped_storage().data_ptr() == t.untyped_storage().data_ptr() for t in tensors.values())
        tensors[key] = value.clone() if shared else value  # safetensors refuses shared storage (the tied head)
    with atomic_dir(directory) as tmp:
        write_json(tmp / ADAPTER_CONFIG, config)
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return Path(directory)


# PEFT LoraConfig fields that change which modules take LoRA, with what rank and scale, or what it adds (a bias):
# an adapter that sets one is refused rather than read as another model than PEFT builds
PEFT_UNSUPPORTED = ("alpha_pattern", "rank_pattern", "layers_to_transform", "exclude_modules", "lora_bias",
                    "target_parameters", "trainable_token_indices", "layer_replication")


TARGETS_EXPECTED = "a list of module names, or a string: a regular expression (PEFT's reading of one)"


def _target_list(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value)
                                      and all(isinstance(t, str) for t in value))


def _required_keys(peft_type: str) -> tuple[tuple[str, Callable[[Any], bool], str], ...]:
    """(key, check, what is expected) for each adapter_config.json key an adapter of `peft_type` must hold."""
    if peft_type == "OFT":
        return (("r", lambda v: type(v) is int and v >= 0, "an integer >= 0"),
                ("oft_block_size", lambda v: type(v) is int and v >= 0, "an integer >= 0"),
                ("target_modules", _target_list, TARGETS_EXPECTED))
    return (("r", lambda v: type(v) is int and v >= 1, "an integer >= 1"),
            ("lora_alpha", lambda v: type(v) in (int, float) and math.isfinite(v) and v > 0, "a number > 0"),
            ("target_modules", _target_list, TARGETS_EXPECTED))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    directory = Path(directory)
    path = directory / ADAPTER_CONFIG
    if not directory.is_dir():
        raise UserError(f"adapter: '{directory}' is not a directory (expected {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; an adapter directory holds {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}") from None
    except (OSError, ValueError) as err:  # UnicodeDecodeError, JSONDecodeError, NaN/Infinity
        raise UserError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type", "LORA")
    if peft_type not in ("LORA", "OFT"):
        raise UserError(f"{path}: peft_type {json.dumps(peft_type)} is not supported (LORA or OFT)")
    problems = []
    for key, ok, expected in _required_keys(peft_type):
        if key == "target_modules" and config.get(key) == [] and config.get("target_parameters"):
            continue  # only MoE experts adapted: PEFT writes target_modules [] beside target_parameters
        if key not in config:
            problems.append(f"{path}: missing key '{key}'")
        elif not ok(config[key]):
            problems.append(f"{path}: {key} is {json.dumps(config[key])}; expected {expected}")
    if not problems and (problem := pattern_problem(config.get("target_modules"))):
        problems.append(f"{path}: {problem}")
    if peft_type == "OFT":
        from pipeline.model.oft import oft_config_problems

        problems += [f"{path}: {problem}" for problem in oft_config_problems(config)]
    fused: tuple[str, ...] = ()
    if config.get("target_parameters"):  # LoRA on MoE experts, as PEFT writes it: those keys in exactly its form
        fused = ("target_parameters", "rank_pattern", "alpha_pattern")
        if not problems:
            try:
                parts_of_config(config)
            except ValueError as err:
                problems.append(f"{path}: {err}")
    unsupported = [(k, config[k]) for k in PEFT_UNSUPPORTED
                   if k not in fused and config.get(k) not in (None, False, {}, [])]
    if config.get("bias", "none") not in ("none", None):
        unsupported.append(("bias", config["bias"]))
    accepted = {"bias": '"none"'}  # what the message asks for instead of the value given
    problems += [f"{path}: {key} is {json.dumps(value)}; this pipeline reads adapters with one r and one lora_alpha "
                 "on whole target modules and no bias, so it would compute another model than PEFT does (expected "
                 f"{accepted.get(key, 'it absent, null or empty')}; fold the adapter into its base with "
                 "PEFT's merge_and_unload() and use that checkpoint as model_name_or_path)"
                 for key, value in unsupported]
    if problem := layers_pattern_problem(config):
        problems.append(f"{path}: {problem}")
    if mutated := base_mutating_init(config):
        problems.append(unconverted_message(path, mutated))
    if problems:
        raise UserError(problems)
    return config


def layers_pattern_problem(config: Mapping[str, Any]) -> str | None:
    """PEFT 0.21's LoraConfig.__post_init__ rules (OFTConfig's second one too): layers_pattern (the name of the
    model's layer list) only with layers_to_transform (which it qualifies), and a LoRA adapter's string target_modules
    with no layers_pattern at all, not even an empty one. PEFT raises on such a config, so it cannot load such an
    adapter (hand-edited: its own save_pretrained never writes one); read here, it would load without a word.
    layers_to_transform set is refused with PEFT_UNSUPPORTED."""
    pattern, targets = config.get("layers_pattern"), config.get("target_modules")
    kind = "OFTConfig" if config.get("peft_type") == "OFT" else "LoraConfig"
    if kind == "LoraConfig" and isinstance(targets, str) and pattern is not None:
        given, rule = (f"beside target_modules {json.dumps(targets)}, a string",
                       "`layers_pattern` cannot be used when `target_modules` is a str")
    elif pattern and config.get("layers_to_transform") is None:
        given, rule = ("without layers_to_transform",
                       "When `layers_pattern` is specified, `layers_to_transform` must also be specified")
    else:
        return None
    return (f"layers_pattern is {json.dumps(pattern)} {given}, which PEFT 0.21's {kind} refuses (\"{rule}\"), so PEFT"
            " cannot load this adapter; expected layers_pattern null, as PEFT writes it for an adapter on every layer"
            " (set it so in this file)")


# PEFT 0.21's init_lora_weights values whose start changes the base weights (tuners/lora/layer.py update_layer: the
# pissa / olora / corda / lora_ga inits subtract the starting pairs' product from the base layer's weight, loftq
# replaces it by its quantized form): the trained pairs apply to that base, not to the checkpoint, so read as a plain
# LoRA on model_name_or_path, as this pipeline reads every adapter, the file is another model without an error. Each
# with how PEFT itself loads such a file onto the checkpoint. "eva", "mica", "orthogonal" and "gaussian" start the
# pairs alone (B = 0, or a product nothing subtracts) and leave the base as it is: such an adapter is a plain LoRA.
BASE_MUTATING_INITS = {
    "pissa": "PEFT recomputes that start when it loads it",
    "olora": "PEFT recomputes that start (a QR decomposition of each weight) when it loads it",
    "corda": "PEFT's load needs the statistics preprocess_corda took from the training data, and raises without them",
    "lora_ga": "PEFT 0.21 loads it onto the original base: the gradients its start came from are gone",
    "loftq": "PEFT quantizes the checkpoint again when it loads it",
}
# Those PEFT converts to a plain LoRA on the original base (rank 2r, init_lora_weights true): save_pretrained(...,
# path_initial_model_for_weight_conversion=<the adapter saved before training>), peft/tuners/lora/model.py
# _convert_state_dict_for_initial_model. LoftQ has no conversion: its base is another (quantized) model.
CONVERTIBLE_INITS = ("pissa", "olora", "corda", "lora_ga")


def base_mutating_init(config: Mapping[str, Any]) -> str | None:
    """adapter_config.json's init_lora_weights where it starts with one of BASE_MUTATING_INITS ('pissa',
    'pissa_niter_16', 'loftq', ...), else None: True / false / 'gaussian' (a plain LoRA, and what PEFT's conversion
    writes), 'eva', 'mica', 'orthogonal' leave the base as it is."""
    init = config.get("init_lora_weights")
    return init if isinstance(init, str) and init.lower().startswith(tuple(BASE_MUTATING_INITS)) else None


def unconverted_message(path: Path, init: str) -> str:
    """Why an adapter whose start changed the base (base_mutating_init) is refused, and the way on: for PiSSA (OLoRA,
    CorDA, LoRA-GA) its conversion to a plain LoRA, which LLaMA-Factory 0.9.5's PissaConvertCallback writes to
    output_dir/pissa_converted (pissa_convert: true; the unconverted one stays in output_dir), where a merge recipe
    names it; for LoftQ the backbone it was trained on, as PEFT's LoftQ example saves it, or PEFT's merge."""
    name = next(k for k in BASE_MUTATING_INITS if init.lower().startswith(k))
    shown = f"{path}: init_lora_weights is {json.dumps(init)}"
    if name not in CONVERTIBLE_INITS:  # LoftQ
        return (f"{shown}: the adapter as trained, whose pairs apply to the backbone LoftQ wrote in place of each"
                " targeted weight (quantized to loftq_config's loftq_bits), not to the checkpoint itself"
                f" ({BASE_MUTATING_INITS[name]}); read as a plain LoRA on model_name_or_path it would compute another"
                " model without an error. Use that backbone as model_name_or_path with this adapter saved under"
                " init_lora_weights true (PEFT's examples/loftq_finetuning save both so; where model_name_or_path"
                " already is that backbone, set init_lora_weights: true in this file), or fold the adapter into it"
                " with PEFT's merge_and_unload() and use that checkpoint as model_name_or_path")
    converted = path.parent / "pissa_converted"
    where = (f"set adapter_name_or_path: {converted}, which holds it" if (converted / ADAPTER_CONFIG).is_file() else
             ("LLaMA-Factory writes it to output_dir/pissa_converted with pissa_convert: true, " if name == "pissa"
              else "") + "PEFT with save_pretrained(..., path_initial_model_for_weight_conversion=<the adapter saved"
             " before training>)")
    randomized = (", by a randomized SVD for pissa_niter_<k>: another start than the trained one"
                  if init.lower().startswith("pissa_niter") else "")
    return (f"{shown}: the adapter as trained, whose pairs apply to the residual base its start took out of the"
            f" original weights, not to the checkpoint itself ({BASE_MUTATING_INITS[name]}{randomized}); read as a"
            " plain LoRA on model_name_or_path it would compute another model without an error. Use its conversion"
            " to a plain LoRA on the original base (init_lora_weights true, rank 2r; this pipeline's runs always"
            f" write adapter/ so): {where}")


def differing_settings(recipe_keys: Mapping[str, str], config: Mapping[str, Any],
                       ours: Mapping[str, Any]) -> list[str]:
    """The adapter_config.json keys of a method's RECIPE_KEYS whose value in `config` differs from `ours`: an adapter
    continued (or loaded into existing adapter modules) must have been trained with the recipe's settings. A key
    absent or null counts as false / 0 (PEFT's older files leave use_rslora and use_dora out). One comparison for
    the load (_check_settings, on the built model) and the recipe rule that says it at the key's line first
    (pipeline.recipe.rules.model.adapter_is_the_method, on the recipe's values)."""
    return [key for key in recipe_keys if (config.get(key) or False) != (ours.get(key) or False)]


def _check_settings(wrappers: Mapping[str, AdapterLinear], config: Mapping[str, Any], path: Path,
                    family: Family) -> None:
    """An adapter loaded into existing adapter modules must be of the same method, trained with the same settings."""
    first = next(iter(wrappers.values()))
    theirs = config.get("peft_type", "LORA")
    if theirs != first.peft_type:
        raise UserError(f"{path}: peft_type is {theirs} but the model trains {first.peft_type} (set the recipe's "
                        f"finetuning_type: {theirs.lower()} to continue this adapter)")
    ours = first.peft_config(family)
    problems = [f"{path}: {key} is {config.get(key)!r} but the model's {first.method} uses {ours[key]!r} (set the"
                f" recipe's {first.RECIPE_KEYS[key]} to match the adapter)"
                for key in differing_settings(first.RECIPE_KEYS, config, ours)]
    if problems:
        raise UserError(problems)


def _tied_tensors(model: nn.Module, config: Mapping[str, Any], tensors: dict[str, torch.Tensor],
                  weights: Path) -> dict[str, torch.Tensor]:
    """The tensors with both keys of a tied embedding / head set to the one matrix the adapter trains.

    PEFT (ensure_weight_tying) writes both, equal; an adapter with one of them and the flag means both. Without
    the flag PEFT leaves the other one at the base's weights, and a pair that differs unties them: neither is a
    model whose head is tied, so it is refused rather than loaded as another model than PEFT's.
    """
    if not (head_is_tied(model) and "lm_head" in getattr(model, "_lora_additional", [])):
        return tensors
    family = family_of_model(model)
    keys = [f"{PEFT_PREFIX}{family.to_hf(name)}.weight" for name in TIED]
    given = [k for k in keys if k in tensors]
    if not given:
        return tensors  # reported as missing tensors
    if len(given) == 2 and not torch.equal(tensors[keys[0]], tensors[keys[1]]):
        why = f"'{keys[0]}' and '{keys[1]}' differ"
    elif len(given) == 1 and not config.get("ensure_weight_tying"):
        other = next(k for k in keys if k not in given)
        why = (f"it holds '{given[0]}' but not '{other}' and does not set \"ensure_weight_tying\": true, so PEFT"
               " keeps the other one at the base model's weights")
    else:
        return {**tensors, **{k: tensors[given[0]] for k in keys}}
    raise UserError(f"{weights}: {why}; this model's output head is tied to its token embedding (one matrix), so"
                    " it cannot compute that adapter model. Set tie_word_embeddings: false in the recipe to load it"
                    " as PEFT does; or, if the two were trained as one matrix (this pipeline's LoRA runs wrote"
                    " such adapters before ensure_weight_tying), add \"ensure_weight_tying\": true to its"
                    f" {ADAPTER_CONFIG}")


def embedding_targets(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """The target_modules entries that name an embedding (the token embedding, GPT-2's position table) or the output
    head (PEFT's suffix rule), which take no LoRA here (select_modules refuses the head for lora_target; an embedding
    is no Linear)."""
    family = family_of_model(model)
    return [t for t in targets if any(matches(family.to_hf(ours), t) for ours in embedding_names(model))]


def embedding_target_message(path: Path, targets: list[str], tied: bool) -> str:
    """Why an adapter with LoRA on the embedding or the head is refused. On a tied model PEFT's own merge is not its
    adapter model: merge_and_unload folds the head's update into the one matrix the embedding shares (measured on a
    tied Qwen2 with PEFT 0.21: the merged logits differ from the unmerged ones; PEFT warns, peft issue #2777)."""
    tied_note = (" This model's head is tied to its token embedding, and PEFT's merge_and_unload folds such an update"
                 " into that one matrix, so even PEFT's merged model is not its adapter model (PEFT's warning, peft"
                 " issue #2777): load the base in transformers with tie_word_embeddings=False and lm_head.weight a"
                 " copy of the embedding before merging.") if tied else ""
    return (f"{path}: target_modules {targets} puts LoRA on an embedding (the token embedding, a learned position"
            " table) or the output head, which this pipeline neither trains nor loads (train them in full with additional_target, PEFT's modules_to_save)."
            f"{tied_note} Fold the adapter into its base with PEFT's merge_and_unload() and use that checkpoint as"
            " model_name_or_path")


def expert_targets(model: nn.Module, config: Mapping[str, Any]) -> list[str]:
    """The lora_target names (the family's: gate_proj / up_proj / down_proj, Mixtral's w1 / w3 / w2) of the fused
    expert parameters an adapter_config.json targets (read_adapter_config checked them)."""
    parts = set(config.get("target_parameters") or [])
    return [name for name, linear in expert_spelling(family_of_model(model)).items() if FUSED[linear] in parts] + \
        ([router_name(family_of_model(model)) or "gate"] if ROUTER_PARAMETER in parts else [])


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Load a PEFT-layout adapter; injects LoRA from adapter_config.json unless the model already has it.

    Every tensor is checked against the model: a missing, unexpected or differently shaped tensor
    (an adapter trained on another model size) is a UserError naming the key and both shapes.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl"))
        hint = (f" ({', '.join(pickled)} holds pickled weights, which this pipeline never loads: pickle can run"
                " code; save the adapter with safetensors, e.g. PEFT's save_pretrained(safe_serialization=True))"
                if pickled else "")
        raise UserError(f"{weights}: missing; an adapter directory holds {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS}"
                        f"{hint}")
    if config.get("task_type") == "SEQ_CLS" and not is_reward_model(model):
        raise UserError(f"{directory / ADAPTER_CONFIG}: a reward-model adapter (task_type SEQ_CLS: a score head, "
                        "no LM head) on a language model; load it with stage: rm (docs/reward-models.md)")
    tensors = {key: tensor for _, key, tensor in read_tensors([weights])}
    if untaken := untaken_modules(family_of_model(model), linear_names(model), tensors):  # before apply_lora's refusal
        raise UserError(untaken_message(family_of_model(model), str(weights), untaken))
    if overlap := adapted_and_saved(tensors, saved_modules(model, config)):  # before its targets are read
        raise UserError(adapted_and_saved_message(str(weights), overlap, family_of_model(model)))
    existing = lora_modules(model)
    if existing:
        _check_settings(existing, config, directory / ADAPTER_CONFIG, family_of_model(model))
    else:
        targets = target_names(model, config["target_modules"], directory / ADAPTER_CONFIG)
        if embedding := embedding_targets(model, targets):
            raise UserError(embedding_target_message(directory / ADAPTER_CONFIG, embedding, head_is_tied(model)))
        targets = targets + expert_targets(model, config)
        if config.get("peft_type", "LORA") == "OFT":
            from pipeline.model.oft import apply_oft_config

            apply_oft_config(model, targets, config)
        else:
            apply_lora(model, targets, rank=int(config["r"]), alpha=float(config["lora_alpha"]),
                       dropout=float(config.get("lora_dropout") or 0.0), use_rslora=bool(config.get("use_rslora")),
                       use_dora=bool(config.get("use_dora")), additional_targets=saved_modules(model, config))
    tensors = _tied_tensors(model, config, _per_expert_tensors(model, config, tensors, weights), weights)
    model_keys = {k: tuple(v.shape) for k, v in lora_state_dict(model).items()}
    problems = []
    for key, shape in model_keys.items():
        if key not in tensors:
            problems.append(f"{weights}: missing tensor '{key}' (the model expects shape {list(shape)})")
        elif tuple(tensors[key].shape) != shape:
            rows = len(shape) == 2 and tensors[key].shape[1] == shape[1] and key.endswith(VOCAB_ROWS)
            why = ("an adapter trained with added tokens: set the same add_tokens, add_special_tokens / "
                   "new_special_tokens and new_special_tokens_config as its run, so the base grows as it did in "
                   "training" if rows else "an adapter for another model size or rank?")
            problems.append(f"{weights}: tensor '{key}' has shape {list(tensors[key].shape)}, the model expects"
                            f" {list(shape)} ({why})")
    problems += [f"{weights}: unexpected tensor '{k}' (shape {list(tensors[k].shape)}); the model has no such"
                 " LoRA module" for k in sorted(set(tensors) - set(model_keys))]
    if problems:
        raise UserError(problems)
    family = family_of_model(model)
    with torch.no_grad():
        for name, wrapper in lora_modules(model).items():
            if expert_of(name):
                continue
            key = peft_key(family, name)
            for suffix, (param, transposed) in wrapper.peft_params().items():
                value = tensors[f"{key}.{suffix}"]
                param.copy_(value.t() if transposed else value)
        for key, (params, _) in expert_params(model).items():
            for (a, b), (lora_a, lora_b) in zip(params, split(tensors[f"{key}.lora_A.weight"],
                                                              tensors[f"{key}.lora_B.weight"], len(params))):
                a.copy_(lora_a.t())
                b.copy_(lora_b.t())
        for name in getattr(model, "_lora_additional", []):
            for pname, param in model.get_submodule(name).named_parameters():
                param.copy_(_hf_layout(family, f"{name}.{pname}",
                                       tensors[f"{PEFT_PREFIX}{family.to_hf(name)}.{pname}"]))
    return list(lora_modules(model))
