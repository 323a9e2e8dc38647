"""The book's GPT model grown into one decoder for GPT-2, Llama 3 and Qwen2/3 (cf. nanoGPT's model.py).

Family differences are ModelConfig fields, never family checks in this file:

    norm        LayerNorm (GPT-2) | RMSNorm (Llama, Qwen)
    positions   learned table (GPT-2) | RoPE with theta and scaling (linear, Llama 3.1's "llama3", YaRN, LongRoPE),
                on the first partial_rotary_factor of each head (Phi-4-mini, GLM-4), its pairs the two halves or
                adjacent dims (GLM-4's interleaved rotation: rope_interleaved)
    mlp         up -> GELU(tanh) -> down (GPT-2) | down(silu(gate) * up) (SwiGLU; gate and up one Linear: Phi-3's
                gate_up_proj) | down(gelu_tanh(gate) * up) (GeGLU, Gemma); n_experts: sparse MoE blocks (Qwen3-MoE,
                Mixtral: a router picks experts_per_token SwiGLU experts per token; Qwen2-MoE adds a gated shared
                expert)
    attention   n_heads, n_kv_heads (GQA / MQA), head_dim, q/k/v bias (GPT-2, Qwen2), output bias,
                per-head q/k RMSNorm (Qwen3) or over the whole projection (OLMo 2), one fused q|k|v Linear
                (GPT-2's c_attn) or three, RoPE on the two halves or on adjacent pairs (GLM), a sliding window per layer (Mistral v0.1, Qwen's use_sliding_window,
                Gemma 3: layer_windows), a score scale other than 1 / sqrt(head_dim) (Gemma's query_pre_attn_scalar,
                Granite's attention_multiplier), a RoPE base of the windowed layers' own
    GPT-OSS     a learned sink logit per head in the softmax (attention_sinks), a biased router (router_bias), the
                experts' clamped SwiGLU (swiglu_limit, swiglu_alpha)
    Gemma       RMSNorm x (1 + weight) in fp32, embeddings x sqrt(emb_dim), a norm on the attention and MLP outputs
                (sandwich_norms, GLM-4-0414's too),
                Gemma 2's tanh softcapping of the scores (the explicit attention path) and of the logits
    block       pre-norm (x + branch(norm(x))) | post_norm (OLMo 2: x + norm(branch(x))); each branch's output times
                residual_multiplier (Granite)
    head        tied to the token embedding or not; embeddings times embedding_multiplier, logits divided by
                logits_scaling (Granite)

Class names follow the book (GPTModel, TransformerBlock, MultiHeadAttention, FeedForward, LayerNorm,
GELU); module names follow Llama's HF names (embed_tokens, layers.i.self_attn.q_proj, ...), and
pipeline.model.families maps them to each family's HF names (GPT-2: wte, h.i.attn.c_attn, ...).
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.model.attention import Spec, attend, binds, packed_attention, segment_mask, windowed  # noqa: F401 (re-export)
from pipeline.model.config import ModelConfig, gated
from pipeline.model.head_loss import (SoftcappedHead, TokenWeight, head_cross_entropy_sum,  # noqa: F401 (re-export)
                                      head_cross_entropy_sum_argmax, head_cross_entropy_tokens)
from pipeline.model.kernels import Linear
from pipeline.model.kv_cache import KVCache, window_keys
from pipeline.model.neftune import neftune_noise
from pipeline.model.rope import (dynamic_length, latent_score_scale, longrope_long,  # noqa: F401 (re-export)
                                 rope_attention_factor, rope_inv_freq)

IGNORE_INDEX = -100
Rope = tuple[torch.Tensor, torch.Tensor]  # cos, sin: (B, 1, T, head_dim)


class LayerNorm(nn.Module):
    """The book's LayerNorm (biased variance); its scale/shift are named weight/bias as in HF.

    F.layer_norm computes exactly (x - mean) / sqrt(var + eps) * weight + bias, fused.
    """

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(emb_dim))
        self.bias = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back before the scale (as Llama's HF code).

    torch's rms_norm without a weight is that normalisation: it computes in fp32 for bf16/fp16 input and
    rounds once (bitwise HF's `(x.float() * rsqrt(...)).to(dtype)`, forward and backward, on the CPU). On
    CUDA it is one fused kernel where the spelled-out form is seven, with two dtype copies; Qwen3 runs it
    four times a layer (q and k norms included). The weight is applied after the cast, as HF does.

    unit_offset (Gemma3RMSNorm): the scale is (1 + weight), the weight stored 0-centred, and it is applied in fp32
    before the one cast back (Gemma rounds (x * (1 + w)), Llama x then x * w); scale_fp32 (GptOssRMSNorm): the weight
    applied in fp32 before that one cast too."""

    def __init__(self, dim: int, eps: float = 1e-6, unit_offset: bool = False, scale_fp32: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset, self.scale_fp32 = unit_offset, scale_fp32
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset or self.scale_fp32:
            scale = 1.0 + self.weight.float() if self.unit_offset else self.weight.float()
            return (F.rms_norm(x.float(), self.weight.shape, eps=self.eps) * scale).type_as(x)
        return self.weight * F.rms_norm(x, self.weight.shape, eps=self.eps)


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    return LayerNorm(dim, cfg.norm_eps) if cfg.norm == "layernorm" else RMSNorm(dim, cfg.norm_eps,
                                                                                cfg.norm_unit_offset,
                                                                                cfg.norm_scale_fp32)


class GELU(nn.Module):
    """GPT-2's GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) as in the book,
    computed by torch's fused kernel (HF calls it gelu_new)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """gelu: emb -> hidden -> GELU -> emb (the book's ff.layers); swiglu: down(silu(gate(x)) * up(x)); geglu (Gemma):
    down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, hidden_dim: int | None = None):
        super().__init__()
        self.swiglu = gated(cfg)  # the gated form (SwiGLU or GeGLU), named for the first
        hidden = hidden_dim or cfg.hidden_dim  # an expert's is moe_ffn_dim
        self.fused = cfg.mlp_fused
        if self.fused:  # Phi3MLP's gate_up_proj: the gate's rows, then up's
            self.gate_up_proj = Linear(cfg.emb_dim, 2 * hidden, bias=cfg.mlp_bias)
        elif self.swiglu:
            self.gate_proj = Linear(cfg.emb_dim, hidden, bias=cfg.mlp_bias)
        if not self.fused:
            self.up_proj = Linear(cfg.emb_dim, hidden, bias=cfg.mlp_bias)
        self.act = nn.SiLU() if cfg.mlp == "swiglu" else GELU()
        self.limit, self.alpha = cfg.swiglu_limit, cfg.swiglu_alpha  # GPT-OSS's clamped SwiGLU (limit None: plain)
        self.down_proj = Linear(hidden, cfg.emb_dim, bias=cfg.mlp_bias)
        self.drop = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            h = up * self.act(gate)
        elif self.limit is not None:  # GptOssExperts._apply_gate (modeling_gpt_oss.py:82-88)
            gate = self.gate_proj(x).clamp(max=self.limit)
            up = self.up_proj(x).clamp(min=-self.limit, max=self.limit)
            h = (up + 1) * (gate * torch.sigmoid(gate * self.alpha))
        else:
            h = self.act(self.gate_proj(x)) * self.up_proj(x) if self.swiglu else self.act(self.up_proj(x))
        return self.drop(self.down_proj(h))


def held_dtype(cfg: ModelConfig, name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype our tensor `name` is held in, in a model of `dtype`: fp32 where transformers' from_pretrained(dtype=)
    keeps the family's tensor fp32 (Family.held_fp32: GLM-4.5's and DeepSeek-V3's router weight and correction bias in
    bf16 and fp16), else `dtype`. Every load and cast of ours asks it (weights.load_model, adapter.cast_keeping_adapters)."""
    family = cfg.hf
    return torch.float32 if dtype != torch.float32 and family.held_fp32(family.to_hf(name), dtype) else dtype


class SparseMoeBlock(nn.Module):
    """Mixture of experts in place of one MLP (transformers' Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock,
    Qwen2MoeSparseMoeBlock): the router `gate` (a Linear, hidden -> n_experts, no bias) scores every expert per token;
    softmax in fp32, the experts_per_token highest kept (renormalised to sum 1 with norm_topk_prob: always on Mixtral),
    cast back to the logits' dtype (Qwen2 / Qwen3-MoE) or kept fp32 into the product (router_weights_fp32: Mixtral); each token's output is the sum of its experts' SwiGLU outputs times those weights, plus (Qwen2-MoE,
    shared_expert_dim) a shared expert's output times sigmoid(shared_expert_gate(x)).

    The experts are FeedForwards in a ModuleList (experts.{e}.gate_proj ...: the hub's per-expert names) run by a
    plain loop over the experts that received tokens: readable and exact, fine on a CPU and for small expert counts;
    a fused grouped GEMM (transformers' grouped_mm experts) is what a GPU at Qwen3-30B-A3B's 128 experts wants.
    keep_router_logits: the last forward's router logits stay in `router_logits` (N tokens x n_experts) for the
    load-balancing loss (pipeline.model.moe). every_expert: the experts without tokens run too, on no rows, where a
    backward follows (ZeRO 1-2 across ranks: pipeline.model.moe.zero_stage_policy)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.experts_per_token, cfg.norm_topk_prob
        self.router_weights_fp32 = cfg.router_weights_fp32
        self.gate = Linear(cfg.emb_dim, cfg.n_experts, bias=cfg.router_bias)  # GPT-OSS's router has a bias
        self.experts = nn.ModuleList(FeedForward(cfg, cfg.moe_ffn_dim) for _ in range(cfg.n_experts))
        if cfg.shared_expert_dim:  # Qwen2MoeSparseMoeBlock's shared expert and its gate (a Linear to 1)
            self.shared_expert = FeedForward(cfg, cfg.shared_expert_dim)
            if cfg.shared_expert_gated:
                self.shared_expert_gate = Linear(cfg.emb_dim, 1, bias=False)
        self.sigmoid = cfg.router_scoring == "sigmoid"
        self.n_group, self.topk_group, self.scaling = cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor
        if cfg.router_correction_bias:  # a buffer beside the router's weight, as Glm4MoeTopkRouter holds it
            self.gate.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_experts))
        self.keep_router_logits = self.every_expert = False
        self.router_logits: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        logits, weights, chosen = self.route(flat)
        self.router_logits = logits if self.keep_router_logits else None
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() or (self.every_expert and torch.is_grad_enabled()):  # no backward: no gradient
                # under autocast the expert computes in bf16 and the sum is the input's fp32 (Qwen3MoeExperts'
                # cast too)
                out.index_add_(0, token, (expert(flat[token]) * weights[token, slot, None]).to(out.dtype))
        if hasattr(self, "shared_expert_gate"):  # every token: sigmoid(shared_expert_gate(x)) * shared_expert(x)
            out = out + torch.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
        elif hasattr(self, "shared_expert"):  # GLM-4.5's shared_experts: added as they are
            out = out + self.shared_expert(flat)
        return out.view_as(x)

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(router logits, the chosen experts' weights, their indices) for rows (N, C). DeepSeek-V3's router casts
        its input and weight to fp32 (Glm4MoeTopkRouter.forward's F.linear(x.float(), weight.float()),
        modeling_glm4_moe.py:284): fp32 logits and weights in a bf16 model, bf16 ones under autocast."""
        if self.sigmoid:
            logits = F.linear(flat.float(), self.router_weight())
            weights, chosen = self._deepseek_route(logits)
        else:
            logits = self.gate(flat)
            weights, chosen = torch.topk(F.softmax(logits, dim=-1, dtype=torch.float), self.top_k, dim=-1)
            if self.norm_topk_prob:
                weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.router_weights_fp32:  # Qwen's routers cast them back; Mixtral's keep fp32 into the product
            weights = weights.to(logits.dtype)
        return logits, weights, chosen

    def router_weight(self) -> torch.Tensor:
        """The router's weight in fp32 for DeepSeek-V3's fp32 product. A router under LoRA (lora_target gate: an
        AdapterLinear around it, its Linear `.linear`) gives its base weight plus the update (merged_weight), as
        PEFT's ParamWrapper puts W + delta in the router's `weight` before Glm4MoeTopkRouter's fp32 F.linear."""
        gate = self.gate
        if not hasattr(gate, "linear"):
            return gate.weight.float()
        return gate.linear.weight.float() if gate.disabled else gate.merged_weight()

    def _deepseek_route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeepSeek-V3's choice (transformers 5.24 Glm4MoeTopkRouter.forward, modeling_glm4_moe.py:282-307), in the
        logits' dtype as there: scores sigmoid(logits); the choice reads scores + e_score_correction_bias, limited to
        the experts of the topk_group groups whose two best biased scores sum highest; the weights are the chosen
        experts' unbiased scores, renormalised (norm_topk_prob, + 1e-20 as there) and times routed_scaling_factor."""
        scores = torch.sigmoid(logits)
        bias = getattr(getattr(self.gate, "linear", self.gate), "e_score_correction_bias", None)  # on the Linear
        choice = scores if bias is None else scores + bias
        if self.n_group > 1:
            groups = choice.view(-1, self.n_group, choice.shape[-1] // self.n_group)
            best = torch.topk(groups.topk(2, dim=-1)[0].sum(dim=-1), self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros(groups.shape[:2], dtype=torch.bool, device=choice.device).scatter_(1, best, True)
            choice = groups.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(choice)
        chosen = torch.topk(choice, self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, chosen)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, chosen


# ---------------------------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------------------------

def rope_cos_sin(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype,
                 scale: float = 1.0, interleaved: bool = False) -> Rope:
    """cos and sin for exactly these positions (no table: a 131,072-token context costs nothing at load), times
    `scale` (YaRN's attention factor) in fp32 before the cast, as transformers' rotary embedding does. Each
    frequency covers the dims of its pair: j and j + d/2 (the halves), or with `interleaved` 2j and 2j + 1 (GLM's
    apply_rotary_pos_emb: cos[..., :d/2].repeat_interleave(2) of the same halves-layout table, the same values)."""
    freqs = position_ids[:, :, None].float() * inv_freq[None, None, :]
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * scale).to(dtype)[:, None], (emb.sin() * scale).to(dtype)[:, None]


def _rotate_half(x: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """(-x2, x1) for each pair (x1, x2): the halves (Llama's rotate_half) or adjacent dims (GLM's rotate_half,
    `torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)`)."""
    if interleaved:
        return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, rope: Rope, interleaved: bool = False) -> torch.Tensor:
    """HF's rotation: the first and second half of the rotated dims are the pairs, or with `interleaved` adjacent
    dims (GLM-4). cos / sin narrower than the head (partial_rotary_factor < 1: Phi-4-mini, GLM-4's 0.5) rotate its
    first dims and pass the rest, as transformers' Phi3 / Glm4 apply_rotary_pos_emb do."""
    cos, sin = rope
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        head, rest = x[..., :rot], x[..., rot:]
        return torch.cat([head * cos + _rotate_half(head, interleaved) * sin, rest], dim=-1)
    return x * cos + _rotate_half(x, interleaved) * sin


class MultiHeadAttention(nn.Module):
    """Causal self-attention with grouped key/value heads and torch's SDPA kernel.

    No T x T mask buffer: causality comes from `is_causal`, or from an explicit boolean mask when
    padding or packed segments must be hidden, a KV cache shifts the query positions or a sliding window
    (the block's, cfg.window) is shorter than the sequence. The cache
    holds the n_kv_heads keys/values, not their repeats (SDPA's enable_gqa shares them); `layer` is this
    attention's slot in it.
    """

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.split = (q, kv, kv)
        self.fused = cfg.qkv_fused
        if self.fused:
            self.qkv_proj = Linear(cfg.emb_dim, q + 2 * kv, bias=cfg.qkv_bias)
        else:
            self.q_proj = Linear(cfg.emb_dim, q, bias=cfg.qkv_bias)
            self.k_proj = Linear(cfg.emb_dim, kv, bias=cfg.qkv_bias)
            self.v_proj = Linear(cfg.emb_dim, kv, bias=cfg.qkv_bias)
        self.o_proj = Linear(q, cfg.emb_dim, bias=cfg.o_bias)
        self.rope_interleaved = cfg.rope_interleaved
        self.qk_norm, self.qk_norm_projection = cfg.qk_norm, cfg.qk_norm_projection
        if self.qk_norm:  # per head (Qwen3, Gemma 3), or over the whole q / k projection (OLMo 2's Olmo2Attention)
            self.q_norm = RMSNorm(q if self.qk_norm_projection else self.head_dim, cfg.norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(kv if self.qk_norm_projection else self.head_dim, cfg.norm_eps, cfg.norm_unit_offset)
        # every kernel (SDPA, the dense CPU path, varlen, the packed buckets) scales the scores by head_dim ** -0.5;
        # another scale (config.attention_scale: Gemma's query_pre_attn_scalar, Granite's attention_multiplier)
        # rescales q by the ratio first; none (no multiply) where the scale is the default, or where the softcapped
        # path (Gemma 2) multiplies the scores by the scale itself, as transformers' eager attention does
        self.softcap, self.scale = cfg.attn_logit_softcapping, cfg.attention_scale
        # GPT-OSS: a learned logit per head in each softmax's denominator (the explicit path, attention.attend)
        self.sinks = nn.Parameter(torch.zeros(self.n_heads)) if cfg.attention_sinks else None
        self.q_scale = 1.0 if cfg.default_attention_scale or cfg.explicit_attention else \
            self.scale * math.sqrt(self.head_dim)
        self.drop_rate = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)
        self.v_dim = self.head_dim

    def forward(self, x: torch.Tensor, mask: Spec, cache: KVCache | None, rope: Rope | None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v, fresh = self.attention_inputs(x, cache, rope)
        if self.q_scale != 1.0:
            q = q * self.q_scale
        y = attend(q, k, v, mask, is_causal=mask is None and fresh, dropout_p=self.drop_rate if self.training else 0.0,
                   softcap=self.softcap, scale=self.scale, sinks=self.sinks)
        if self.v_dim != self.head_dim:  # latent attention's values, padded to the head's width for the kernels
            y = y[..., :self.v_dim]
        y = y.transpose(1, 2).reshape(b, t, self.n_heads * self.v_dim)
        return self.resid_drop(self.o_proj(y))

    def attention_inputs(self, x: torch.Tensor, cache: KVCache | None, rope: Rope | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """q, the keys and values it attends to, and whether nothing came before these tokens: their own keys, or
        with a cache that holds earlier tokens the cache's (which this forward's keys and values join)."""
        q, k, v = self.project(x, rope)
        k, v, fresh = self.cached(cache, k, v)
        return q, k, v, fresh

    def cached(self, cache: KVCache | None, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """What this layer keeps per token (k, v: (B, heads, t, width)) put into the cache: a prompt (nothing cached
        before) attends to its own, contiguous, tensors, later tokens to every kept one (the cache's views)."""
        fresh = cache is None or cache.seen[self.layer] == 0
        if cache is not None:
            cached = cache.update(self.layer, k, v)
            if not fresh:
                k, v = cached
        return k, v, fresh

    def project(self, x: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, D), k and v (B, H_kv, T, D), rotated."""
        b, t, _ = x.shape
        if self.fused:
            q, k, v = self.qkv_proj(x).split(self.split, dim=2)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm_projection:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        if self.qk_norm and not self.qk_norm_projection:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, rope, self.rope_interleaved), apply_rope(k, rope, self.rope_interleaved)
        return q, k, v


LATENT_NORM_EPS = 1e-6  # DeepseekV3Attention's latent norms take DeepseekV3RMSNorm's default, not rms_norm_eps


class LatentAttention(MultiHeadAttention):
    """DeepSeek-V3's multi-head latent attention (transformers 5.24 DeepseekV3Attention, modeling_deepseek_v3.py:349-483):
    queries from a q_lora_rank latent (q_a_proj, its RMSNorm q_a_layernorm, q_b_proj) or one q_proj; keys and values
    from a kv_lora_rank latent (kv_a_proj_with_mqa, which also gives the one rotated key part all heads share,
    kv_a_layernorm, kv_b_proj). Each head: head_dim - qk_rope_head_dim unrotated dims, then qk_rope_head_dim rotated
    ones (adjacent pairs: rope_interleave). The values (v_head_dim) are padded with zeros to head_dim so every kernel
    and the cache see one width (transformers pads them so for flash attention), and the output cut back. The scores
    are scaled by head_dim ** -0.5 times YaRN's mscale(factor, mscale_all_dim) ** 2 (yarn_apply_mscale, :268-274).

    The KV cache holds what makes MLA worth it: per token the normalised kv latent (kv_lora_rank) and the one rotated
    key part (qk_rope_head_dim), 512 + 64 = 576 values a layer on DeepSeek-V3 where the expanded keys and values are
    128 heads x (192 + 128); each step expands the kept latents through kv_b_proj again, as transformers' cache and
    expand_kv do (:406-424, :457-460). The up-projections are not absorbed into the queries: the scores and values
    are the expanded ones, as transformers computes them."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        nn.Module.__init__(self)
        self.layer, self.n_heads, self.n_kv, self.head_dim = layer, cfg.n_heads, cfg.n_heads, cfg.head_dim
        self.rope_dim, self.v_dim, rank = cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        width = cfg.n_heads * cfg.head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.emb_dim, width, bias=False)
        else:
            self.q_a_proj = Linear(cfg.emb_dim, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(cfg.q_lora_rank, width, bias=False)
        self.kv_a_proj_with_mqa = Linear(cfg.emb_dim, rank + self.rope_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(rank, cfg.n_heads * (cfg.head_dim - self.rope_dim + self.v_dim), bias=False)
        self.o_proj = Linear(cfg.n_heads * self.v_dim, cfg.emb_dim, bias=False)
        self.rope_interleaved = cfg.rope_interleaved
        self.softcap, self.scale, self.sinks = None, cfg.attention_scale, None
        self.q_scale = latent_score_scale(cfg)
        self.drop_rate = cfg.drop_rate
        self.resid_drop = nn.Dropout(cfg.drop_rate)

    def attention_inputs(self, x: torch.Tensor, cache: KVCache | None, rope: Rope | None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        q, latent, k_rot = self.latents(x, rope)
        latent, k_rot, fresh = self.cached(cache, latent, k_rot)
        return (q, *self.expand(latent, k_rot), fresh)

    def project(self, x: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MultiHeadAttention.project's q, k, v without a cache (forward goes through attention_inputs)."""
        q, latent, k_rot = self.latents(x, rope)
        return (q, *self.expand(latent, k_rot))

    def latents(self, x: torch.Tensor, rope: Rope | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, H, T, head_dim), rotated; the normalised kv latent (B, 1, T, kv_lora_rank) and the rotated key part
        all heads share (B, 1, T, qk_rope_head_dim): what the cache keeps per token."""
        b, t, _ = x.shape
        q = self.q_proj(x) if hasattr(self, "q_proj") else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_pass, q_rot = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2).split(
            [self.head_dim - self.rope_dim, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_a_layernorm.weight.shape[0], self.rope_dim], dim=-1)
        k_rot = k_rot.view(b, 1, t, self.rope_dim)
        if rope is not None:
            q_rot, k_rot = apply_rope(q_rot, rope, self.rope_interleaved), apply_rope(k_rot, rope, self.rope_interleaved)
        return torch.cat([q_pass, q_rot], dim=-1), self.kv_a_layernorm(latent)[:, None], k_rot

    def expand(self, latent: torch.Tensor, k_rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's keys (its unrotated part from kv_b_proj, then the shared rotated part) and values, padded to
        head_dim, from the latents of (B, 1, T, ...)."""
        b, t = latent.shape[0], latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(b, t, self.n_heads, -1).transpose(1, 2)
        k_pass, v = kv.split([self.head_dim - self.rope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_pass, k_rot.expand(b, self.n_heads, t, self.rope_dim)], dim=-1)
        return k, F.pad(v, (0, self.head_dim - self.v_dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)) (the book's shortcut connections); with
    sandwich_norms (Gemma 2 / 3, GLM-4-0414) each branch's output is normalised too before it is added; post_norm (OLMo 2):
    x + norm1(attn(x)), then x + norm2(mlp(x)). Each branch's output times residual_multiplier (Granite) before its
    add. `window`: its attention's sliding window (GPTModel.forward hands it the mask of that window); `local_rope`:
    it rotates by the local RoPE (GPTModel.forward hands it those cos / sin)."""

    def __init__(self, cfg: ModelConfig, layer: int = 0):
        super().__init__()
        self.window = cfg.window(layer)
        self.local_rope = cfg.local_rope(layer)
        self.post_norm, self.residual_multiplier = cfg.post_norm, cfg.residual_multiplier
        if not self.post_norm:
            self.input_layernorm = make_norm(cfg, cfg.emb_dim)
        self.self_attn = MultiHeadAttention(cfg, layer) if cfg.kv_lora_rank is None else LatentAttention(cfg, layer)
        if cfg.sandwich_norms:
            self.attn_output_norm = make_norm(cfg, cfg.emb_dim)
        self.post_attention_layernorm = make_norm(cfg, cfg.emb_dim)  # post_norm: the attention branch's output norm
        self.mlp = SparseMoeBlock(cfg) if cfg.sparse(layer) else FeedForward(cfg)
        if cfg.sandwich_norms:
            self.mlp_output_norm = make_norm(cfg, cfg.emb_dim)
        if self.post_norm:
            self.post_feedforward_layernorm = make_norm(cfg, cfg.emb_dim)
        self.sandwich = cfg.sandwich_norms

    def _branch(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.residual_multiplier == 1.0 else y * self.residual_multiplier

    def forward(self, x: torch.Tensor, mask: Spec, cache: KVCache | None, rope: Rope | None) -> torch.Tensor:
        if self.post_norm:  # Olmo2DecoderLayer.forward
            x = x + self._branch(self.post_attention_layernorm(self.self_attn(x, mask, cache, rope)))
            return x + self._branch(self.post_feedforward_layernorm(self.mlp(x)))
        h = self.self_attn(self.input_layernorm(x), mask, cache, rope)
        x = x + self._branch(self.attn_output_norm(h) if self.sandwich else h)
        h = self.mlp(self.post_attention_layernorm(x))
        return x + self._branch(self.mlp_output_norm(h) if self.sandwich else h)


class GPTModel(nn.Module):
    """Token embeddings (+ learned positions), n_layers TransformerBlocks, final norm, output head: lm_head (vocab
    logits), or for a reward model (cfg.num_labels 1) transformers' `score` (hidden -> 1, no bias) in its place."""

    def __init__(self, cfg: ModelConfig, seed: int | None = 0):
        super().__init__()
        self.cfg = cfg
        # _weight skips nn.Embedding's own normal_ init: init_weights does it (seeded), and on the meta
        # device (weights.py) that init would import torch._dynamo, costing seconds per process.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.emb_dim, _weight=torch.empty(cfg.vocab_size, cfg.emb_dim))
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.context_length, cfg.emb_dim,
                                          _weight=torch.empty(cfg.context_length, cfg.emb_dim))
        self.drop = nn.Dropout(cfg.drop_rate)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i) for i in range(cfg.n_layers))
        self.norm = make_norm(cfg, cfg.emb_dim)
        if cfg.num_labels:  # XForSequenceClassification's head; no lm_head (the exported class has none)
            self.score = Linear(cfg.emb_dim, cfg.num_labels, bias=False)
            self.lm_head = None
        else:
            self.lm_head = SoftcappedHead(cfg.emb_dim, cfg.vocab_size, cfg.final_logit_softcapping) \
                if cfg.final_logit_softcapping else Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        self._inv_freq: torch.Tensor | None = None  # RoPE frequencies, made on first use on the model's device
        self._local_inv_freq: torch.Tensor | None = None  # those of the layers with local_rope (Gemma 3's local ones)
        self._rope_length = cfg.context_length  # the length they stand for (dynamic NTK: rope.dynamic_length; LongRoPE)
        self.gradient_checkpointing = False
        self.neftune_noise_alpha: float | None = None  # set_neftune: noisy embeddings in training forwards
        self.tie_weights()
        if seed is not None and self.embed_tokens.weight.device.type != "meta":
            self.init_weights(seed)

    def new_cache(self, capacity: int = 0) -> KVCache:
        """An empty KV cache for this model: `capacity` positions per layer (0: grown as needed); a layer with a
        sliding window keeps only the keys it can still see (KVCache windows), as transformers' sliding-window cache
        layers do."""
        return KVCache(len(self.layers), capacity, [blk.window for blk in self.layers])

    def tie_weights(self) -> None:
        """Re-establish tying (after load_state_dict(assign=True) replaced the Parameter objects)."""
        if self.cfg.tie_weights and self.lm_head is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block's activations in the backward instead of keeping them (activation
        checkpointing per block): memory falls from O(layers x activations) to one block's, for about one
        extra forward. Only in training with grad enabled; results are the same either way (dropout
        replays its RNG state: torch's non-reentrant checkpoint preserves it)."""
        self.gradient_checkpointing = bool(enabled)

    def set_neftune(self, alpha: float | None) -> None:
        """NEFTune (pipeline.model.neftune): noise of scale `alpha` on the token embeddings in training forwards
        (self.training), none in eval mode, so evaluation, generation and a reference pass in eval mode see the
        plain model. None or 0: off. Not part of the config: an exported model has no trace of it."""
        self.neftune_noise_alpha = alpha or None

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """GPT-2's init: N(0, 0.02) for matrices and embeddings, residual projections N(0, 0.02/sqrt(2 n_layers)),
        zero biases, unit norms. A private generator makes it a pure function of the seed."""
        gen = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module is self.lm_head and self.cfg.tie_weights:
                    continue
                residual = name.endswith(("o_proj", "down_proj"))
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if residual else 0.02
                nn.init.normal_(module.weight, 0.0, std, generator=gen)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (LayerNorm, RMSNorm)):
                (nn.init.zeros_ if getattr(module, "unit_offset", False) else nn.init.ones_)(module.weight)
                if isinstance(module, LayerNorm):
                    nn.init.zeros_(module.bias)

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype, local: bool = False) -> Rope | None:
        if self.cfg.positions != "rope":
            return None
        if local:  # rope_local_theta, no scaling (transformers' default rope type for Gemma 3's sliding layers)
            if self._local_inv_freq is None or self._local_inv_freq.device != position_ids.device:
                self._local_inv_freq = rope_inv_freq(self.cfg.replace(rope_theta=self.cfg.rope_local_theta,
                                                                      rope_scaling=None), position_ids.device)
            return rope_cos_sin(self._local_inv_freq, position_ids, dtype)
        if self.cfg.dynamic_rope:  # transformers' dynamic_rope_update: this forward's largest position may rescale
            length = dynamic_length(self._rope_length, int(position_ids.max()) + 1, self.cfg.context_length)
            if length != self._rope_length:
                self._inv_freq, self._rope_length = None, length
        elif dict(self.cfg.rope_scaling or {}).get("type") == "longrope":  # short or long factors, per forward
            length = int(position_ids.max()) + 1
            if longrope_long(self.cfg, length) != longrope_long(self.cfg, self._rope_length):
                self._inv_freq = None
            self._rope_length = length
        if self._inv_freq is None or self._inv_freq.device != position_ids.device:
            self._inv_freq = rope_inv_freq(self.cfg, position_ids.device, self._rope_length)
        return rope_cos_sin(self._inv_freq, position_ids, dtype, rope_attention_factor(self.cfg),
                            self.cfg.rope_interleaved)

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
        use_cache: bool = False,
        labels: torch.Tensor | None = None,
        reduction: str = "mean",
        last_only: bool = False,
        predict: bool = False,
        label_smoothing: float = 0.0,
        token_weight: TokenWeight | None = None,
    ) -> Any:
        """Logits (B, T, V); (logits, cache) with use_cache; with labels the loss instead. A reward model
        (cfg.num_labels) returns its score at every position (B, T, 1) (pipeline.model.reward pools them).

        past_kv: the KVCache of the tokens before these (updated in place: these tokens' keys and values are
        appended); with use_cache and no past_kv a new cache is made.

        last_only: logits (B, 1, V) of the last position only (transformers' logits_to_keep=1): decoding
        reads nothing else, and over a prompt the output head (up to 150k wide) would otherwise run at every
        position.

        attention_mask (B, T_past + T) marks real tokens with 1. segment_ids (B, T) packs several
        sequences in a row: a token attends only to earlier tokens of its own segment (block-diagonal
        causal mask; pass position_ids restarting at 0 per segment). A layer with a sliding window w
        (cfg.layer_windows) lets the query at index i of the row (or of the cache) see the
        keys i - w < j <= i only, as transformers' sliding_window_overlay counts them (its cache keeps only those:
        KVCache windows, new_cache); left padding shifts a row's
        indices alike, so a left-padded row sees what it sees alone. labels (B, T) are already shifted
        (labels[:, t] is the target after position t) with -100 where nothing is learned. With
        labels the output head runs only at the labelled positions, returning the mean
        cross-entropy, or (sum, count) with reduction="sum" for exact perplexity over batches; with predict
        (evaluation, reduction="sum") also the argmax token at each labelled position, (sum, count, predicted).
        label_smoothing (label_smoothing_factor, "mean" / "sum" only): each token's loss is transformers'
        LabelSmoother's, (1 - eps) cross-entropy + eps x the mean over the vocabulary of -log p.
        token_weight (use_dft_loss / use_eaft_loss, "mean" / "sum" only, not beside label_smoothing): each token's
        cross-entropy times LLaMA-Factory's DFT or EAFT weight (head_loss.TokenWeight).
        reduction="logits": the logits (N, V) at the N labelled positions, in labels[labels != -100] order (a loss
        over whole distributions, ASFT's KL: pipeline.model.asft), the head computed there only.
        """
        b, t = input_ids.shape
        cache = past_kv if past_kv is not None else self.new_cache() if use_cache else None
        past_len = cache.length if cache is not None else 0
        if past_len + t > self.cfg.context_length and position_ids is None and not self.cfg.dynamic_rope:
            raise ValueError(f"sequence of {past_len + t} tokens exceeds context_length {self.cfg.context_length}")
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + t, device=input_ids.device).unsqueeze(0)
        x = self.embed_tokens(input_ids)
        if self.cfg.scale_embeddings:  # Gemma3TextScaledWordEmbedding: sqrt(emb_dim) rounded to the dtype first
            x = x * torch.tensor(self.cfg.emb_dim ** 0.5, dtype=x.dtype)
        if self.training and self.neftune_noise_alpha:
            x = neftune_noise(x, self.neftune_noise_alpha)
        if self.cfg.embedding_multiplier != 1.0:  # Granite: after the embedding (and NEFTune's hook on its output)
            x = x * self.cfg.embedding_multiplier
        if self.cfg.positions == "learned":
            x = x + self.pos_embed(position_ids)
        x = self.drop(x)
        if segment_ids is not None:
            if past_len:
                raise ValueError("segment_ids (packed rows) cannot be combined with a KV cache")
            # softcapped attention (Gemma 2) is the explicit path: a boolean mask, not the packed kernels' specs
            mask = segment_mask(segment_ids) if self.cfg.explicit_attention else \
                packed_attention(segment_ids, x.dtype, self.cfg.drop_rate if self.training else 0.0,
                                 has_window=any(binds(w, t) for w in self.cfg.layer_windows))
        else:
            mask = _attention_mask(attention_mask, b, t, past_len, input_ids.device)
        # one spec per sliding window the layers have (None: full attention), shared by the layers with it; a layer
        # whose cache keeps only its window's keys (KVCache windows) gets the spec's columns of those keys
        windows = [blk.window for blk in self.layers]
        kept = cache.windows if cache is not None else (None,) * len(windows)
        masks = {w: windowed(mask, w, t, past_len + t, input_ids.device) for w in set(windows)}
        masks = {(w, c): _last_keys(masks[w], window_keys(c, past_len, t)) for w, c in set(zip(windows, kept))}
        ropes = {local: self._rope(position_ids.expand(b, t), x.dtype, local) for local in
                 {blk.local_rope for blk in self.layers}}
        recompute = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for block, c in zip(self.layers, kept):
            spec, rope = masks[block.window, c], ropes[block.local_rope]
            x = checkpoint(block, x, spec, None, rope, use_reentrant=False) if recompute else block(x, spec, cache, rope)
        x = self.norm(x)
        if self.lm_head is None:
            if labels is not None or use_cache:
                raise ValueError("a reward model (score head) has no token logits: no labels, no cache")
            return self.score(x)
        if self.cfg.logits_scaling != 1.0:  # Granite's logits / logits_scaling, as hidden / logits_scaling: the head
            x = x / self.cfg.logits_scaling  # has no bias, and the loss's chunked head then sees the same logits
        if labels is not None:
            return self.loss(x, labels, reduction, predict, label_smoothing, token_weight)
        logits = self.lm_head(x[:, -1:] if last_only else x)
        return (logits, cache) if use_cache else logits

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", predict: bool = False,
             label_smoothing: float = 0.0, token_weight: TokenWeight | None = None) -> Any:
        """Cross-entropy with the head computed only where labels != -100 (same value as over full logits).

        reduction="none": per-token cross-entropy (B, T) in fp32, 0 where labels == -100 (a preference loss
        sums it per sequence into log-probabilities). predict (reduction="sum", no gradients): (sum, count,
        predicted), predicted the argmax token at each labelled position in labels[labels != -100] order
        (compute_accuracy, pipeline.train.accuracy). label_smoothing, token_weight: see forward (not with
        reduction="none", whose per-token cross-entropy the preference losses read as log-probabilities).
        """
        if label_smoothing and token_weight is not None:  # LLaMA-Factory's compute_loss_func replaces the smoother
            raise ValueError("label_smoothing and token_weight are two losses: give one")
        keep = labels != IGNORE_INDEX
        if reduction == "logits":
            return self.lm_head(hidden[keep])
        targets = labels[keep]
        if predict:
            if reduction != "sum":
                raise ValueError(f"predict needs reduction='sum', got {reduction!r}")
            total, predicted = head_cross_entropy_sum_argmax(self.lm_head, hidden[keep], targets, label_smoothing,
                                                             token_weight)
            return total, targets.numel(), predicted
        if reduction == "none":
            if label_smoothing or token_weight is not None:
                raise ValueError("label_smoothing and token_weight need reduction='mean' or 'sum'")
            per_token = head_cross_entropy_tokens(self.lm_head, hidden[keep], targets)
            return torch.zeros(labels.shape, dtype=per_token.dtype, device=labels.device).masked_scatter(keep, per_token)
        total = head_cross_entropy_sum(self.lm_head, hidden[keep], targets, label_smoothing,
                                       token_weight)  # chunked: frozen head
        count = targets.numel()
        if reduction == "sum":
            return total, count
        if reduction != "mean":
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        return total / max(count, 1)


def _last_keys(spec: Spec, keys: int) -> Spec:
    """A dense mask's columns of the last `keys` keys (those a windowed layer's cache returns: every key before them
    is out of the window for each query of the forward); None and packed specs as they are."""
    if isinstance(spec, torch.Tensor) and spec.shape[-1] > keys:
        return spec[..., -keys:]
    return spec


def right_padded(attention_mask: torch.Tensor) -> bool:
    """Whether every row holds its real tokens first, then its pads (1s then 0s): under causality no real token then
    sees a pad, so the causal kernel needs no mask. A read of the tensor's values: on a device tensor a sync, so the
    training loop asks it of the host batch and leaves the mask out of what it moves to the device."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def _attention_mask(attention_mask: torch.Tensor | None, b: int, t: int, past_len: int,
                    device: torch.device) -> torch.Tensor | None:
    """None when `is_causal` suffices, else a (B, 1, T, T_past + T) boolean mask (True = may attend).

    Right padding (as in training batches) needs no mask: under causality a real token never sees
    the pads after it, so the fast causal kernel is kept. Left padding or a cache needs the explicit
    mask; every query may always see itself so that rows of pure padding stay finite.
    """
    if attention_mask is None or (past_len == 0 and right_padded(attention_mask)):
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
