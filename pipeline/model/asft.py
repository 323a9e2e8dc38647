"""LLaMA-Factory's ASFT loss (use_asft_loss, asft_alpha): DFT plus asft_alpha x a KL divergence from a reference.

LLaMA-Factory 0.9.5's trainer_utils.asft_loss_func (the same on its main branch): over the positions whose shifted
label is not ignored, the DFT loss (each token's cross-entropy times the target's probability exp(-CE), taken
without gradient; the mean over those tokens) plus asft_alpha x the mean over the same tokens of
KL(reference || policy) = sum_v q_v (log q_v - log p_v), q the reference's softmax, p the policy's. Both means are
over one micro-batch's labelled tokens: its compute_loss calls the loss without num_items_in_batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def asft_loss(policy_logits: torch.Tensor, reference_logits: torch.Tensor, targets: torch.Tensor,
              alpha: float) -> torch.Tensor:
    """The ASFT loss of rows of logits (N, V) at the N labelled positions, against their targets (N,): the DFT
    loss's mean plus alpha x the mean token-wise KL(reference || policy), all in fp32; 0 with no labelled token."""
    if targets.numel() == 0:
        return policy_logits.sum() * 0.0  # keeps the graph: every rank runs the backward
    log_p = F.log_softmax(policy_logits.float(), dim=-1)
    losses = -log_p.gather(1, targets[:, None]).squeeze(1)
    dft = (losses * torch.exp(-losses.detach())).mean()
    q = F.softmax(reference_logits.float(), dim=-1)
    kl = F.kl_div(log_p, q, reduction="none").sum(dim=-1).mean()
    return dft + alpha * kl
