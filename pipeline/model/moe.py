"""The router's load-balancing loss of sparse MoE blocks (Switch Transformer's, as transformers computes it).

LLaMA-Factory's moe_aux_loss_coef (model/model_utils/moe.py, configure_moe) sets a Qwen3-MoE config's
output_router_logits and router_aux_loss_coef; Qwen3MoeForCausalLM.forward then adds router_aux_loss_coef x
load_balancing_loss_func(router logits of every sparse block, num_experts, num_experts_per_tok, attention_mask)
to the cross-entropy. The blocks keep their router logits only while collect_router_logits is on
(pipeline.model.gpt.SparseMoeBlock): nothing is held otherwise. And what ZeRO 1-2 and 3 need of the sparse blocks.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from torch import nn

from pipeline.model.gpt import SparseMoeBlock


def sparse_blocks(model: nn.Module) -> Iterator[SparseMoeBlock]:
    return (m for m in model.modules() if isinstance(m, SparseMoeBlock))


def collect_router_logits(model: nn.Module, on: bool = True) -> None:
    """Whether each sparse block keeps its last forward's router logits (with their graph) for the aux loss."""
    for block in sparse_blocks(model):
        block.keep_router_logits, block.router_logits = on, None


def release_router_logits(model: nn.Module) -> None:
    """Drop the router logits the sparse blocks hold after a backward. Under activation checkpointing the backward
    recomputes each block's forward, which stores its router logits again, with a graph that holds the block's input
    (tokens x hidden per sparse block): kept until the next forward replaced them, for nothing."""
    for block in sparse_blocks(model):
        block.router_logits = None


def load_balancing_loss(model: nn.Module, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """transformers 5.24's load_balancing_loss_func (models/qwen3_moe/modeling_qwen3_moe.py:495-555), re-typed over
    the router logits the last forward left in the model's sparse blocks (layer order): per expert, the share of
    top-k assignments f_e and the mean router probability P_e over the real tokens (attention_mask 1; padded
    positions count nothing; all positions without a mask), loss = n_experts x sum_e f_e P_e, both sums taken over
    every layer together. A 2-D mask with values other than 0 / 1 weights tokens by them, as transformers' does.
    The blocks' logits are consumed (set to None)."""
    blocks = list(sparse_blocks(model))
    logits = [b.router_logits for b in blocks if b.router_logits is not None]
    for block in blocks:  # read once: the next forward's replace them, and their graph is freed with the loss's
        block.router_logits = None
    if not logits:
        raise ValueError("no router logits: collect_router_logits(model) before the forward")
    n_experts, top_k = logits[0].shape[-1], blocks[0].top_k
    device = logits[0].device
    counts = torch.zeros(n_experts, dtype=torch.float32, device=device)
    probs = torch.zeros(n_experts, dtype=torch.float32, device=device)
    rows: torch.Tensor | float = 0.0
    mask = None if attention_mask is None else attention_mask.reshape(-1).to(device=device, dtype=torch.float32)
    for layer in logits:
        routing = torch.softmax(layer, dim=-1)
        _, chosen = torch.topk(routing, top_k, dim=-1)
        if mask is None:
            counts = counts + torch.zeros_like(counts).scatter_add_(
                0, chosen.reshape(-1), torch.ones(chosen.numel(), device=device))
            probs = probs + routing.float().sum(dim=0)
            rows = rows + routing.shape[0]
        else:
            counts = counts + torch.zeros_like(counts).scatter_add_(0, chosen.reshape(-1), mask.repeat_interleave(top_k))
            probs = probs + (routing.float() * mask.unsqueeze(-1)).sum(dim=0)
            rows = rows + mask.sum()
    return torch.sum((counts / rows) * (probs / rows)) * n_experts


def zero_stage_policy(model: nn.Module, ds_config: Mapping[str, Any]) -> list[type]:
    """What the ZeRO stage of `ds_config` needs of `model`'s sparse blocks, set on them; returns the module classes
    DeepSpeed must treat as ZeRO-3 leaves (deepspeed_compat.z3_leaf_modules marks them; [] but under ZeRO 3 with
    sparse blocks).

    ZeRO 3: each sparse block is a leaf, as LLaMA-Factory's add_z3_leaf_module sets Qwen3MoeSparseMoeBlock, so that
    its parameters are gathered for the whole block at once. Without it ZeRO 3 gathers each expert when the expert
    runs, a collective every rank must join, and a rank none of whose tokens chose that expert never calls it: gloo
    fails on the mismatched collectives, NCCL waits for ever.
    ZeRO 1-2: every expert runs (SparseMoeBlock.every_expert), on no rows where it got no token. Their gradient
    hooks fill reduction buckets as gradients arrive, so an expert with tokens on one rank and none on another
    leaves the ranks reducing different buckets (DeepSpeed's reduce_ipg_grads failed on two ranks, measured). Its
    zero gradient changes nothing: the flat partition steps a missing gradient as zeros too. ZeRO 0 needs neither:
    DeepSpeed's allreduce zero-fills missing gradients, and one rank skips them as transformers' experts do."""
    stage = dict(dict(ds_config).get("zero_optimization") or {}).get("stage")
    blocks = list(sparse_blocks(model))
    for block in blocks:
        block.every_expert = stage in (1, 2)
    return [SparseMoeBlock] if stage == 3 and blocks else []
