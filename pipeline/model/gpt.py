"""The book's GPT model in one file (cf. nanoGPT's model.py), laid out so that real GPT-2 weights load 1:1.

Class names follow the book (GPTModel, TransformerBlock, MultiHeadAttention, FeedForward, LayerNorm,
GELU); attribute names follow Hugging Face's GPT-2, so a parameter path here is the HF path without
its `transformer.` prefix:

    book                          here (== HF GPT-2)
    tok_emb, pos_emb, drop_emb    wte, wpe, drop
    trf_blocks[i]                 h[i]
      norm1 / norm2               h.i.ln_1 / h.i.ln_2          (LayerNorm scale/shift -> weight/bias)
      att.W_query/W_key/W_value   h.i.attn.c_attn             (one fused Linear emb -> 3*emb, q|k|v)
      att.out_proj                h.i.attn.c_proj
      ff.layers[0] / [2]          h.i.mlp.c_fc / h.i.mlp.c_proj
    final_norm, out_head          ln_f, lm_head

Weights are stored as nn.Linear (out x in); HF's Conv1D stores the transpose, which weights.py
handles on load/save. LoRA targets and PEFT exports therefore use HF's module names directly.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.model.attention import Varlen, attend, packed_attention, segment_mask  # noqa: F401 (re-export)
from pipeline.model.config import GPTConfig
from pipeline.model.head_loss import head_cross_entropy_sum, head_cross_entropy_tokens

IGNORE_INDEX = -100
KV = tuple[torch.Tensor, torch.Tensor]  # per layer: keys and values, each (B, n_heads, T_past, head_dim)


class LayerNorm(nn.Module):
    """The book's LayerNorm (biased variance, eps 1e-5); its scale/shift are named weight/bias as in HF.

    F.layer_norm computes exactly (x - mean) / sqrt(var + eps) * weight + bias, fused.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(emb_dim))
        self.bias = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class GELU(nn.Module):
    """GPT-2's GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) as in the book,
    computed by torch's fused kernel (HF calls it gelu_new)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """emb -> 4 emb -> GELU -> emb (the book's ff.layers, named c_fc / c_proj like GPT-2)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, cfg.hidden_dim)
        self.act = GELU()
        self.c_proj = nn.Linear(cfg.hidden_dim, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(self.act(self.c_fc(x))))


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention with one fused q|k|v projection and torch's SDPA kernel.

    No T x T mask buffer: causality comes from `is_causal`, or from an explicit boolean mask when
    padding must be hidden or a KV cache shifts the query positions.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.drop_rate = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | Varlen | None, past: KV | None) -> tuple[torch.Tensor, KV]:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = attend(q, k, v, mask, is_causal=mask is None and past is None,
                   dropout_p=self.drop_rate if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.c_proj(y)), (k, v)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + attn(ln_1(x)), then x + mlp(ln_2(x)) (the book's shortcut connections)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.emb_dim, cfg.layer_norm_eps)
        self.attn = MultiHeadAttention(cfg)
        self.ln_2 = LayerNorm(cfg.emb_dim, cfg.layer_norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, past: KV | None) -> tuple[torch.Tensor, KV]:
        a, kv = self.attn(self.ln_1(x), mask, past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPTModel(nn.Module):
    """Token + position embeddings, n_layers TransformerBlocks, final LayerNorm, output head."""

    def __init__(self, cfg: GPTConfig, seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        # _weight skips nn.Embedding's own normal_ init: init_weights does it (seeded), and on the meta
        # device (weights.py) that init would import torch._dynamo, costing seconds per process.
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim, _weight=torch.empty(cfg.vocab_size, cfg.emb_dim))
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim, _weight=torch.empty(cfg.context_length, cfg.emb_dim))
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layers))
        self.ln_f = LayerNorm(cfg.emb_dim, cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.gradient_checkpointing = False
        if seed is not None and self.wte.weight.device.type != "meta":
            self.init_weights(seed)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them (activation
        checkpointing per block): memory falls from O(layers x activations) to one block's, for about one
        extra forward. Only in training with grad enabled; results are the same either way (dropout
        replays its RNG state: torch's non-reentrant checkpoint preserves it)."""
        self.gradient_checkpointing = bool(enabled)

    def tie_weights(self) -> None:
        """Re-establish tying (after load_state_dict(assign=True) replaced the Parameter objects)."""
        if self.cfg.tie_weights:
            self.lm_head.weight = self.wte.weight

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """GPT-2's init: N(0, 0.02) for matrices and embeddings, residual projections N(0, 0.02/sqrt(2 n_layers)),
        zero biases, unit norms. A private generator makes it a pure function of the seed."""
        gen = torch.Generator(device=self.wte.weight.device).manual_seed(seed)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head and self.cfg.tie_weights:
                    continue
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith("c_proj") else 0.02
                nn.init.normal_(module.weight, 0.0, std, generator=gen)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_kv: list[KV] | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        segment_ids: torch.Tensor | None = None,
    ):
        """Logits (B, T, V); (logits, new_past_kv) with use_cache; with labels the loss instead.

        attention_mask (B, T_past + T) marks real tokens with 1. labels (B, T) are already shifted
        (labels[:, t] is the target after position t) with -100 where nothing is learned. With
        labels the output head runs only at the labelled positions (with short responses most
        positions are prompt or padding, and the V-wide head is the largest matmul), returning the
        mean cross-entropy, or (sum, count) with reduction="sum" for exact perplexity over batches.

        segment_ids (B, T) (packed rows, neat_packing): a token attends only to earlier tokens of its
        own segment (block-diagonal causal attention); the caller supplies position_ids that restart at
        0 in every segment. Then every packed example computes exactly what it would alone.
        """
        b, t = input_ids.shape
        past_len = past_kv[0][0].shape[2] if past_kv else 0
        if past_len + t > self.cfg.context_length and position_ids is None:
            raise ValueError(f"sequence of {past_len + t} tokens exceeds context_length {self.cfg.context_length}")
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + t, device=input_ids.device).unsqueeze(0)
        x = self.drop(self.wte(input_ids) + self.wpe(position_ids))
        if segment_ids is not None:
            if past_len:
                raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
            mask = packed_attention(segment_ids, x.dtype, self.cfg.drop_rate if self.training else 0.0)
        else:
            mask = _attention_mask(attention_mask, b, t, past_len, input_ids.device)
        new_kv: list[KV] = []
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and not use_cache
        for i, block in enumerate(self.h):
            if recompute:
                x, kv = checkpoint(block, x, mask, None, use_reentrant=False)
            else:
                x, kv = block(x, mask, past_kv[i] if past_kv else None)
            if use_cache:
                new_kv.append(kv)
        x = self.ln_f(x)
        if labels is not None:
            return self.loss(x, labels, reduction)
        logits = self.lm_head(x)
        return (logits, new_kv) if use_cache else logits

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"):
        """Cross-entropy with the head computed only where labels != -100 (same value as over full logits).

        reduction="none": per-token cross-entropy (B, T) in fp32, 0 where labels == -100 (a preference loss
        sums it per sequence into log-probabilities).
        """
        keep = labels != IGNORE_INDEX
        targets = labels[keep]
        if reduction == "none":
            per_token = head_cross_entropy_tokens(self.lm_head, hidden[keep], targets)
            return torch.zeros(labels.shape, dtype=per_token.dtype, device=labels.device).masked_scatter(keep, per_token)
        total = head_cross_entropy_sum(self.lm_head, hidden[keep], targets)  # chunked when the head is frozen
        count = targets.numel()
        if reduction == "sum":
            return total, count
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        return total / max(count, 1)


def _attention_mask(attention_mask: torch.Tensor | None, b: int, t: int, past_len: int,
                    device: torch.device) -> torch.Tensor | None:
    """None when `is_causal` suffices, else a (B, 1, T, T_past + T) boolean mask (True = may attend).

    Right padding (as in training batches) needs no mask: under causality a real token never sees
    the pads after it, so the fast causal kernel is kept. Left padding or a cache needs the explicit
    mask; every query may always see itself so that rows of pure padding stay finite.
    """
    if attention_mask is None or (past_len == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())):
        if past_len == 0 or t == 1:
            return None
        attention_mask = None
    total = past_len + t
    q_pos = torch.arange(past_len, total, device=device).view(t, 1)
    k_pos = torch.arange(total, device=device).view(1, total)
    causal = (k_pos <= q_pos).view(1, 1, t, total)
    if attention_mask is None:
        return causal
    keys = attention_mask.to(torch.bool).view(b, 1, 1, total)
    return causal & (keys | (k_pos == q_pos).view(1, 1, t, total))

