"""OFT, orthogonal fine-tuning (Qiu et al. 2023; Liu et al. 2024, "OFTv2"), beside LoRA and in the same spirit:
OFTLayer, LinearWithOFT, replace_linear_with_oft, apply_oft.

Instead of adding a low-rank update to W, OFT turns the layer's input: linear(x R) = x (W R^T)^T, with R an
orthogonal (in x in) matrix, block diagonal (r blocks of oft_block_size). Each block is the Cayley transform of a
skew-symmetric matrix Q, stored as its upper triangle (block_size (block_size - 1) / 2 numbers a block): PEFT's
oft_R.weight, (r, n) here as in adapter_model.safetensors. Q starts at zero, so R = I and a fresh adapter leaves the
model as it was. Rotating keeps the angles between a layer's weight rows (its "hyperspherical energy").

What is computed is PEFT's OFT exactly as LLaMA-Factory 0.9.5 configures it (OFTConfig with r = oft_rank,
oft_block_size, module_dropout, target_modules from lora_target, and PEFT's defaults for the rest):

- the Cayley-Neumann approximation (use_cayley_neumann: true, num_cayley_neumann_terms: 5), no matrix inverse:
  R = I + 2Q + 2Q^2 + 2Q^3 + Q^4 with 5 terms (PEFT's OFTRotationModule._cayley_batch, term for term);
- either the number of blocks r or their size is given (the other 0, PEFT refuses both or neither); a size that does
  not divide in_features is moved to the nearest that does, as PEFT's adjust_oft_parameters moves it (with a notice,
  where PEFT warns), so a layer may have other blocks than the config says, and PEFT, loading the same config, makes
  the same choice;
- module_dropout is written to the config and does nothing: PEFT 0.21.2 builds a MultiplicativeDropoutLayer for it
  but its Linear forward never calls it, so LLaMA-Factory trains with module_dropout as if it were 0.
- the rotation runs in the adapter's dtype, the input cast to it and back (PEFT's cast_input_dtype).

Merging folds the rotation into the weight, W' = W R^T, block by block (PEFT's merge: oft_mat @ W^T, transposed).
PEFT's OFT takes nn.Linear only (its Conv1D is not supported), so GPT-2, whose projections are Conv1D in the
Hugging Face layout, cannot carry an OFT adapter PEFT loads: refused.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.model.config import OFT_NO_CONV1D, oft_blocks
from pipeline.model.families import Family
from pipeline.model.quantize import adapter_dtype
from pipeline.model.adapter import (AdapterLinear, adapter_targets, family_of_model, replace_linears, saved_modules,
                                    train_additional)
from pipeline.model.weights import note

NEUMANN_TERMS = 5  # PEFT's OFTConfig.num_cayley_neumann_terms default (use_cayley_neumann: true by default)
# the PEFT whose OFT this computes (its Cayley-Neumann changed in 0.18): adapter_config.json says so, as PEFT's own
# save_pretrained does, else PEFT warns on loading that the adapter may predate 0.18's parametrisation
PEFT_VERSION = "0.21.2"
# OFTConfig fields with a meaning this layer does not compute: an adapter that turns one on is refused
OFT_UNSUPPORTED = ("coft", "block_share")


def layer_blocks(in_features: int, rank: int, block_size: int) -> tuple[int, int]:
    """config.oft_blocks for one layer, with a notice when PEFT's adjustment moves the recipe's value."""
    blocks, size = oft_blocks(in_features, rank, block_size)
    given, name, got = (block_size, "oft_block_size", size) if rank == 0 else (rank, "oft_rank", blocks)
    if got != given:
        _say_once(f"notice: {name} {given} does not divide a layer's {in_features} inputs: {got} there (PEFT "
                  "adjusts it the same way, with a warning)")
    return blocks, size


@functools.cache
def _say_once(message: str) -> None:
    """One line per distinct adjustment, not one per layer (every block of a model has the same widths)."""
    note(message)


def cayley_neumann(q: torch.Tensor, terms: int) -> torch.Tensor:
    """PEFT's truncated Neumann series for the Cayley transform of the skew-symmetric blocks q (b, n, n):
    I + 2Q + 2Q^2 + ... + Q^last, accumulated in q's dtype in PEFT's order (bit for bit its _cayley_batch)."""
    r = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype).repeat(q.shape[0], 1, 1)
    if terms > 1:
        r.add_(q, alpha=2.0)
        if terms > 2:
            power = torch.bmm(q, q)
            r.add_(power, alpha=2.0)
            for _ in range(3, terms - 1):
                power = torch.bmm(power, q)
                r.add_(power, alpha=2.0)
            r.add_(torch.bmm(power, q))
    return r


class OFTLayer(nn.Module):
    """The block-diagonal rotation of a layer's input: `blocks` orthogonal (block_size x block_size) blocks, each
    the Cayley transform of a skew-symmetric matrix whose upper triangle is a row of `weight` (zero at the start)."""

    def __init__(self, in_dim: int, blocks: int, block_size: int, neumann_terms: int | None = NEUMANN_TERMS):
        super().__init__()
        self.in_dim, self.blocks, self.block_size, self.neumann_terms = in_dim, blocks, block_size, neumann_terms
        self.weight = nn.Parameter(torch.zeros(blocks, block_size * (block_size - 1) // 2))
        rows, cols = torch.triu_indices(block_size, block_size, 1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)

    def rotation(self, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks R (blocks x block_size x block_size) from `weight` (the parameter by default): Cayley-Neumann
        with neumann_terms, or the exact Cayley (I - Q)(I + Q)^-1 with None (PEFT's use_cayley_neumann: false)."""
        weight = self.weight if weight is None else weight
        q = weight.new_zeros(self.blocks, self.block_size, self.block_size)
        q[:, self.rows, self.cols] = weight
        q = q - q.transpose(-2, -1)
        if self.neumann_terms is not None:
            return cayley_neumann(q, self.neumann_terms)
        eye = torch.eye(self.block_size, device=q.device, dtype=q.dtype).expand_as(q)
        return torch.linalg.solve(eye + q, eye - q, left=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x R, block by block, in the adapter's dtype (PEFT casts the input to it and the result back)."""
        dtype = x.dtype
        x = x.to(self.weight.dtype)
        rotated = torch.einsum("...rk,rkc->...rc", x.reshape(*x.shape[:-1], self.blocks, self.block_size),
                               self.rotation())
        return rotated.reshape(x.shape).to(dtype)


class LinearWithOFT(AdapterLinear):
    """linear(oft(x)): the wrapped Linear keeps its weights (frozen by apply_oft); the input turns first."""

    peft_type = "OFT"
    method = "OFT"
    RECIPE_KEYS = {"r": "oft_rank", "oft_block_size": "oft_block_size"}

    def __init__(self, linear: nn.Linear, rank: int = 0, block_size: int = 32, module_dropout: float = 0.0,
                 neumann_terms: int | None = NEUMANN_TERMS):
        super().__init__(linear)
        self.rank, self.block_size, self.module_dropout = rank, block_size, module_dropout  # as configured
        blocks, size = layer_blocks(linear.in_features, rank, block_size)  # as this layer has them
        self.oft = OFTLayer(linear.in_features, blocks, size, neumann_terms)
        self.oft.to(device=linear.weight.device, dtype=adapter_dtype(linear))  # a quantized base: compute dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.linear(x)
        return self.linear(self.oft(x))

    def peft_config(self, family: Family) -> dict[str, Any]:
        terms = self.oft.neumann_terms
        return {"r": self.rank, "oft_block_size": self.block_size, "module_dropout": self.module_dropout,
                "fan_in_fan_out": False, "init_weights": True, "coft": False, "eps": 6e-05, "block_share": False,
                "use_cayley_neumann": terms is not None, "num_cayley_neumann_terms": terms or NEUMANN_TERMS,
                "peft_version": PEFT_VERSION}

    def merged_weight(self) -> torch.Tensor:
        """W R^T in fp32 (PEFT's merge, oft_mat @ W^T transposed), one block of columns at a time: the (in x in)
        block-diagonal matrix is never formed."""
        weight = self.linear.weight.float()
        rotation = self.oft.rotation(self.oft.weight.float())
        blocks = weight.reshape(weight.shape[0], self.oft.blocks, self.oft.block_size)
        return torch.einsum("obj,bij->obi", blocks, rotation).reshape(weight.shape)

    def peft_params(self) -> dict[str, tuple[nn.Parameter, bool]]:
        return {"oft_R.weight": (self.oft.weight, False)}

    def unchanged_by(self) -> str | None:
        """Q = 0 is the identity rotation."""
        return None if self.oft.weight.any() else "oft_R"


def replace_linear_with_oft(model: nn.Module, rank: int = 0, block_size: int = 32, *,
                            targets: set[str] | None = None, module_dropout: float = 0.0,
                            neumann_terms: int | None = NEUMANN_TERMS) -> list[str]:
    """replace_linear_with_lora's walk, wrapping each targeted Linear with LinearWithOFT."""
    return replace_linears(model, lambda linear: LinearWithOFT(linear, rank, block_size, module_dropout,
                                                               neumann_terms), targets)


def apply_oft(model: nn.Module, targets: str | Iterable[str] | None = "all", rank: int = 0, block_size: int = 32,
              module_dropout: float = 0.0, additional_targets: str | Iterable[str] | None = None,
              neumann_terms: int | None = NEUMANN_TERMS, blocks: Iterable[int] | None = None) -> list[str]:
    """Freeze the model and wrap the targeted Linears with OFT (the same targets, by the same rules, as apply_lora;
    additional_targets train in full; with `blocks`, use_llama_pro's, only the targets inside them); returns their
    paths."""
    refuse_conv1d(family_of_model(model))
    chosen, extra = adapter_targets(model, targets, additional_targets, blocks)
    model.requires_grad_(False)
    replaced = replace_linear_with_oft(model, rank, block_size, targets=set(chosen), module_dropout=module_dropout,
                                       neumann_terms=neumann_terms)
    train_additional(model, extra)
    return replaced


def refuse_conv1d(family: Family) -> None:
    """GPT-2's Hugging Face projections are Conv1D, which PEFT's OFT cannot wrap (OFT_NO_CONV1D); the recipe rule
    oft_needs_linear_layers says it first, this is the library's own guard."""
    if family.conv1d:
        raise UserError(f"finetuning_type: oft needs nn.Linear layers and {family.name}'s projections are Conv1D in "
                        f"the Hugging Face layout: {OFT_NO_CONV1D}; use finetuning_type: lora, or a Llama / Qwen model")


def apply_oft_config(model: nn.Module, targets: list[str], config: Mapping[str, Any]) -> list[str]:
    """apply_oft with a PEFT OFT adapter_config.json's settings (read_adapter_config checked them)."""
    terms = int(config.get("num_cayley_neumann_terms", NEUMANN_TERMS))
    return apply_oft(model, targets, rank=int(config["r"]), block_size=int(config["oft_block_size"]),
                     module_dropout=float(config.get("module_dropout") or 0.0),
                     additional_targets=saved_modules(model, config),
                     neumann_terms=terms if config.get("use_cayley_neumann", True) else None)


def oft_config_problems(config: Mapping[str, Any]) -> list[str]:
    """What in an OFT adapter_config.json this pipeline would compute differently from PEFT (or PEFT refuses)."""
    problems = [f"{key} is true; this pipeline computes OFT without it (PEFT's default false), so it would give "
                "another model than PEFT does" for key in OFT_UNSUPPORTED if config.get(key)]
    rank, size = config.get("r"), config.get("oft_block_size")
    if type(rank) is int and type(size) is int and (rank == 0) == (size == 0):
        problems.append(f"r is {rank} and oft_block_size is {size}; PEFT takes exactly one of them non-zero")
    terms = config.get("num_cayley_neumann_terms", NEUMANN_TERMS)
    if type(terms) is not int or terms < 1:
        problems.append(f"num_cayley_neumann_terms is {terms!r}; expected an integer >= 1")
    return problems
