"""Cross-entropy of the output head over row blocks, without the full (positions x vocab) fp32 logits.

Why: with a frozen head (LoRA, freeze-tuning) the plain path materialises the logits in fp32 for the
loss and a gradient of the same size, and spends ~16% of a packed LoRA step in those memory-bound passes
(bench/README.md, dense step profile). Here each block of rows gets its logits, log-sum-exp, loss and
the gradient with respect to the hidden states at once, in the forward (the loss is the last op, so its
gradient is known up to the incoming scale); only a (rows x hidden) gradient is kept for the backward.
Same value as F.cross_entropy over the full logits, to float rounding (tests/model/test_head_loss.py).

Label smoothing (label_smoothing_factor, eps) is transformers' LabelSmoother per token: (1 - eps) x the target's
-log p + eps x the mean of -log p over the vocabulary, which is log-sum-exp minus the mean logit, so a block needs
one more reduction (its mean logit) and the gradient one more subtraction (softmax - (1 - eps) one-hot - eps / V).
The plain path is F.cross_entropy(label_smoothing=eps), the same formula.

LLaMA-Factory's sft losses use_dft_loss and use_eaft_loss (its compute_loss_func) multiply each token's
cross-entropy by a weight taken without gradient (TokenWeight), so in a block the loss and the logit gradient rows
are scaled by it: DFT's weight is the target's probability exp(-CE), EAFT's (H / 3) ** eaft_alpha with H the entropy
of the softmax over the row's 20 largest logits (taken from the block's logits before they are overwritten).

Gemma 2's final_logit_softcapping (SoftcappedHead: cap x tanh(logits / cap), in the logits' dtype, as
Gemma2ForCausalLM.forward caps them) is applied to each block's logits the same way, before the fp32 cast, so a
block's values are the head's own; the logit gradient then passes through the cap's derivative, 1 - (capped / cap)^2.
Why here, once: every loss that reads token log-probabilities (sft / pt, the preference and PPO stages through
reduction="none", evaluation) comes through these functions, and Gemma 2's 256,000-wide vocabulary is the last
place to lose the row blocks (bench/softcap_head_memory.py: the measured saving).

Used only where that is exact and safe: grad enabled, the head a bias-free nn.Linear (or SoftcappedHead) whose weight is
frozen and not partitioned (ZeRO-3 gathers weights through module hooks, which this bypasses), hidden
states in the weight's dtype, bf16 or fp32, no autocast. fp16 keeps the plain path: there the loss scale
must multiply the logit gradient before its cast to fp16, or small probabilities underflow.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.model.kernels import Linear

CHUNK_ROWS = 128  # fastest on the benchmark's CPU among 64-1024; 128 x 50257 fp32 logits = 26 MB
_PLAIN = contextvars.ContextVar("plain_head", default=False)
EAFT_TOP_K = 20  # LLaMA-Factory's _eaft_cross_entropy: the entropy of the softmax over the 20 largest logits ...
EAFT_SCALE = 3.0  # ... divided by 3 (about ln 20, the largest such entropy), then raised to eaft_alpha


@dataclass(frozen=True)
class TokenWeight:
    """LLaMA-Factory's weighted sft cross-entropy (trainer_utils._dft_cross_entropy / _eaft_cross_entropy): each
    labelled token's loss is its cross-entropy times a weight computed without gradient, so the weight scales the
    token's gradient and is not differentiated. kind "dft" (use_dft_loss): the target's probability exp(-CE).
    kind "eaft" (use_eaft_loss): (H / 3) ** alpha (eaft_alpha), H the entropy of the softmax over the row's 20
    largest logits (fp32)."""

    kind: str
    alpha: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("dft", "eaft"):
            raise ValueError(f"TokenWeight kind must be 'dft' or 'eaft', got {self.kind!r}")

    def statistic(self, logits: torch.Tensor) -> torch.Tensor | None:
        """What the weight needs of rows of fp32 logits (N, V) before they are overwritten: EAFT's largest ones."""
        if self.kind == "dft":
            return None
        return logits.topk(min(EAFT_TOP_K, logits.shape[1]), dim=1).values

    def weights(self, statistic: torch.Tensor | None, losses: torch.Tensor) -> torch.Tensor:
        """Weights (N, 1) of rows whose cross-entropies are losses (N, 1), from statistic(their logits)."""
        with torch.no_grad():
            if statistic is None:
                return torch.exp(-losses)
            log_p = statistic - statistic.logsumexp(dim=1, keepdim=True)
            entropy = -(log_p.exp() * log_p).sum(dim=1, keepdim=True)
            return (entropy / EAFT_SCALE).pow(self.alpha)


class SoftcappedHead(Linear):
    """The LM head with Gemma 2's final_logit_softcapping: cap * tanh(logits / cap) in the logits' dtype
    (Gemma2ForCausalLM.forward). The row blocks below apply the same cap (`softcap`); its weight is lm_head.weight as
    in transformers."""

    def __init__(self, in_features: int, out_features: int, cap: float):
        super().__init__(in_features, out_features, bias=False)
        self.cap = cap

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return softcap(super().forward(x), self.cap)


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(logits / cap) in the logits' dtype (Gemma2ForCausalLM.forward's three ops); None: unchanged."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


@contextlib.contextmanager
def plain_head() -> Iterator[None]:
    """Inside, every head takes the plain path (full logits, F.cross_entropy). Why: a frozen copy that must give
    bitwise the values of a model whose head trains (DPO's reference of a full fine-tuning run, whose first step
    is then exactly ln 2) has to compute them the way that model does; the row blocks round differently."""
    token = _PLAIN.set(True)
    try:
        yield
    finally:
        _PLAIN.reset(token)


def fused_applies(head: nn.Module, hidden: torch.Tensor) -> bool:
    return (torch.is_grad_enabled() and hidden.requires_grad and chunkable(head, hidden))


def chunkable(head: nn.Module, hidden: torch.Tensor) -> bool:
    """The head is a frozen, unpartitioned bias-free Linear in the hidden states' dtype (bf16/fp32), no autocast."""
    return direct_weight(head, hidden) and not head.weight.requires_grad


def direct_weight(head: nn.Module, hidden: torch.Tensor) -> bool:
    """hidden @ head.weight.T is exactly head(hidden) (capped by `softcap` for a SoftcappedHead): a bias-free,
    unpartitioned Linear (not a LoRA wrapper) in
    the hidden states' dtype (bf16/fp32), no autocast. Without gradients (evaluation) that is all row blocks need."""
    weight = getattr(head, "weight", None)
    return (not _PLAIN.get() and type(head) in (nn.Linear, Linear, SoftcappedHead) and head.bias is None
            and weight is not None and not hasattr(weight, "ds_id")
            and hidden.dtype == weight.dtype and hidden.dtype in (torch.bfloat16, torch.float32)
            and not torch.is_autocast_enabled(hidden.device.type))


def head_cross_entropy_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                           smoothing: float = 0.0, token_weight: TokenWeight | None = None) -> torch.Tensor:
    """Summed cross-entropy of head(hidden) (N, V) against targets (N,), in fp32, label-smoothed by `smoothing`,
    each token's weighted by `token_weight`."""
    if fused_applies(head, hidden):
        return _ChunkedHeadCrossEntropy.apply(hidden, head.weight, targets, smoothing, token_weight, _cap(head)).sum()
    return _plain_losses(head(hidden).float(), targets, smoothing, token_weight).sum()


def _plain_losses(logits: torch.Tensor, targets: torch.Tensor, smoothing: float,
                  token_weight: TokenWeight | None) -> torch.Tensor:
    """Per-token losses (N,) from the full fp32 logits (N, V): F.cross_entropy, times `token_weight`'s weights."""
    losses = F.cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing)
    if token_weight is None:
        return losses
    statistic = token_weight.statistic(logits.detach())
    return losses * token_weight.weights(statistic, losses.detach()[:, None]).squeeze(1)


def head_cross_entropy_tokens(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy (N,) in fp32 = minus the log-probabilities of the targets (preference losses).

    A frozen head takes the row-block path with or without gradients, so a policy forward and a no-grad
    reference forward of the same weights give bitwise-equal values (DPO's first step is exactly ln 2).
    """
    if chunkable(head, hidden):
        if torch.is_grad_enabled() and hidden.requires_grad:
            return _ChunkedHeadCrossEntropy.apply(hidden, head.weight, targets, 0.0, None, _cap(head))
        return _chunked_tokens(hidden, head.weight, targets, None, cap=_cap(head))
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


@torch.no_grad()
def head_cross_entropy_sum_argmax(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                                  smoothing: float = 0.0,
                                  token_weight: TokenWeight | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Evaluation with compute_accuracy: the summed (label-smoothed by `smoothing`, weighted by `token_weight`)
    cross-entropy of head(hidden) (N, V) against targets (N,) and each row's argmax token (N,), without gradients.

    The argmax is all that accuracy needs of the logits (LLaMA-Factory's eval_logit_processor keeps it alone for
    the same reason: memory). Where the weight can be used directly, both come from row blocks, so the (N x V)
    fp32 logits never exist at once; otherwise (a LoRA-wrapped or ZeRO-3-partitioned head) from one call of the
    head, as the evaluation without accuracy computes the loss. torch.argmax keeps the first of equal maxima, as
    LLaMA-Factory's does.
    """
    if direct_weight(head, hidden):
        predicted = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
        losses = _chunked_tokens(hidden, head.weight, targets, None, predicted, smoothing, token_weight, _cap(head))
        return losses.sum(), predicted
    logits = head(hidden).float()
    return _plain_losses(logits, targets, smoothing, token_weight).sum(), logits.argmax(dim=-1)


def _cap(head: nn.Module) -> float | None:
    """The head's final logit softcap (SoftcappedHead.cap), None for a plain Linear."""
    return head.cap if isinstance(head, SoftcappedHead) else None


def _chunked_tokens(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    grad_hidden: torch.Tensor | None, predicted: torch.Tensor | None = None,
                    smoothing: float = 0.0, token_weight: TokenWeight | None = None,
                    cap: float | None = None) -> torch.Tensor:
    """Per-token losses by row blocks, label-smoothed by `smoothing` and weighted by `token_weight`, of the logits
    softcapped by `cap`; fills grad_hidden (d loss_i / d hidden_i) and predicted (each row's argmax) when given."""
    losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], CHUNK_ROWS):
        rows = slice(start, start + CHUNK_ROWS)
        # the same bf16 matmul (and cap) as head(hidden), then fp32
        logits = softcap(hidden[rows] @ weight.T, cap).float()
        # the cap's derivative 1 - tanh^2, from the capped values, before the in-place passes below overwrite them
        cap_slope = None if cap is None or grad_hidden is None else (logits / cap).square_().neg_().add_(1.0)
        if predicted is not None:  # before the shift below: subtracting the maximum can round others up to it
            predicted[rows] = logits.argmax(dim=1)
        target = targets[rows]
        target_logit = logits.gather(1, target[:, None])
        shift = logits.amax(dim=1, keepdim=True)
        statistic = token_weight.statistic(logits) if token_weight is not None else None  # before the in-place passes
        shifted = logits.sub_(shift)
        mean_shifted = shifted.mean(dim=1, keepdim=True) if smoothing else None
        exp = shifted.exp_()  # in place: one fp32 block, five passes over it in all (six with smoothing)
        norm = exp.sum(dim=1, keepdim=True)
        loss = norm.log() + shift - target_logit  # log-sum-exp minus the target's logit
        if smoothing:  # mean over the vocabulary of -log p: log-sum-exp minus the mean logit (both less the shift)
            loss = (1.0 - smoothing) * loss + smoothing * (norm.log() - mean_shifted)
        scale = token_weight.weights(statistic, loss) if token_weight is not None else None
        losses[rows] = (loss if scale is None else loss * scale).squeeze(1)
        if grad_hidden is not None:
            grad_logits = exp.div_(norm)  # softmax ...
            grad_logits[torch.arange(target.numel(), device=target.device), target] -= 1.0 - smoothing  # ... - one-hot
            if smoothing:
                grad_logits.sub_(smoothing / grad_logits.shape[1])  # ... minus the uniform target's share
            if scale is not None:
                grad_logits.mul_(scale)  # ... times the token's weight, itself not differentiated
            if cap_slope is not None:
                grad_logits.mul_(cap_slope)  # ... through the cap, to the head's own logits
            grad_hidden[rows] = grad_logits.to(weight.dtype) @ weight
    return losses


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """Per-token losses (N,); the gradient of each with respect to its hidden row is computed in the forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                smoothing: float = 0.0, token_weight: TokenWeight | None = None,
                cap: float | None = None) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        losses = _chunked_tokens(hidden, weight, targets, grad_hidden, smoothing=smoothing, token_weight=token_weight,
                                 cap=cap)
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden.float() * grad_losses[:, None]).to(grad_hidden.dtype), None, None, None, None, None
