"""Model shapes as data (LitGPT-style config and presets) and the torch-free facts derived from them.

`plan` imports this module to estimate memory, so nothing here may import torch. One ModelConfig
describes every supported family by fields (norm, positions, MLP, attention heads, biases, tying);
pipeline.model.families holds the per-family HF names. `layout(cfg)` is the single description of
which parameters a GPTModel has; parameter counts and LoRA target matching are computed from it, and
the tests check it against the real module tree of `pipeline.model.gpt.GPTModel`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from pipeline.errors import UserError, did_you_mean
from pipeline.names import split_names, trains_adapter
from pipeline.model.expert_lora import FUSED, PAIR, expert_of, router_of
from pipeline.model.families import FAMILIES, ROPE_TYPES, Family, hf_fields, HF_CONFIG, WRAPPERS, wrapped_family

FORMAT = "pipeline-gpt"  # the "format" value in the config.json of our own checkpoints
FORMAT_VERSION = 2       # 1: GPT-2 only, HF GPT-2 module names; 2: any family, our module names
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu", "geglu")


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer by fields; the defaults are GPT-2 small (the book's GPT_CONFIG_124M names)."""

    family: str = "gpt2"             # which HF names / config.json it maps to (pipeline.model.families)
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    n_kv_heads: int | None = None    # key/value heads (GQA; 1 = MQA); None = n_heads
    head_size: int | None = None     # explicit head width (Qwen3); None = emb_dim // n_heads
    drop_rate: float = 0.0
    norm: str = "layernorm"          # layernorm (weight + bias) | rmsnorm (weight only)
    norm_eps: float = 1e-5
    positions: str = "learned"       # learned table (GPT-2) | rope (rotary, computed per position: no table)
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None  # {"type": "linear" | "dynamic" | "llama3" | "yarn", "factor": ..}
    mlp: str = "gelu"                # gelu: up -> GELU(tanh) -> down | swiglu: down(silu(gate) * up) | geglu:
    #                                  down(gelu_tanh(gate) * up) (Gemma's gelu_pytorch_tanh)
    ffn_dim: int | None = None       # hidden width of the MLP; None means 4 * emb_dim (GPT-2)
    mlp_bias: bool = True
    qkv_bias: bool = True
    o_bias: bool = True              # bias of the attention output projection
    qk_norm: bool = False            # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    # the q / k norms over the whole projection (OLMo 2: q_norm of n_heads x head_dim, k_norm of kv_heads x head_dim,
    # before the split into heads) rather than over each head (Qwen3)
    qk_norm_projection: bool = False
    # where each block's norms sit: False, pre-norm (x + attn(norm(x)), the book's and every family's but one); True,
    # OLMo 2's post-branch norms (x + norm(attn(x)), then h + norm(mlp(h)): post_attention_layernorm and
    # post_feedforward_layernorm, no input_layernorm)
    post_norm: bool = False
    # Granite's four multipliers (GraniteConfig; 1 / None leave the model as every other family's): the token
    # embeddings times embedding_multiplier; attention scores times attention_multiplier instead of 1 / sqrt(head_dim)
    # (None); each branch's output times residual_multiplier before its residual add; the logits divided by
    # logits_scaling
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    qkv_fused: bool = True           # one q|k|v Linear (GPT-2's c_attn, Phi-3's qkv_proj: GQA sizes) or three
    mlp_fused: bool = False          # SwiGLU's gate and up as one Linear gate_up_proj (Phi-3: gate rows first) or two
    partial_rotary_factor: float = 1.0  # RoPE on the first int(head_dim x this) dims of each head (Phi-4-mini 0.75)
    rope_interleaved: bool = False   # RoPE's pairs are adjacent dims (2j, 2j+1) (GLM-4) or the two halves (Llama)
    tie_weights: bool = True
    num_labels: int = 0              # 0: the LM head lm_head; 1: a reward model, transformers' `score` head instead
    # each layer's sliding window, as transformers' "sliding_attention" layers have it (a query at position i sees the
    # keys i - window < j <= i), one entry per layer, None for a full-attention layer; () when no layer slides. The one
    # source of which layer has which window: pipeline.model.families reads it from config.json (Mistral's
    # sliding_window in every layer, Qwen2 / Qwen3 / Qwen3-MoE's use_sliding_window layers) and writes it back
    layer_windows: tuple[int | None, ...] = ()
    # sparse MoE MLP blocks (Qwen3-MoE, Qwen3MoeSparseMoeBlock): a router Linear `gate` scores n_experts SwiGLU
    # experts of width moe_ffn_dim per token; the experts_per_token best (softmax, then top-k; norm_topk_prob
    # renormalises their weights to sum 1) run and their outputs are summed by weight. 0: every MLP is dense.
    n_experts: int = 0
    experts_per_token: int = 0
    moe_ffn_dim: int | None = None
    norm_topk_prob: bool = False
    # the top-k routing weights stay fp32 (softmax's dtype) up to their product with each expert's output, which the
    # product then promotes (MixtralTopKRouter); False: cast to the router logits' dtype first (Qwen2 / Qwen3-MoE's
    # TopKRouter: router_top_value.to(router_logits.dtype)). One rounding apart in bf16
    router_weights_fp32: bool = False
    decoder_sparse_step: int = 1     # block i is sparse when (i + 1) % decoder_sparse_step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here (these keep a dense MLP of ffn_dim)
    router_aux_loss_coef: float = 0.001  # config.json's; kept for the export (training reads moe_aux_loss_coef)
    # Qwen2-MoE: each sparse block also runs a shared SwiGLU expert of this width on every token, its output scaled by
    # sigmoid(shared_expert_gate(x)) (a Linear to 1) and added to the routed experts'; None: no shared expert
    shared_expert_dim: int | None = None
    # DeepSeek-V3's router (GLM-4.5 / 4.6: Glm4MoeTopkRouter): router_scoring "sigmoid" scores each expert by
    # sigmoid(logit) instead of the softmax; router_correction_bias adds a learned per-expert bias (a buffer,
    # e_score_correction_bias: never trained by the optimizer) to the scores for choosing only, the weights being the
    # unbiased scores; n_group / topk_group: the experts split into n_group groups, each scored by its two best, and
    # only the topk_group best groups' experts may be chosen; routed_scaling_factor multiplies the (renormalised)
    # weights. shared_expert_gated: Qwen2-MoE's sigmoid(shared_expert_gate(x)) on the shared expert (GLM-4.5's
    # shared_experts are added ungated)
    router_scoring: str = "softmax"
    router_correction_bias: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    shared_expert_gated: bool = True
    # DeepSeek-V3's multi-head latent attention (DeepseekV3Attention; kv_lora_rank None: none): keys and values from a
    # kv_lora_rank latent (kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj), queries from a q_lora_rank latent (q_a_proj,
    # q_a_layernorm, q_b_proj; None: one q_proj); each head's head_dim = its unrotated dims + qk_rope_head_dim rotated
    # ones (the key's rotated dims one head shared by all), values v_head_dim wide
    q_lora_rank: int | None = None
    kv_lora_rank: int | None = None
    qk_rope_head_dim: int = 0
    v_head_dim: int | None = None
    # Gemma 3 (Gemma3ForCausalLM), one field per way its decoder differs from Llama's:
    norm_unit_offset: bool = False   # every RMSNorm computes in fp32 and scales by (1 + weight): weights stored 0-centred
    scale_embeddings: bool = False   # token embeddings times sqrt(emb_dim), that factor cast to their dtype first
    sandwich_norms: bool = False     # an RMSNorm on the attention output and on the MLP output, before each residual add
    #                                  (Gemma 2 / 3; GLM-4-0414's post_self_attn_layernorm / post_mlp_layernorm)
    attention_scores_scalar: float | None = None  # scores scaled by its ** -0.5 (query_pre_attn_scalar); None: head_dim
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers, unscaled (rope_local_base_freq);
    #                                        None: every layer rotates by rope_theta and rope_scaling
    attn_logit_softcapping: float | None = None   # Gemma 2: scores become cap * tanh(scores / cap) before the mask
    final_logit_softcapping: float | None = None  # Gemma 2: logits become cap * tanh(logits / cap)
    # the architecture wrapping this decoder in its checkpoint (pipeline.model.families.WRAPPERS: an image-text
    # model's language model, e.g. Gemma3ForConditionalGeneration); None: the family's causal LM class itself
    wrapper: str | None = None
    # GPT-OSS (GptOssForCausalLM), one field per way its decoder differs from Mixtral's:
    attention_sinks: bool = False    # a learned logit per head in each softmax's denominator (self_attn.sinks)
    norm_scale_fp32: bool = False    # RMSNorm scales by its weight in fp32 before the one cast back (GptOssRMSNorm)
    router_bias: bool = False        # the MoE router Linear has a bias (GptOssTopKRouter)
    # the experts' clamped SwiGLU: gate clamped above and up on both sides at swiglu_limit, then
    # (up + 1) * gate * sigmoid(swiglu_alpha * gate) (GptOssExperts._apply_gate); None: the plain SwiGLU
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers or ()))  # a JSON list read back
        problems = [f"{name} must be a positive integer, got {getattr(self, name)!r}"
                    for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
                    if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        for name in ("n_kv_heads", "head_size", "ffn_dim", "shared_expert_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name} must be a positive integer or null, got {value!r}")
        problems += self._normalise_windows()
        if not problems and self.head_size is None and self.emb_dim % self.n_heads:
            problems.append(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if not problems and self.n_heads % self.kv_heads:
            problems.append(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.kv_heads}")
        for name, allowed in (("family", tuple(FAMILIES)), ("norm", NORMS), ("positions", POSITIONS), ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                                f"{did_you_mean(str(getattr(self, name)), allowed)}")
        if self.wrapper is not None and (self.wrapper not in WRAPPERS or WRAPPERS[self.wrapper].family != self.family):
            problems.append(f"wrapper must be null or an architecture wrapping family {self.family!r}"
                            f" ({', '.join(w for w, row in WRAPPERS.items() if row.family == self.family) or 'none'}),"
                            f" got {self.wrapper!r}")
        if self.rope_scaling is not None and dict(self.rope_scaling).get("type") not in ROPE_TYPES:
            problems.append(f"rope_scaling type must be one of {', '.join(ROPE_TYPES)}, got {self.rope_scaling!r}")
        if self.n_experts and not (isinstance(self.experts_per_token, int) and 1 <= self.experts_per_token
                                   <= self.n_experts and isinstance(self.moe_ffn_dim, int) and self.moe_ffn_dim >= 1
                                   and isinstance(self.decoder_sparse_step, int) and self.decoder_sparse_step >= 1):
            problems.append(f"n_experts {self.n_experts} needs experts_per_token in 1..n_experts, a positive moe_ffn_dim"
                            f" and decoder_sparse_step, got {self.experts_per_token!r}, {self.moe_ffn_dim!r},"
                            f" {self.decoder_sparse_step!r}")
        problems += self._router_problems() + self._latent_problems()
        if not (isinstance(self.partial_rotary_factor, (int, float)) and 0 < self.partial_rotary_factor <= 1
                and self.rope_dim >= 2):
            problems.append(f"partial_rotary_factor must be in (0, 1] and leave RoPE at least 2 dims, got"
                            f" {self.partial_rotary_factor!r}")
        for name in ("embedding_multiplier", "residual_multiplier", "logits_scaling", "attention_multiplier"):
            value = getattr(self, name)
            if not (value is None and name == "attention_multiplier") and not (
                    isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
                problems.append(f"{name} must be a positive number, got {value!r}")
        if self.qk_norm_projection and not self.qk_norm:
            problems.append("qk_norm_projection (q / k norms over the whole projection) needs qk_norm")
        if self.post_norm and self.norm != "rmsnorm":
            problems.append("post_norm (OLMo 2's norms after each branch) needs norm: rmsnorm")
        if self.mlp_fused and self.mlp != "swiglu":
            problems.append("mlp_fused (one gate_up_proj) needs mlp: swiglu")
        if self.swiglu_limit is not None and not (isinstance(self.swiglu_limit, (int, float)) and self.swiglu_limit > 0
                                                  and self.mlp == "swiglu"):
            problems.append(f"swiglu_limit must be a positive number (with mlp: swiglu) or null, got {self.swiglu_limit!r}")
        if self.num_labels not in (0, 1):
            problems.append(f"num_labels must be 0 (a language model) or 1 (a reward model), got {self.num_labels!r}")
        if not 0 <= self.drop_rate < 1:
            problems.append(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if problems:
            raise UserError([f"model config: {p}" for p in problems])

    def _router_problems(self) -> list[str]:
        """DeepSeek-V3 routing's fields (Glm4MoeTopkRouter): the groups split the experts evenly, each group holds
        two experts at least (a group scores by its two best), and the chosen groups hold experts_per_token."""
        if self.router_scoring not in ("softmax", "sigmoid"):
            return [f"router_scoring must be softmax or sigmoid, got {self.router_scoring!r}"]
        if not isinstance(self.routed_scaling_factor, (int, float)) or self.routed_scaling_factor <= 0:
            return [f"routed_scaling_factor must be a positive number, got {self.routed_scaling_factor!r}"]
        if (self.n_group, self.topk_group) == (1, 1) or not self.n_experts:
            return []
        ok = isinstance(self.n_group, int) and isinstance(self.topk_group, int) and 1 <= self.topk_group <= \
            self.n_group and self.n_experts % self.n_group == 0 and self.n_experts // self.n_group >= 2 and \
            self.topk_group * (self.n_experts // self.n_group) >= self.experts_per_token
        return [] if ok else [f"n_group {self.n_group!r} / topk_group {self.topk_group!r} must split n_experts"
                              f" {self.n_experts} into groups of two experts or more, topk_group of which hold"
                              f" experts_per_token {self.experts_per_token}"]

    def _latent_problems(self) -> list[str]:
        """Multi-head latent attention's widths: positive ranks, an even rotated part narrower than the head, values
        no wider than it (every attention kernel pads them to the head's width), one key / value head per query head."""
        if self.kv_lora_rank is None:
            return []
        ranks = [self.kv_lora_rank, self.v_head_dim] + ([] if self.q_lora_rank is None else [self.q_lora_rank])
        if not all(isinstance(r, int) and r >= 1 for r in ranks) or not isinstance(self.qk_rope_head_dim, int) or \
                not 2 <= self.qk_rope_head_dim < self.head_dim or self.qk_rope_head_dim % 2 or \
                self.v_head_dim > self.head_dim or self.kv_heads != self.n_heads:
            return [f"kv_lora_rank {self.kv_lora_rank!r} (latent attention) needs positive q_lora_rank (or null) and"
                    f" v_head_dim <= head_dim {self.head_dim}, an even qk_rope_head_dim in 2..head_dim - 1 and"
                    f" n_kv_heads = n_heads; got {self.q_lora_rank!r}, {self.v_head_dim!r}, {self.qk_rope_head_dim!r},"
                    f" {self.kv_heads!r}"]
        return []

    def _normalise_windows(self) -> list[str]:
        """layer_windows as a tuple (a JSON list read back from our config.json), () when no layer slides, so that
        equal models have equal configs; the problems with it."""
        windows = self.layer_windows
        if not isinstance(windows, (list, tuple)):
            return [f"layer_windows must be a list of positive integers or nulls, got {windows!r}"]
        bad = [w for w in windows if w is not None and (type(w) is not int or w < 1)]
        if bad:
            return [f"layer_windows must hold positive integers or nulls, got {bad[0]!r}"]
        if any(windows) and isinstance(self.n_layers, int) and len(windows) != self.n_layers:
            return [f"layer_windows has {len(windows)} entries, one per layer of n_layers {self.n_layers}"]
        object.__setattr__(self, "layer_windows", tuple(windows) if any(windows) else ())
        return []

    def local_rope(self, layer: int) -> bool:
        """Whether block `layer` rotates by rope_local_theta (Gemma 3's sliding-window layers) rather than rope_theta
        and rope_scaling."""
        return self.rope_local_theta is not None and self.window(layer) is not None

    @property
    def attention_scale(self) -> float:
        """What each query-key dot product is multiplied by before the softmax: Granite's attention_multiplier, else
        Gemma's attention_scores_scalar ** -0.5 (query_pre_attn_scalar), else 1 / sqrt(head_dim)."""
        if self.attention_multiplier is not None:
            return float(self.attention_multiplier)
        return (self.attention_scores_scalar or self.head_dim) ** -0.5

    @property
    def default_attention_scale(self) -> bool:
        """Whether attention_scale is 1 / sqrt(head_dim), every attention kernel's own (no query rescaling): decided
        on the fields, since head_dim ** -0.5 * sqrt(head_dim) is not exactly 1 for every head_dim (128: 1 + 2e-16)."""
        return self.attention_multiplier is None and self.attention_scores_scalar in (None, self.head_dim)

    @property
    def explicit_attention(self) -> bool:
        """Whether attention takes the explicit path (attention.softcapped_attention): softcapped scores (Gemma 2) or
        sink logits (GPT-OSS), which no kernel computes; packed rows then reach it as a segment mask."""
        return self.attn_logit_softcapping is not None or self.attention_sinks

    def window(self, layer: int) -> int | None:
        """The sliding window of block `layer`; None: it attends to every earlier position."""
        return self.layer_windows[layer] if self.layer_windows else None

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or 4 * self.emb_dim

    def sparse(self, layer: int) -> bool:
        """Whether block `layer` has a sparse MoE MLP (Qwen3MoeDecoderLayer's rule) rather than a dense one."""
        return bool(self.n_experts) and layer not in self.mlp_only_layers and (layer + 1) % self.decoder_sparse_step == 0

    @property
    def head_dim(self) -> int:
        return self.head_size or self.emb_dim // self.n_heads

    @property
    def rope_dim(self) -> int:
        """The dims of each head RoPE rotates (transformers: int(head_dim * partial_rotary_factor)); the rest pass."""
        if self.kv_lora_rank is not None:  # latent attention: the qk_rope_head_dim dims after the unrotated ones
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)


    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dynamic_rope(self) -> bool:
        """Dynamic NTK: the frequencies follow each forward's longest position past context_length, so a sequence
        may run past it (transformers sets no limit); every other model stops at context_length."""
        return dict(self.rope_scaling or {}).get("type") == "dynamic"

    @property
    def hf(self) -> Family:
        """The family's HF names as this checkpoint's class has them (a wrapper's module prefix and towers)."""
        return wrapped_family(self.family, self.wrapper)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        out["layer_windows"] = list(self.layer_windows)
        out["mlp_only_layers"] = list(self.mlp_only_layers)
        return out


GPTConfig = ModelConfig  # the book's name


def _gpt2(emb_dim: int, n_layers: int, n_heads: int) -> ModelConfig:
    return ModelConfig(emb_dim=emb_dim, n_layers=n_layers, n_heads=n_heads)


def _swiglu(family: str, *, vocab: int, ctx: int, emb: int, layers: int, heads: int, kv: int, ffn: int, theta: float,
            eps: float, tied: bool, head_size: int | None = None, scaling: Mapping[str, Any] | None = None,
            ) -> ModelConfig:
    """The shared shape of Llama 2 / 3, Mistral, Qwen2 / Qwen3: RMSNorm, RoPE, SwiGLU, GQA, no MLP bias."""
    return ModelConfig(family=family, vocab_size=vocab, context_length=ctx, emb_dim=emb, n_layers=layers,
                       n_heads=heads, n_kv_heads=kv, head_size=head_size, ffn_dim=ffn, norm="rmsnorm", norm_eps=eps,
                       positions="rope", rope_theta=theta, rope_scaling=scaling, mlp="swiglu", mlp_bias=False,
                       qkv_bias=family == "qwen2", o_bias=False, tie_weights=tied, **FAMILIES[family].structure())


def _llama3(emb: int, layers: int, heads: int, ffn: int, factor: float, tied: bool) -> ModelConfig:
    scaling = {"type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    return _swiglu("llama", vocab=128256, ctx=131072, emb=emb, layers=layers, heads=heads, kv=8, ffn=ffn,
                   theta=500000.0, eps=1e-5, tied=tied, scaling=scaling)


def _llama2(emb: int, layers: int, heads: int, ffn: int) -> ModelConfig:
    """Llama 2 (meta-llama/Llama-2-7b-hf's config.json): 32,000 sentencepiece ids, 4,096 positions, full multi-head
    attention (no GQA at 7B), RoPE theta 10,000, untied."""
    return _swiglu("llama", vocab=32000, ctx=4096, emb=emb, layers=layers, heads=heads, kv=heads, ffn=ffn,
                   theta=10000.0, eps=1e-5, tied=False)


def _mistral(emb: int, layers: int, heads: int, kv: int, ffn: int) -> ModelConfig:
    """Mistral 7B v0.3 (mistralai/Mistral-7B-v0.3's config.json): the vocabulary extended to 32,768, RoPE theta 1e6,
    sliding_window null (full attention since v0.2; v0.1's 4,096-position window in every layer and 32,000 ids are not
    this shape), untied."""
    return _swiglu("mistral", vocab=32768, ctx=32768, emb=emb, layers=layers, heads=heads, kv=kv, ffn=ffn,
                   theta=1000000.0, eps=1e-5, tied=False)


def _qwen2(emb: int, layers: int, heads: int, kv: int, ffn: int, tied: bool, vocab: int = 151936,
           ctx: int = 32768) -> ModelConfig:
    return _swiglu("qwen2", vocab=vocab, ctx=ctx, emb=emb, layers=layers, heads=heads, kv=kv, ffn=ffn,
                   theta=1000000.0, eps=1e-6, tied=tied)


def _qwen3_moe(emb: int, layers: int, heads: int, kv: int, ffn: int, experts: int, top_k: int, expert_ffn: int,
               ) -> ModelConfig:
    """Qwen3's MoE models (Qwen/Qwen3-30B-A3B's config.json): every block sparse, top-k weights renormalised
    (norm_topk_prob true), head_dim 128, 40,960 positions, untied."""
    return _swiglu("qwen3_moe", vocab=151936, ctx=40960, emb=emb, layers=layers, heads=heads, kv=kv, ffn=ffn,
                   theta=1000000.0, eps=1e-6, tied=False, head_size=128).replace(
        n_experts=experts, experts_per_token=top_k, moe_ffn_dim=expert_ffn, norm_topk_prob=True)


def _mixtral(emb: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, ctx: int) -> ModelConfig:
    """Mixtral (mistralai/Mixtral-8x7B-v0.1's config.json): Mistral's attention without a window (sliding_window
    null), 8 experts of width intermediate_size in every block, top-2 renormalised, RoPE theta 1e6, untied."""
    return _swiglu("mixtral", vocab=vocab, ctx=ctx, emb=emb, layers=layers, heads=heads, kv=kv, ffn=ffn,
                   theta=1000000.0, eps=1e-5, tied=False).replace(
        n_experts=8, experts_per_token=2, moe_ffn_dim=ffn, norm_topk_prob=True, router_weights_fp32=True)


def _qwen2_moe(emb: int, layers: int, heads: int, kv: int, ffn: int, experts: int, top_k: int, expert_ffn: int,
               shared: int, ctx: int) -> ModelConfig:
    """Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B's config.json): Qwen2's attention (q/k/v biases), every block sparse with a
    shared expert of width `shared`, top-k weights not renormalised (norm_topk_prob false), untied."""
    return _swiglu("qwen2_moe", vocab=151936, ctx=ctx, emb=emb, layers=layers, heads=heads, kv=kv, ffn=ffn,
                   theta=1000000.0, eps=1e-6, tied=False).replace(
        qkv_bias=True, n_experts=experts, experts_per_token=top_k, moe_ffn_dim=expert_ffn, shared_expert_dim=shared)


def _qwen3(emb: int, layers: int, heads: int, ffn: int, tied: bool) -> ModelConfig:
    return _swiglu("qwen3", vocab=151936, ctx=40960, emb=emb, layers=layers, heads=heads, kv=8, ffn=ffn,
                   theta=1000000.0, eps=1e-6, tied=tied, head_size=128)


def _phi(*, vocab: int, ctx: int, emb: int, layers: int, heads: int, kv: int, ffn: int, theta: float, tied: bool,
         rotary: float = 1.0) -> ModelConfig:
    """Phi-3 / Phi-4 (Phi3ForCausalLM): one qkv_proj and one gate_up_proj per block, no bias, rms_norm_eps 1e-5.
    The presets leave rope_scaling default: Phi-4-mini's LongRoPE factors are in its config.json (a checkpoint brings
    them); a preset is random weights, for plan's estimate and CPU trials."""
    return _swiglu("phi3", vocab=vocab, ctx=ctx, emb=emb, layers=layers, heads=heads, kv=kv, ffn=ffn, theta=theta,
                   eps=1e-5, tied=tied).replace(partial_rotary_factor=rotary)


def _gemma3(emb: int, layers: int, ffn: int, *, heads: int = 4, kv: int = 1, vocab: int = 262144, ctx: int = 32768,
            window: int = 512, scaling: Mapping[str, Any] | None = None) -> ModelConfig:
    """Gemma 3's decoders. By default the text-only checkpoints' (google/gemma-3-1b-it's and gemma-3-270m's
    config.json): 262,144 ids, 32,768 positions, 4 query heads sharing one key/value head of width 256
    (query_pre_attn_scalar 256), a 512-position window in five layers of every six (sliding_window_pattern 6), RoPE
    theta 1e6 globally and 1e4 locally, tied. The image-text checkpoints' decoders (gemma-3-4b-it's text_config over
    Gemma3TextConfig's defaults) differ in ids, heads, positions, window and the global layers' rope scaling."""
    return _swiglu("gemma3", vocab=vocab, ctx=ctx, emb=emb, layers=layers, heads=heads, kv=kv, ffn=ffn,
                   theta=1000000.0, eps=1e-6, tied=True, head_size=256).replace(
        mlp="geglu", attention_scores_scalar=256, rope_scaling=scaling,
        rope_local_theta=10000.0, layer_windows=tuple(None if (i + 1) % 6 == 0 else window for i in range(layers)))


def _granite(*, vocab: int, ctx: int, emb: int, layers: int, heads: int, kv: int, ffn: int, theta: float, tied: bool,
             embedding: float, attention: float, residual: float, logits: float) -> ModelConfig:
    """Granite 3.x (GraniteForCausalLM): Llama's block without biases, rms_norm_eps 1e-5, its four multipliers."""
    return _swiglu("granite", vocab=vocab, ctx=ctx, emb=emb, layers=layers, heads=heads, kv=kv, ffn=ffn, theta=theta,
                   eps=1e-5, tied=tied).replace(embedding_multiplier=embedding, attention_multiplier=attention,
                                                residual_multiplier=residual, logits_scaling=logits)


def _glm4(*, emb: int, layers: int, heads: int, ffn: int) -> ModelConfig:
    """GLM-4-0414 (THUDM/GLM-4-9B-0414, GLM-4-32B-0414 and their GLM-Z1 siblings, Glm4ForCausalLM): 151,552 ids,
    32,768 positions, 2 kv heads of head_dim 128, q / k / v biases, half of each head rotated in adjacent pairs, four
    norms per block, rms_norm_eps 1e-5, RoPE theta 10,000, untied."""
    return _swiglu("glm4", vocab=151552, ctx=32768, emb=emb, layers=layers, heads=heads, kv=2, ffn=ffn,
                   theta=10000.0, eps=1e-5, tied=False, head_size=128 if 128 * heads != emb else None).replace(
        qkv_bias=True, partial_rotary_factor=0.5)


def _gpt_oss(layers: int, experts: int) -> ModelConfig:
    """OpenAI's gpt-oss (openai/gpt-oss-20b / -120b's config.json): 2,880 wide, 64 heads of 64 over 8 kv heads, q / k / v
    / o biases and sinks, a 128-token window in the even-indexed layers, YaRN (factor 32 over 4,096 positions,
    truncate false) on theta 150,000, every block sparse: top-4 of `experts` biased experts 2,880 wide, the clamped
    SwiGLU (alpha 1.702, limit 7), rms_norm_eps 1e-5, untied."""
    return _swiglu("gpt_oss", vocab=201088, ctx=131072, emb=2880, layers=layers, heads=64, kv=8, ffn=2880,
                   theta=150000.0, eps=1e-5, tied=False, head_size=64,
                   scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                            "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False}).replace(
        qkv_bias=True, o_bias=True, mlp_bias=True, n_experts=experts, experts_per_token=4, moe_ffn_dim=2880,
        norm_topk_prob=True, swiglu_limit=7.0, swiglu_alpha=1.702,
        layer_windows=tuple(128 if i % 2 == 0 else None for i in range(layers)))


def _glm4_moe(*, emb: int, layers: int, heads: int, kv: int, ffn: int, experts: int, top_k: int, expert_ffn: int,
              shared: int, dense: int, qk_norm: bool) -> ModelConfig:
    """GLM-4.5 / 4.6 (zai-org/GLM-4.5-Air's config.json, Glm4MoeForCausalLM): 151,552 ids, 131,072 positions, head_dim
    128, q / k / v biases, half of each head rotated (theta 1e6), the first `dense` blocks dense, then DeepSeek-V3
    sparse blocks: sigmoid router with its correction bias, top_k of `experts`, renormalised, `shared` ungated
    shared experts."""
    return _swiglu("glm4_moe", vocab=151552, ctx=131072, emb=emb, layers=layers, heads=heads, kv=kv, ffn=ffn,
                   theta=1000000.0, eps=1e-5, tied=False, head_size=128).replace(
        qkv_bias=True, qk_norm=qk_norm, partial_rotary_factor=0.5, n_experts=experts, experts_per_token=top_k,
        moe_ffn_dim=expert_ffn, norm_topk_prob=True, mlp_only_layers=tuple(range(dense)),
        shared_expert_dim=shared * expert_ffn, router_scoring="sigmoid", router_correction_bias=True,
        shared_expert_gated=False, router_aux_loss_coef=0.0)


# name -> config. gpt2-*, llama-*, qwen* are the published shapes (their config.json on the hub);
# tiny, mini, small-demo are GPT-2s small enough to train on a CPU.
PRESETS: dict[str, ModelConfig] = {
    "gpt2-small": _gpt2(768, 12, 12),     # 124M
    "gpt2-medium": _gpt2(1024, 24, 16),   # 355M
    "gpt2-large": _gpt2(1280, 36, 20),    # 774M
    "gpt2-xl": _gpt2(1600, 48, 25),       # 1558M
    "tiny": ModelConfig(context_length=128, emb_dim=64, n_heads=2, n_layers=2),
    "mini": ModelConfig(context_length=256, emb_dim=128, n_heads=4, n_layers=4),
    "small-demo": ModelConfig(context_length=512, emb_dim=384, n_heads=6, n_layers=6),
    "llama-3.2-1b": _llama3(2048, 16, 32, 8192, 32.0, tied=True),
    "llama-3.2-3b": _llama3(3072, 28, 24, 8192, 32.0, tied=True),
    "llama-3.1-8b": _llama3(4096, 32, 32, 14336, 8.0, tied=False),
    "llama-2-7b": _llama2(4096, 32, 32, 11008),
    "mistral-7b": _mistral(4096, 32, 32, 8, 14336),
    "qwen2.5-0.5b": _qwen2(896, 24, 14, 2, 4864, tied=True),
    "qwen2.5-1.5b": _qwen2(1536, 28, 12, 2, 8960, tied=True),
    "qwen2.5-7b": _qwen2(3584, 28, 28, 4, 18944, tied=False, vocab=152064, ctx=131072),
    "qwen3-0.6b": _qwen3(1024, 28, 16, 3072, tied=True),
    "qwen3-1.7b": _qwen3(2048, 28, 16, 6144, tied=True),
    "qwen3-4b": _qwen3(2560, 36, 32, 9728, tied=True),
    "qwen3-8b": _qwen3(4096, 36, 32, 12288, tied=False),
    "qwen3-30b-a3b": _qwen3_moe(2048, 48, 32, 4, 6144, experts=128, top_k=8, expert_ffn=768),  # 30.5B, 3.3B active
    "gemma-3-1b": _gemma3(1152, 26, 6912),
    "gemma-3-270m": _gemma3(640, 18, 2048),
}
PRESETS.update({  # the decoder of google/gemma-3-4b-it (Gemma3ForConditionalGeneration; its vision tower not counted)
    "gemma-3-4b": _gemma3(2560, 34, 10240, heads=8, kv=4, vocab=262208, ctx=131072, window=1024,
                          scaling={"type": "linear", "factor": 8.0}),  # 3,880,263,168 (the card's 4B: 4.30B in all)
})
PRESETS.update({  # the decoder of mistralai/Mistral-Small-3.1-24B-Instruct-2503 (Mistral3ForConditionalGeneration: its
    # text_config, Mistral3Config's text defaults; Tekken's 131,072 ids, head_dim 128 beside a 5,120 width, RoPE theta
    # 1e9, no window, its own head): 23,572,403,200 (the card's 24B is the whole model, with the Pixtral tower)
    "mistral-small-3.1-24b": _swiglu("mistral", vocab=131072, ctx=131072, emb=5120, layers=40, heads=32, kv=8,
                                     ffn=32768, theta=1000000000.0, eps=1e-5, tied=False, head_size=128),
})
PRESETS.update({  # the MoE families beside Qwen3-MoE
    "mixtral-8x7b": _mixtral(4096, 32, 32, 8, 14336, vocab=32000, ctx=32768),  # 46.7B, 12.9B active
    "qwen1.5-moe-a2.7b": _qwen2_moe(2048, 24, 16, 16, 5632, experts=60, top_k=4, expert_ffn=1408, shared=5632,
                                    ctx=8192),  # 14.3B, 2.7B active
})
PRESETS.update({  # microsoft/phi-4 (14.7B) and microsoft/Phi-4-mini-instruct (3.8B): their config.json's shapes
    "phi-4": _phi(vocab=100352, ctx=16384, emb=5120, layers=40, heads=40, kv=10, ffn=17920, theta=250000.0, tied=False),
    "phi-4-mini": _phi(vocab=200064, ctx=131072, emb=3072, layers=32, heads=24, kv=8, ffn=8192, theta=10000.0,
                       tied=True, rotary=0.75),
})
PRESETS.update({  # ibm-granite/granite-3.3-8b-instruct (8.17B) and allenai/OLMo-2-1124-7B (7.3B): their config.json's
    "granite-3.3-8b": _granite(vocab=49159, ctx=131072, emb=4096, layers=40, heads=32, kv=8, ffn=12800, theta=1e7,
                               tied=True, embedding=12.0, attention=0.0078125, residual=0.22, logits=16.0),
    "olmo-2-7b": _swiglu("olmo2", vocab=100352, ctx=4096, emb=4096, layers=32, heads=32, kv=32, ffn=11008,
                         theta=500000.0, eps=1e-6, tied=False),
})
PRESETS.update({  # THUDM/GLM-4-9B-0414 (9.4B) and GLM-4-32B-0414 (32.6B): their config.json's shapes
    "glm-4-9b-0414": _glm4(emb=4096, layers=40, heads=32, ffn=13696),
    "glm-4-32b-0414": _glm4(emb=6144, layers=61, heads=48, ffn=23040),
})


PRESETS.update({"gpt-oss-20b": _gpt_oss(24, 32), "gpt-oss-120b": _gpt_oss(36, 128)})  # 20.9B / 3.6B, 116.8B / 5.1B
PRESETS.update({  # zai-org/GLM-4.5-Air (106B, 12B active): its config.json's shapes, without the MTP layer
    "glm-4.5-air": _glm4_moe(emb=4096, layers=46, heads=96, kv=8, ffn=10944, experts=128, top_k=8, expert_ffn=1408,
                             shared=1, dense=1, qk_norm=False),
})



def _deepseek_v3(*, vocab: int, ctx: int, emb: int, layers: int, heads: int, ffn: int, experts: int, top_k: int,
                 expert_ffn: int, shared: int, dense: int, groups: int, kept: int, scaling_factor: float,
                 q_rank: int | None, theta: float, eps: float, yarn: Mapping[str, Any] | None) -> ModelConfig:
    """DeepSeek-V3 / Moonlight (DeepseekV3ForCausalLM): multi-head latent attention (a kv latent of 512, one rotated
    key part of 64 shared by the heads, keys 128 + 64 and values 128 wide per head, queries from a `q_rank` latent or
    one q_proj) over GLM-4.5's routing (_glm4_moe: sigmoid router, correction bias, `groups` expert groups of which
    `kept` are searched, routed_scaling_factor, ungated shared experts, the first `dense` blocks dense), untied."""
    return _swiglu("deepseek_v3", vocab=vocab, ctx=ctx, emb=emb, layers=layers, heads=heads, kv=heads, ffn=ffn,
                   theta=theta, eps=eps, tied=False, head_size=192, scaling=yarn).replace(
        n_kv_heads=None, q_lora_rank=q_rank, kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128, n_experts=experts,
        experts_per_token=top_k, moe_ffn_dim=expert_ffn, norm_topk_prob=True, mlp_only_layers=tuple(range(dense)),
        shared_expert_dim=shared * expert_ffn, router_scoring="sigmoid", router_correction_bias=True, n_group=groups,
        topk_group=kept, routed_scaling_factor=scaling_factor, shared_expert_gated=False, router_aux_loss_coef=0.0)


PRESETS.update({  # their config.json's shapes, without DeepSeek-V3's MTP layer (transformers leaves it out too)
    # deepseek-ai/DeepSeek-V3 (671B, 37B active): YaRN x40 over 4,096 positions, mscale = mscale_all_dim = 1
    "deepseek-v3": _deepseek_v3(vocab=129280, ctx=163840, emb=7168, layers=61, heads=128, ffn=18432, experts=256,
                                top_k=8, expert_ffn=2048, shared=1, dense=3, groups=8, kept=4, scaling_factor=2.5,
                                q_rank=1536, theta=10000.0, eps=1e-6, yarn={
                                    "type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                    "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
    # moonshotai/Moonlight-16B-A3B (16B, 3B active): one q_proj, no expert groups, no rope scaling
    "moonlight-16b-a3b": _deepseek_v3(vocab=163840, ctx=8192, emb=2048, layers=27, heads=16, ffn=11264, experts=64,
                                      top_k=6, expert_ffn=1408, shared=2, dense=1, groups=1, kept=1,
                                      scaling_factor=2.446, q_rank=None, theta=50000.0, eps=1e-5, yarn=None),
})

# ---------------------------------------------------------------------------------------------
# Reading a config: preset name, HF config.json, or our own checkpoint's config.json
# ---------------------------------------------------------------------------------------------

def _missing_model_message(name: str) -> str:
    text = (f"model_name_or_path: '{name}' is neither a preset nor a directory holding config.json"
            f"{did_you_mean(name, PRESETS)}. Presets (random weights): {', '.join(PRESETS)}.")
    if "gpt2" in name.lower():
        text += (" For OpenAI's trained GPT-2 weights, download a Hugging Face checkpoint on a machine with network"
                 " (`hf download openai-community/gpt2 config.json model.safetensors"
                 " --local-dir models/gpt2`) and set model_name_or_path: models/gpt2.")
    return text


def config_path(name_or_path: str | Path) -> Path | None:
    """The config.json a model reference points at, or None for a preset."""
    if str(name_or_path) in PRESETS:
        return None
    from pipeline.model.hub import resolve_model_path

    path = resolve_model_path(name_or_path)  # a hub id becomes its snapshot in the HF cache
    if not path.is_dir():
        raise UserError(_missing_model_message(str(name_or_path)))
    if not (path / "config.json").is_file():
        raise UserError(_adapter_as_model_message(name_or_path, path) or
                        f"{path}: no config.json in this directory; a model directory holds config.json +"
                        " model.safetensors (a Hugging Face checkpoint or one saved by this pipeline)")
    return path / "config.json"


def base_folder(name_or_path: str | Path) -> Path | None:
    """The folder of a model reference's checkpoint (a hub id's snapshot); None for a preset."""
    path = config_path(name_or_path)
    return path.parent if path else None


def _adapter_as_model_message(given: str | Path, path: Path) -> str | None:
    """When `path` is a LoRA adapter or a LoRA run's output_dir (LLaMA-Factory's merge_lora recipes name it in
    adapter_name_or_path, with the base in model_name_or_path): what to write instead; else None."""
    for adapter in (path, path / "adapter"):
        if (adapter / "adapter_config.json").is_file():
            try:
                base = json.loads((adapter / "adapter_config.json").read_text("utf-8")).get("base_model_name_or_path")
            except (OSError, ValueError, AttributeError):
                base = None
            return (f"{path}: a LoRA adapter, not a model (no config.json). Name it in adapter_name_or_path: {given},"
                    f" and the base model it was trained on in model_name_or_path: {base or '<base model>'}")
    return None


def read_raw(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def read_config(name_or_path: str | Path) -> ModelConfig:
    """A ModelConfig from a preset name, an HF checkpoint directory, or one of our own checkpoints."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    path = config_path(name_or_path)
    assert path is not None
    raw = read_raw(path)
    if raw.get("format") == FORMAT:
        return _from_own(raw, path)
    return from_hf_config(raw, path)


def checkpoint_kind(raw: Mapping[str, Any]) -> str:
    """'pipeline' for our own config.json (format version 2), 'pipeline-v1' for version 1, 'hf' otherwise."""
    if raw.get("format") != FORMAT:
        return "hf"
    return "pipeline-v1" if raw.get("format_version", 1) == 1 else "pipeline"


_V1_NAMES = {"layer_norm_eps": "norm_eps"}


def _from_own(raw: Mapping[str, Any], path: Path) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {_V1_NAMES.get(k, k): v for k, v in raw.items()}
    if "sliding_window" in values:  # written before layer_windows (2026-12-06): Mistral's one window in every layer
        window = values.pop("sliding_window")
        if window and "layer_windows" not in values and type(values.get("n_layers")) is int:
            values["layer_windows"] = [window] * values["n_layers"]
    unknown = sorted(set(values) - fields - {"format", "format_version", "torch_dtype"})
    if unknown:
        raise UserError([f"{path}: unknown key '{k}'{did_you_mean(k, fields)}" for k in unknown])
    moe = getattr(FAMILIES.get(str(values.get("family"))), "moe", None)
    if moe is not None and "router_weights_fp32" not in values:  # written before the field (4602188, 2026-12-06):
        values["router_weights_fp32"] = moe.router_weights_fp32  # the family's router, as its HF class computes it
    try:
        return ModelConfig(**{k: v for k, v in values.items() if k in fields})
    except TypeError as err:
        raise UserError(f"{path}: {err}") from None


def from_hf_config(raw: Mapping[str, Any], path: Path | str = "config.json") -> ModelConfig:
    """A Hugging Face config.json of a supported architecture -> ModelConfig (UserError naming file and key)."""
    return ModelConfig(**hf_fields(raw, path))


def to_hf_config(cfg: ModelConfig, dtype: str = "float32", special: Mapping[str, int | None] | None = None,
                 ) -> dict[str, Any]:
    """The config.json the family's transformers class reads; `special` = bos/eos/pad_token_id."""
    return HF_CONFIG[cfg.family](cfg, dtype, dict(special or {}))


def to_own_config(cfg: ModelConfig, torch_dtype: str | None = None) -> dict[str, Any]:
    """Our config.json; torch_dtype: the weights' dtype as transformers names it (read by nothing here: the
    safetensors say it; it tells a reader, as in a Hugging Face config)."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **({"torch_dtype": torch_dtype} if torch_dtype else {}),
            **cfg.to_dict()}


# ---------------------------------------------------------------------------------------------
# Layout: every leaf module, its kind and parameter count (torch-free mirror of GPTModel)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleSpec:
    name: str          # our module path (pipeline.model.families maps it to the family's HF path)
    kind: str          # "embedding" | "layernorm" | "rmsnorm" | "linear"
    in_dim: int
    out_dim: int
    bias: bool = False

    @property
    def params(self) -> int:
        if self.kind == "embedding":
            return self.in_dim * self.out_dim
        if self.kind == "layernorm":
            return 2 * self.out_dim
        if self.kind in ("rmsnorm", "sinks"):  # sinks: one learned logit per head (GPT-OSS's self_attn.sinks)
            return self.out_dim
        return self.in_dim * self.out_dim + (self.out_dim if self.bias else 0)


def gated(cfg: ModelConfig) -> bool:
    """Whether the MLP has a gate_proj: SwiGLU and GeGLU multiply an activated gate into up_proj's output."""
    return cfg.mlp in ("swiglu", "geglu")


def _mlp(cfg: ModelConfig, prefix: str, h: int) -> list[ModuleSpec]:
    """The Linears of one MLP (FeedForward) of hidden width h: a block's, or one expert's."""
    c = cfg.emb_dim
    if cfg.mlp_fused:  # Phi3MLP: gate rows, then up rows, in one Linear
        return [ModuleSpec(prefix + "gate_up_proj", "linear", c, 2 * h, cfg.mlp_bias),
                ModuleSpec(prefix + "down_proj", "linear", h, c, cfg.mlp_bias)]
    gate = [ModuleSpec(prefix + "gate_proj", "linear", c, h, cfg.mlp_bias)] if gated(cfg) else []
    return gate + [ModuleSpec(prefix + "up_proj", "linear", c, h, cfg.mlp_bias),
                   ModuleSpec(prefix + "down_proj", "linear", h, c, cfg.mlp_bias)]


def _latent_attention(cfg: ModelConfig, p: str) -> list[ModuleSpec]:
    """DeepseekV3Attention's projections before o_proj (no biases: attention_bias is refused on read)."""
    c, heads, rank = cfg.emb_dim, cfg.n_heads, cfg.kv_lora_rank or 0
    query = [ModuleSpec(p + "q_proj", "linear", c, heads * cfg.head_dim)] if cfg.q_lora_rank is None else [
        ModuleSpec(p + "q_a_proj", "linear", c, cfg.q_lora_rank),
        ModuleSpec(p + "q_a_layernorm", "rmsnorm", cfg.q_lora_rank, cfg.q_lora_rank),
        ModuleSpec(p + "q_b_proj", "linear", cfg.q_lora_rank, heads * cfg.head_dim)]
    return [*query, ModuleSpec(p + "kv_a_proj_with_mqa", "linear", c, rank + cfg.qk_rope_head_dim),
            ModuleSpec(p + "kv_a_layernorm", "rmsnorm", rank, rank),
            ModuleSpec(p + "kv_b_proj", "linear", rank,
                       heads * (cfg.head_dim - cfg.qk_rope_head_dim + (cfg.v_head_dim or cfg.head_dim)))]


def layout(cfg: ModelConfig) -> list[ModuleSpec]:
    """Every parameterised leaf module of GPTModel(cfg), in module order."""
    c, h, q, kv = cfg.emb_dim, cfg.hidden_dim, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    mods = [ModuleSpec("embed_tokens", "embedding", cfg.vocab_size, c)]
    if cfg.positions == "learned":
        mods.append(ModuleSpec("pos_embed", "embedding", cfg.context_length, c))
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        if not cfg.post_norm:
            mods.append(ModuleSpec(p + "input_layernorm", cfg.norm, c, c))
        if cfg.attention_sinks:  # the attention module's own parameter: named before its Linears' (named_parameters)
            mods.append(ModuleSpec(p + "self_attn.sinks", "sinks", cfg.n_heads, cfg.n_heads))
        if cfg.kv_lora_rank is not None:
            mods += _latent_attention(cfg, p + "self_attn.")
        elif cfg.qkv_fused:
            mods.append(ModuleSpec(p + "self_attn.qkv_proj", "linear", c, q + 2 * kv, cfg.qkv_bias))
        else:
            mods += [ModuleSpec(p + "self_attn.q_proj", "linear", c, q, cfg.qkv_bias),
                     ModuleSpec(p + "self_attn.k_proj", "linear", c, kv, cfg.qkv_bias),
                     ModuleSpec(p + "self_attn.v_proj", "linear", c, kv, cfg.qkv_bias)]
        mods.append(ModuleSpec(p + "self_attn.o_proj", "linear", cfg.n_heads * (cfg.v_head_dim or cfg.head_dim), c,
                               cfg.o_bias))
        if cfg.qk_norm:
            qn, kn = (q, kv) if cfg.qk_norm_projection else (cfg.head_dim, cfg.head_dim)
            mods += [ModuleSpec(p + "self_attn.q_norm", "rmsnorm", qn, qn),
                     ModuleSpec(p + "self_attn.k_norm", "rmsnorm", kn, kn)]
        if cfg.sandwich_norms:
            mods.append(ModuleSpec(p + "attn_output_norm", cfg.norm, c, c))
        mods.append(ModuleSpec(p + "post_attention_layernorm", cfg.norm, c, c))
        if cfg.sparse(i):
            mods.append(ModuleSpec(p + "mlp.gate", "linear", c, cfg.n_experts, cfg.router_bias))
            for e in range(cfg.n_experts):
                mods += _mlp(cfg, f"{p}mlp.experts.{e}.", cfg.moe_ffn_dim or h)
            if cfg.shared_expert_dim:
                mods += _mlp(cfg, p + "mlp.shared_expert.", cfg.shared_expert_dim)
                if cfg.shared_expert_gated:
                    mods.append(ModuleSpec(p + "mlp.shared_expert_gate", "linear", c, 1))
        else:
            mods += _mlp(cfg, p + "mlp.", h)
        if cfg.sandwich_norms:
            mods.append(ModuleSpec(p + "mlp_output_norm", cfg.norm, c, c))
        if cfg.post_norm:  # OLMo 2: the MLP branch's output norm
            mods.append(ModuleSpec(p + "post_feedforward_layernorm", cfg.norm, c, c))
    head = ModuleSpec("score", "linear", c, cfg.num_labels, False) if cfg.num_labels else \
        ModuleSpec("lm_head", "linear", c, cfg.vocab_size, False)
    return [*mods, ModuleSpec("norm", cfg.norm, c, c), head]


def context_limit(context_length: int | None, dynamic: bool = False) -> int | None:
    """The longest sequence (prompt and generated tokens, or a training row) a model may run: its context_length,
    none under dynamic NTK (ModelConfig.dynamic_rope), whose frequencies follow the length past it as transformers'
    do. A sliding window sets no limit: a windowed layer attends to the last `window` positions of any length
    (pipeline.model.attention.windowed). The one source of length_limit and the recipe's cutoff_len
    (pipeline.recipe.modelinfo.recipe_length_limit)."""
    return None if dynamic else context_length


def length_limit(cfg: ModelConfig) -> int | None:
    """The longest sequence a forward of this model may run; None: no limit."""
    return context_limit(cfg.context_length, cfg.dynamic_rope)


def prompt_room(cfg: ModelConfig, max_new_tokens: int) -> int | None:
    """The longest prompt `generate` keeps (a longer one is cut from the left): room for max_new_tokens, at least
    half the length limit; None where there is no limit (dynamic NTK)."""
    limit = length_limit(cfg)
    if limit is None:
        return None
    return max(limit - max_new_tokens, limit // 2, 1)


def decode_steps(cfg: ModelConfig, width: int, max_new_tokens: int) -> int:
    """Forwards `generate` runs at most after a (left-padded) prompt of `width` tokens: max_new_tokens, ending at
    the length limit (none under dynamic NTK)."""
    limit = length_limit(cfg)
    return max_new_tokens if limit is None else min(max_new_tokens, limit - width)


def kv_cache_positions(window: int | None, capacity: int) -> int:
    """Positions of a layer's KV cache buffers for `capacity` tokens (0: unknown): all of them, or with a sliding
    window its kept window - 1 and room for window more (pipeline.model.kv_cache), the capacity where that is less."""
    if window is None:
        return capacity
    return min(2 * window - 1, capacity) if capacity else 2 * window - 1


def kv_cache_values(cfg: ModelConfig) -> int:
    """Numbers a layer's KV cache keeps per token: a key and a value per key/value head, or under latent attention
    (gpt.LatentAttention) the normalised kv latent and the one rotated key part (DeepSeek-V3: 512 + 64 = 576)."""
    if cfg.kv_lora_rank is not None:
        return cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return 2 * cfg.kv_heads * cfg.head_dim


def kv_cache_bytes(cfg: ModelConfig, rows: int, prompt: int, max_new_tokens: int, bytes_per_value: int) -> int:
    """The KV cache `generate` allocates for `rows` prompts of at most `prompt` tokens (pipeline.model.kv_cache:
    sized once for the kept prompt + its decode steps, a windowed layer's for its window): per layer rows x
    positions x kv_cache_values numbers in the compute dtype."""
    room = prompt_room(cfg, max_new_tokens)
    width = prompt if room is None else min(prompt, room)
    positions = width + decode_steps(cfg, width, max_new_tokens)
    per_layer = sum(kv_cache_positions(cfg.window(i), positions) for i in range(cfg.n_layers))
    return per_layer * rows * kv_cache_values(cfg) * bytes_per_value


def activation_bytes(cfg: ModelConfig, seq: int, batch: int, bytes_per_value: int = 2) -> float:
    """Activations one block keeps for the backward (no recomputation), Korthikanti et al. 2022 generalised.

    Their GPT figure, s*b*h*(34 + 5*a*s/h) at 2 bytes, counts per block: the attention input 2h, q/k/v 6h,
    the attention output 2h and its dropout mask h (11h), softmax scores and their mask 5*a*s, the MLP input
    2h, its 4h-wide hidden before and after GELU 16h and a dropout mask h (19h), and both norms 4h. Here
    q and k/v have their own widths (GQA: n_kv_heads * head_dim), SwiGLU keeps four ffn-wide tensors
    (gate, up, silu(gate), their product) instead of two, and a sparse MoE block keeps its experts' copies of the
    rows they run on besides their MLPs (mlp_activation_bytes), and Gemma 2's softcapped scores more per score.
    """
    s, b, h = seq, batch, cfg.emb_dim
    q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    attention = 2 * h + 2 * q + 4 * kv + 2 * q + h
    per_token = attention + mlp_activation_bytes(cfg) + (8 if cfg.sandwich_norms else 4) * h  # Gemma's four norms
    # per score: their 5 (softmax output, dropout mask and output); Gemma 2's softcapped explicit path keeps the tanh
    # output, the fp32 softmax, its cast back, the dropout mask and the scores' mask: 11 (measured 11.25 at bf16);
    # GPT-OSS's sink path keeps the masked scores with the sink column, the fp32 softmax and its cast: 10 (9.8)
    per_score = 11 if cfg.attn_logit_softcapping else 10 if cfg.attention_sinks else 5
    return (s * b * per_token + per_score * cfg.n_heads * s * s * b) * bytes_per_value / 2


def mlp_activation_bytes(cfg: ModelConfig) -> int:
    """The MLP's share of activation_bytes per token at 2 bytes a value: its input 2h, the hidden tensors (SwiGLU's
    four, GELU's two) and a dropout mask h. A sparse MoE block (the largest block where some are dense) keeps that
    input (the router reads it too) and, for each of the experts_per_token experts a token runs, the expert's copy
    of the token's row 2h, its own MLP of moe_ffn_dim and its output 2h (kept for the routing weight), plus the
    router's logits and fp32 probabilities (2 + 4 bytes per expert); a shared expert (Qwen2-MoE) its MLP, its output
    2h and its gate's value."""
    h, per_hidden = cfg.emb_dim, 8 if gated(cfg) else 4
    if not cfg.n_experts:
        return 2 * h + per_hidden * cfg.hidden_dim + h
    expert = 2 * h + per_hidden * (cfg.moe_ffn_dim or cfg.hidden_dim) + h + 2 * h
    shared = per_hidden * cfg.shared_expert_dim + h + 2 * h + 4 if cfg.shared_expert_dim else 0  # + its output, gate
    return 2 * h + cfg.experts_per_token * expert + 6 * cfg.n_experts + shared


def count_params(cfg: ModelConfig) -> int:
    """Distinct parameters (a tied output head shares the token embedding and is not counted twice)."""
    return sum(m.params for m in layout(cfg) if not (m.name == "lm_head" and cfg.tie_weights))


def active_params(cfg: ModelConfig) -> int:
    """Parameters one token runs through (the "A3B" of Qwen3-30B-A3B): count_params less the experts a sparse block
    does not pick (n_experts - experts_per_token of them per sparse block; a shared expert runs on every token)."""
    idle = cfg.n_experts - cfg.experts_per_token
    per_expert = sum(m.params for m in _mlp(cfg, "", cfg.moe_ffn_dim or cfg.hidden_dim))
    return count_params(cfg) - sum(idle * per_expert for i in range(cfg.n_layers) if cfg.sparse(i))


def built_params(cfg: ModelConfig, trained: Iterable["TensorSpec"]) -> int:
    """Parameters of the model train builds: the base's distinct ones (count_params) plus the `trained` tensors an
    adapter adds (LoRA's A and B, DoRA's magnitudes, OFT's blocks: TensorSpec.adapter); additional_target modules
    are the base's own, trained in place, so they add nothing."""
    return count_params(cfg) + sum(t.numel for t in trained if t.adapter)


def lora_candidates(names: Iterable[str]) -> list[str]:
    """Linear modules that may take LoRA: all but the output heads (PEFT would not export them as base layers; a
    reward model's score trains in full, PEFT's modules_to_save for SEQ_CLS)."""
    return [n for n in names if n not in ("lm_head", "score")]


def matches(name: str, pattern: str) -> bool:
    """PEFT's rule: a pattern matches a module path equal to it or ending in '.' + pattern."""
    return name == pattern or name.endswith("." + pattern)


def _short_names(names: Iterable[str]) -> list[str]:
    """Module paths without their block prefix (h.N. / layers.N.), de-duplicated in order."""
    return list(dict.fromkeys(re.sub(r"^[^.]+\.\d+\.", "", n) for n in names))


def normalise_targets(targets: str | Iterable[str] | None) -> list[str]:
    """'all' | 'q_proj,v_proj' | ['c_attn', ...] -> a list of patterns."""
    return ["all"] if targets is None else split_names(targets)


def default_lora_alpha(rank: int) -> int:
    """lora_alpha when the recipe leaves it null: twice the rank (LLaMA-Factory's default, the schema's words)."""
    return 2 * rank


def select_modules(names: Iterable[str], targets: str | Iterable[str] | None, key: str = "lora_target",
                   family: Family | str = "gpt2") -> list[str]:
    """Our module paths whose HF names the target patterns match; a pattern that matches nothing is a UserError.

    Patterns are the family's HF module names (PEFT's suffix rule, with or without the model prefix:
    'c_attn', 'attn.c_proj', 'h.0.attn.c_attn' for GPT-2; 'q_proj', 'mlp.down_proj', 'layers.0.self_attn.q_proj'
    for Llama and Qwen). additional_target is PEFT's modules_to_save, which PEFT matches otherwise (0.21,
    utils/other.py _set_trainable: `key.endswith(target_key)`): the full HF name ends with the text, no dot needed,
    so 'norm' picks Llama's model.norm and every input_layernorm / post_attention_layernorm; a module inside
    another chosen one is left to it (one subtree, as PEFT trains it).
    """
    fam = FAMILIES[family] if isinstance(family, str) else family
    ours = list(names)
    hf = {n: fam.strip(fam.to_hf(n)) for n in ours}
    patterns = normalise_targets(targets)
    every = set(ours)
    if "all" in patterns and key != "additional_target":  # additional_target's 'all' is a name (all_saved_message)
        if expert_names(fam):  # LLaMA-Factory's names, which PEFT moves onto the experts (all_linear_names)
            return select_modules(ours, all_linear_names(fam, ours), key, fam)
        return [n for n in ours if not moe_blocked(fam, n, key, every)]
    problems, chosen = [], set()
    for pattern in patterns:
        bare = fam.strip(pattern)
        if key == "lora_target" and (bare == "lm_head" or bare.endswith(".lm_head")):
            # PEFT would not export a LoRA head as a base layer; additional_target trains it in full instead
            problems.append(f"{key}: '{pattern}': the output head takes no LoRA (train it in full with"
                            " additional_target or finetuning_type: full)")
            continue
        if key == "additional_target" and pattern == fam.prefix.rstrip("."):
            problems.append(whole_model_message(fam, pattern))
            continue
        hit = [n for n in ours if fam.to_hf(n).endswith(pattern)] if key == "additional_target" \
            else [n for n in ours if matches(hf[n], bare)]
        if not hit and key == "additional_target" and pattern == "all":
            problems.append(all_saved_message(fam))
        elif not hit:
            short = _short_names(v for n, v in hf.items() if not moe_blocked(fam, n, key, every))
            leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in short))
            block = next((re.match(r"^([^.]+)\.\d+\.", n).group(1) for n in hf.values()  # type: ignore[union-attr]
                          if re.match(r"^([^.]+)\.\d+\.", n)), "layers")
            example = next((n for n in hf.values() if n.startswith(block + ".0.")), f"{block}.0")
            problems.append(f"{key}: '{pattern}' matches no module{did_you_mean(pattern, leaves + short)}; available:"
                            f" {'all, ' * (key != 'additional_target')}{', '.join(short)} (in every block {block}.0 .."
                            f" {block}.N; a full path such as {example} picks one block)")
        if key == "lora_target" and bare in expert_names(fam):  # every expert's Linear of that name (PEFT's)
            chosen.update(n for n in hit if expert_of(n))
            continue
        if key == "lora_target" and bare == router_name(fam):  # every sparse block's router (PEFT's gate.weight)
            chosen.update(n for n in hit if router_of(n))
            continue
        if blocked := [n for n in hit if moe_blocked(fam, n, key, every)]:
            if key == "lora_target" and fam.moe and fam.moe.lora_mlp and len(blocked) < len(hit):
                # gate_proj on Qwen2-MoE: PEFT adapts the shared expert's and dense blocks' Linears of that name,
                # the experts being fused tensors in transformers 5 (no module of that name)
                hit = [n for n in hit if n not in blocked]
            else:
                problems.append(moe_target_message(fam, key, pattern, blocked))
                continue
        chosen.update(hit)
    problems += expert_pair_problems(fam, chosen)
    if problems:
        raise UserError(problems)
    return [n for n in ours if n in chosen and not _inside(n, chosen)]


def _inside(name: str, chosen: set[str]) -> bool:
    """Whether a module that holds `name` is in `chosen`: its parents looked up, not every chosen name compared (a
    MoE model's `all` chooses every expert's Linear, ~17,000 on GLM-4.5-Air: the pairwise test took minutes)."""
    parts = name.split(".")
    return any(".".join(parts[:i]) in chosen for i in range(1, len(parts)))


def all_linear_names(fam: Family, names: Iterable[str]) -> list[str]:
    """What lora_target: all names on this family's transformers model: LLaMA-Factory 0.9.5's
    find_all_linear_modules (model/model_utils/misc.py:28-52) hands PEFT the last name of every module whose class is
    a Linear, the head left out: all of ours (`names`, the LoRA candidates) but the experts' and the routers', which
    transformers 5 holds as fused 3-D tensors and a TopKRouter. Where a dense block or shared experts hold Linears
    named gate_proj / up_proj / down_proj (GLM-4.5, DeepSeek-V3, Qwen3-MoE with mlp_only_layers), those names reach
    PEFT 0.21, whose MoE conversion moves them onto every routed expert (select_modules' bare expert names) and off
    those Linears; without such a block `all` is the attention's names."""
    return list(dict.fromkeys(fam.strip(fam.to_hf(n)).rsplit(".", 1)[-1] for n in names
                              if not expert_of(n) and not router_of(n)))


def expert_names(fam: Family) -> dict[str, str]:
    """The lora_target names of a sparse block's expert Linears (the family's: gate_proj / up_proj / down_proj,
    Mixtral's w1 / w3 / w2) -> ours, where the family trains LoRA on its experts (MoeKeys.expert_lora); else {}."""
    return expert_spelling(fam) if fam.moe and fam.moe.expert_lora else {}


def router_name(fam: Family) -> str | None:
    """The lora_target name of a sparse block's router (`gate`) where the family trains LoRA on its experts: PEFT 0.21
    maps that name to target_parameters gate.weight in the same conversion (_MOE_TARGET_MODULE_MAPPING); else None."""
    return fam.to_hf("layers.0.mlp.gate").rsplit(".", 1)[-1] if fam.moe and fam.moe.expert_lora else None


def expert_spelling(fam: Family) -> dict[str, str]:
    """How the family names an expert's Linears (gate_proj / up_proj / down_proj, Mixtral's w1 / w3 / w2) -> ours,
    whether or not it trains LoRA on them (an adapter file's target_parameters are read back by these names)."""
    return {fam.to_hf(f"layers.0.mlp.experts.0.{linear}").rsplit(".", 1)[-1]: linear for linear in FUSED}


def expert_pair_problems(fam: Family, chosen: Iterable[str]) -> list[str]:
    """gate_proj without up_proj (or the reverse): PEFT 0.21 fuses the two into gate_up_proj and raises
    ("Cannot convert PEFT target(s) gate_proj without also targeting up_proj", transformers_weight_conversion.py:443)."""
    picked = {e[2] for n in chosen if (e := expert_of(n))}
    if len(picked & set(PAIR)) != 1:
        return []
    shown = {ours: name for name, ours in expert_names(fam).items()}
    given, missing = (shown[p] for p in (PAIR if PAIR[0] in picked else PAIR[::-1]))
    return [f"lora_target: '{given}' without '{missing}': transformers 5 holds each expert's two as one fused"
            f" tensor (mlp.experts.gate_up_proj) and PEFT 0.21 refuses one without the other ({expert_sets(fam)}); add"
            f" {missing} to lora_target or take {given} out"]


def moe_blocked(fam: Family, name: str, key: str, names: set[str]) -> bool:
    """Whether a MoE family's module `name` (ours) is refused as lora_target / additional_target (moe_target_message):
    for LoRA every MLP Linear of the model (with MoeKeys.lora_mlp, Qwen2-MoE: the experts' and the router only);
    trained in full, a sparse block (its router `gate` among `names`, every
    module path) or anything inside it."""
    if not fam.moe:
        return False
    if key == "lora_target":
        return ".mlp.experts." in name or name.endswith(".mlp.gate") if fam.moe.lora_mlp else ".mlp." in name
    return ".mlp.gate." in name + "." or ".mlp.experts" in name or name + ".gate" in names

def expert_sets(fam: Family) -> str:
    """The sets of expert names lora_target takes on this family (the sets PEFT 0.21 converts and loads back)."""
    gate, up, down = expert_names(fam)
    return (f"the experts take LoRA by their bare names, on every expert of every sparse block: {gate}, {up} and"
            f" {down} together, {down} alone, or {gate} and {up} together; the routers by the bare name"
            f" {router_name(fam)}")


def moe_target_message(fam: Family, key: str, pattern: str, blocked: list[str]) -> str:
    """Why a MoE model's MLP modules take no adapter, nor modules_to_save (checked against transformers 5.24 and
    PEFT 0.21): Qwen3MoeForCausalLM holds each sparse block's experts as two fused 3-D parameters
    (mlp.experts.gate_up_proj, mlp.experts.down_proj) and its router as a Qwen3MoeTopKRouter, not Linears; PEFT
    re-targets the names gate_proj / up_proj / down_proj / gate onto those parameters (target_parameters, its v4 ->
    v5 conversion, also for a dense block's gate_proj, whose own adapter it then drops). Where the family trains the
    experts (MoeKeys.expert_lora: pipeline.model.expert_lora) the bare names take them; any other pattern reaching an
    expert (one expert's or one block's path) would still adapt every expert in PEFT (its conversion matches the
    name's end: also a DeepSeek-V3 shared expert's); the bare `gate` takes the routers; a dense block's MLP is not
    done here.
    LLaMA-Factory's lora_target: all (find_all_linear_modules: modules whose class is a Linear) takes the attention
    projections on this model."""
    shown = ", ".join(_short_names(fam.strip(fam.to_hf(n)) for n in blocked[:3])) + (" ..." if len(blocked) > 3 else "")
    if key == "lora_target" and expert_names(fam):
        # DeepSeek-V3's shared experts (mlp.shared_experts) are Linears, but PEFT moves their names onto the routed
        # experts too (any target ending in .gate_proj / .up_proj / .down_proj)
        shared = "; the shared experts (shared_experts) are not adapted" if fam.moe and fam.moe.deepseek else ""
        return (f"lora_target: '{pattern}' picks MLP modules of this {fam.architecture} ({shown}) that take no LoRA"
                f" here: {expert_sets(fam)}"
                " (PEFT 0.21 re-targets those names onto transformers 5's fused expert tensors, whatever path they"
                f" are given with){shared}; a dense block's MLP is not adapted. Use those names, or finetuning_type:"
                " full or freeze")
    if key == "lora_target":
        takes = ("the attention projections, the shared expert (shared_expert.gate_proj / up_proj / down_proj),"
                 " shared_expert_gate and a dense block's MLP") if fam.moe and fam.moe.lora_mlp else \
            "the attention projections (q_proj, k_proj, v_proj, o_proj)"
        return (f"lora_target: '{pattern}' picks MLP modules of this {fam.architecture} ({shown}), which take no LoRA"
                " here: transformers 5 holds its experts as fused 3-D tensors (mlp.experts.gate_up_proj / down_proj)"
                " and its router as no Linear, and PEFT 0.21 re-targets these names onto those tensors, converting"
                " a per-expert adapter for some sets of names only (others load as the base model without a word)."
                f" LoRA adapts {takes}: what lora_target: all takes on this model, as LLaMA-Factory finds its"
                " Linears; to train the experts and the router, use finetuning_type: full or freeze")
    return (f"additional_target: '{pattern}' names the sparse MoE block ({shown}) of this {fam.architecture}, which"
            " PEFT would save under transformers 5's fused expert tensors (mlp.experts.gate_up_proj / down_proj),"
            " not the per-expert weights this pipeline trains; to train the experts and the router in full, use"
            " finetuning_type: full or freeze")


def lora_target_modules(cfg: ModelConfig, targets: str | Iterable[str] | None,
                        blocks: Iterable[int] | None = None) -> list[ModuleSpec]:
    """The Linears lora_target picks, within `blocks` when given (use_llama_pro)."""
    linears = {m.name: m for m in layout(cfg) if m.kind == "linear"}
    return [linears[n] for n in in_blocks(select_modules(lora_candidates(linears), targets, family=cfg.hf), blocks)]


def whole_model_message(fam: Family, pattern: str) -> str:
    """Why additional_target cannot name the whole inner model (LlamaForCausalLM.model, GPT2LMHeadModel.transformer),
    which our module paths have no name for. PEFT (0.21) keeps every adapter off a modules_to_save module and what it
    holds (saved_whole), and every Linear lora_target may pick lies inside that one (the head takes no LoRA), so its
    get_peft_model raises "No modules were targeted for adaptation" whatever lora_target says: LLaMA-Factory fails."""
    return (f"additional_target: '{pattern}' is the whole inner model ({fam.architecture}.{pattern}: the embedding, "
            "every block and the final norm); PEFT trains a modules_to_save module in full and puts no adapter inside"
            " it, so lora_target is left nothing to adapt (PEFT: \"No modules were targeted for adaptation\", and "
            "LLaMA-Factory fails). To train every weight, use finetuning_type: full (without additional_target and "
            f"the lora_* keys); to train some modules in full beside LoRA, name them (e.g. {_saved_examples(fam)})")


def _saved_examples(fam: Family) -> str:
    """Modules a user may name in additional_target, in the family's words: the input embedding, the final norm."""
    return f"{fam.strip(fam.to_hf('embed_tokens'))}, {fam.strip(fam.to_hf('norm'))}"


def all_saved_message(fam: Family) -> str:
    """Why additional_target: all is refused where no module's name ends with 'all' (every family here): LLaMA-Factory
    0.9.5 hands additional_target to PEFT as modules_to_save unchanged (model/adapter.py:241, 249), and PEFT 0.21
    trains in full the modules whose name ends with each text (utils/other.py:1088, _set_trainable), skipping one that
    matches none: so there it trains nothing beside the adapter, without a word. Read as every module (as lora_target
    reads it), it made every lora_target 'also in additional_target'."""
    return (f"additional_target: 'all' matches no module: LLaMA-Factory hands additional_target to PEFT as "
            "modules_to_save, which trains in full every module whose name ends with the text, and no module of this "
            f"{fam.architecture} ends with 'all', so LLaMA-Factory trains nothing beside the adapter ('all' is "
            "lora_target's word for every Linear). Remove additional_target for LLaMA-Factory's run, name the modules "
            f"to train in full (e.g. {_saved_examples(fam)}), or use finetuning_type: full to train every weight")


def saved_whole(path: str, pattern: str) -> bool:
    """Whether `pattern` is whole dotted parts of the HF module path `path` (names the module or one holding it):
    PEFT's rule keeping every adapter off a modules_to_save module (0.21, tuners/tuners_utils.py:2363,
    check_target_module_exists: `re.match(rf"(^|.*\\.){m}($|\\..*)", key)`; escaped here, our names hold no other
    regex character than the dot). 'all' is a name here too, as PEFT reads modules_to_save (all_saved_message)."""
    return re.match(rf"(^|.*\.){re.escape(pattern)}($|\..*)", path) is not None


def saved_around(path: str, pattern: str) -> str | None:
    """The outermost of the HF module path `path` and the modules holding it that PEFT's modules_to_save rule wraps
    for `pattern` (0.21, utils/other.py:1088 _set_trainable: `key.endswith(target_key)`, no dot needed), or None."""
    parts = path.split(".")
    return next((p for p in (".".join(parts[:end]) for end in range(1, len(parts) + 1)) if p.endswith(pattern)),
                None)


def adapted(targets: Sequence[str], patterns: Iterable[str], family: Family | str = "gpt2") -> list[str]:
    """The `targets` (module paths lora_target picks) that take the adapter beside the modules_to_save `patterns`
    (additional_target, or an adapter's modules_to_save), as PEFT 0.21 builds them, or a UserError where it cannot.

    LLaMA-Factory 0.9.5 (model/adapter.py) passes lora_target and additional_target to PEFT as they are. PEFT
    first keeps every adapter off a module that a pattern names as whole dotted parts (saved_whole: "Adapters should
    never match on modules to save modules"): such a module trains in full and takes no adapter; when that leaves
    nothing to adapt get_peft_model raises "No modules were targeted for adaptation", refused here at lora_target.
    Then it wraps every module whose name merely ends with a pattern (saved_around), after the adapters are in: a
    pattern that ends an adapted module's name without being a whole part of it (`proj` with `q_proj`) makes
    get_peft_model raise TypeError ("modules_to_save cannot be applied to modules of type lora.Linear"); one that
    ends the name of a module holding it (`attn` with Llama's `self_attn.q_proj`) trains that module in full with
    the adapter inside, an adapter PeftModel.from_pretrained cannot load back (KeyError). Both are refused here at
    additional_target, with the whole name that does what PEFT can (its ModulesToSaveWrapper, one subtree)."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    patterns = list(patterns)
    kept = [n for n in targets if not any(saved_whole(fam.to_hf(n), p) for p in patterns)]
    if targets and not kept:
        picked = ", ".join(_short_names(fam.strip(fam.to_hf(n)) for n in targets))
        raise UserError(f"lora_target: every module it picks ({picked}) is also in additional_target, which trains it "
                        "in full; PEFT puts no adapter on a module it trains in full (modules_to_save), so nothing is "
                        "left to adapt (PEFT: \"No modules were targeted for adaptation\"). Name other modules in "
                        "lora_target, remove these from additional_target, or use finetuning_type: full / freeze")
    problems = []
    for pattern in patterns:
        hits = [(fam.to_hf(n), around) for n in kept if (around := saved_around(fam.to_hf(n), pattern))]
        if hits:
            problems.append(_ending_overlap(fam, pattern, hits))
    if problems:
        raise UserError(problems)
    return kept


def _ending_overlap(fam: Family, pattern: str, hits: list[tuple[str, str]]) -> str:
    """additional_target's message for a pattern that ends the name of adapted modules (or of modules holding them)
    without being a whole part of it (adapted): what PEFT does with it and the whole name to write instead."""
    adapted_names = ", ".join(_short_names(fam.strip(path) for path, _ in hits))
    inner = [(path, around) for path, around in hits if not path.endswith(pattern)]
    if len(inner) < len(hits):  # PEFT wraps the adapted module itself: its TypeError, whatever holds it
        leaf = next(path for path, _ in hits if path.endswith(pattern)).rsplit(".", 1)[-1]
        return (f"additional_target: '{pattern}' ends the name of {adapted_names}, which lora_target adapts, without "
                f"being a whole part of it; PEFT keeps the adapter on such a module and then cannot also train it in full "
                "(get_peft_model raises TypeError: \"modules_to_save cannot be applied to modules of type "
                "lora.Linear\", OFT's alike), so LLaMA-Factory fails. Write whole module names in additional_target "
                f"(e.g. {leaf}: trained in full, without an adapter), or take those modules out of lora_target")
    holders = ", ".join(_short_names(fam.strip(around) for _, around in inner))
    leaf = inner[0][1].rsplit(".", 1)[-1]
    return (f"additional_target: '{pattern}' ends the name of {holders}, which holds {adapted_names} that lora_target "
            f"adapts, without being a whole part of it; PEFT then trains {holders} in full with the adapter inside, "
            "and the adapter it writes does not load back (PeftModel.from_pretrained: KeyError). Write whole module "
            f"names in additional_target (e.g. {leaf}: trained in full, with no adapter inside), or take the modules "
            "inside it out of lora_target")


# a PEFT adapter tensor's key: base_model.model.<module>.<the adapter's own tensor>[.weight]
_ADAPTER_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.(lora_A|lora_B|lora_magnitude_vector|oft_R)(\.|$)")


def is_adapter_tensor(key: str) -> bool:
    """Whether a PEFT adapter file's tensor is the adapter's own (LoRA's A / B, DoRA's magnitude, OFT's R), not a
    module it saves whole (modules_to_save: a score head), whose tensors take the base module's place."""
    return _ADAPTER_TENSOR.match(key) is not None


def adapted_and_saved(tensor_names: Iterable[str], modules_to_save: Iterable[str]) -> dict[str, str]:
    """The modules (HF paths) for which an adapter file holds adapter tensors (LoRA's A / B / DoRA's magnitude,
    OFT's R) although its modules_to_save trains them in full, each with the name that takes it (saved_whole or
    saved_around: PEFT's two rules, as in adapted). PEFT builds no adapter there: it loads such a file without a
    word and drops those tensors, another model than the one trained; this pipeline wrote such adapters before it
    kept a module in both lora_target and additional_target off the adapter."""
    names = [n for n in modules_to_save if isinstance(n, str)]
    found: dict[str, str] = {}
    for key in tensor_names:
        if (m := _ADAPTER_TENSOR.match(key)) is None or m["module"] in found:
            continue
        name = next((n for n in names if saved_whole(m["module"], n) or saved_around(m["module"], n)), None)
        if name is not None:
            found[m["module"]] = name
    return found


def adapted_and_saved_message(where: str, found: Mapping[str, str], family: Family | str) -> str:
    """The refusal of an adapter whose file adapts modules its modules_to_save trains in full (adapted_and_saved):
    `where` names the adapter (its weights file, or the recipe key's value)."""
    fam = FAMILIES[family] if isinstance(family, str) else family
    modules = ", ".join(_short_names(fam.strip(m) for m in found))
    listed = ", ".join(dict.fromkeys(f"'{n}'" for n in found.values()))
    return (f"{where} holds adapter tensors (lora_A / lora_B) for {modules}, which its modules_to_save ({listed}) "
            "also trains in full (this pipeline's LoRA runs wrote such adapters for a module in both lora_target and "
            "additional_target before they followed PEFT's rule). PEFT builds no adapter there: it drops those tensors"
            " without a word (or fails, for a module that holds them), so it does not load the model that was "
            "trained, and neither does this pipeline. Train it again with this version (such a module then trains in"
            " full, without LoRA), or fold each such module's update into its saved weight (weight + lora_alpha / r "
            "x B A) and delete its lora_A / lora_B tensors from the file")


PAD_TO_MULTIPLE_OF = 64  # LLaMA-Factory's resize_token_embeddings(..., pad_to_multiple_of=64) (pipeline.model.vocab)


def resized_vocab_size(rows: int, n_tokens: int) -> int:
    """The embedding's row count once a tokenizer of `n_tokens` ids is in use: unchanged when they fit. Here, not in
    pipeline.model.vocab (which grows the weights), so that plan counts the grown model without torch."""
    if n_tokens <= rows:
        return rows
    return math.ceil(n_tokens / PAD_TO_MULTIPLE_OF) * PAD_TO_MULTIPLE_OF


def vocab_modules(cfg: ModelConfig) -> tuple[str, ...]:
    """What resize_vocab trains in full beside LoRA when additional_target is not given: the input embedding and the
    output head (LLaMA-Factory's adapter.py), one matrix when tied; a reward model has no LM head (its score head
    trains anyway)."""
    return ("embed_tokens",) if cfg.num_labels else ("embed_tokens", "lm_head")


def llama_pro_problem(n_layers: int, n_expanded: int) -> str:
    """Why `n_expanded` blocks cannot be LLaMA Pro's among `n_layers` ("" when they can): one new block follows
    every n_layers / n_expanded (LLaMA-Factory's scripts/llama_pro.py and model_utils' find_expanded_modules), so
    the count must divide the blocks. The message starts at "given" for the caller to prefix its key."""
    if n_expanded >= 1 and n_layers % n_expanded == 0:
        return ""
    divisors = ", ".join(str(d) for d in range(1, n_layers + 1) if n_layers % d == 0)
    return (f"given {n_expanded}, expected a divisor of the model's {n_layers} blocks (LLaMA Pro puts one new block "
            f"after every num_layers / N): one of {divisors}")


def llama_pro_blocks(n_layers: int, n_expanded: int) -> list[int]:
    """The blocks `python -m pipeline expand` inserted, which use_llama_pro trains: LLaMA-Factory's rule, stride =
    n_layers // n_expanded and ids range(stride - 1, n_layers + stride - 1, stride), the last block of each group."""
    problem = llama_pro_problem(n_layers, n_expanded)
    if problem:
        raise UserError(f"freeze_trainable_layers: {problem} (use_llama_pro: the count given to expand)")
    stride = n_layers // n_expanded
    return list(range(stride - 1, n_layers + stride - 1, stride))


def in_blocks(names: Iterable[str], blocks: Iterable[int] | None) -> list[str]:
    """The module paths inside one of `blocks` (all of them with None): use_llama_pro's LoRA targets."""
    if blocks is None:
        return list(names)
    wanted = {f"layers.{i}" for i in blocks}
    return [n for n in names if ".".join(n.split(".")[:2]) in wanted]


def freeze_module_choices(cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """(hidden, non-hidden) module names freeze_trainable_modules / freeze_extra_modules accept, in the family's HF
    names, as LLaMA-Factory's _setup_freeze_tuning collects them from named_parameters: hidden, the first name below
    block 0 (self_attn, mlp, input_layernorm ... for Llama; attn, mlp, ln_1, ln_2 for GPT-2); non-hidden, the module
    owning a parameter outside the blocks (embed_tokens, norm, lm_head; wte, wpe, ln_f). A tied lm_head is no
    parameter of its own in transformers, so it is not offered then."""
    fam = FAMILIES[cfg.family]
    hidden: dict[str, None] = {}
    outside: dict[str, None] = {}
    for m in layout(cfg):
        hf = fam.strip(fam.to_hf(m.name))
        if (block := re.match(r"^[^.]+\.0\.([^.]+)", hf)) is not None:
            hidden[block.group(1)] = None
        elif re.search(r"\.\d+\.", hf + ".") is None and not (cfg.tie_weights and m.name == "lm_head"):
            outside[hf.rsplit(".", 1)[-1]] = None
    return list(hidden), list(outside)


def freeze_module_problems(cfg: ModelConfig, trainable_modules: str | Iterable[str] | None,
                           extra_modules: str | Iterable[str] | None) -> list[tuple[str, str]]:
    """(key, why) for each name of freeze_trainable_modules / freeze_extra_modules the model lacks (LLaMA-Factory's
    ValueError "Module X is not found, please choose from ..."), each message starting at "given"."""
    hidden, outside = freeze_module_choices(cfg)
    problems = []
    for key, given, valid in (("freeze_trainable_modules", normalise_targets(trainable_modules), ["all", *hidden]),
                              ("freeze_extra_modules", split_names(extra_modules), outside)):
        for name in given:
            if name not in valid:
                problems.append((key, f"given '{name}', expected a comma list of {', '.join(valid)} (the "
                                      f"{'modules of each block' if key == 'freeze_trainable_modules' else 'modules outside the blocks'}"
                                      f" of this {cfg.family} model, by transformers' names){did_you_mean(name, valid)}"))
    return problems


def freeze_layers_problem(n_layers: int, trainable_layers: int) -> str:
    """Why freeze_trainable_layers cannot count blocks of a model of `n_layers` ("" when it can), starting at "given"
    for the caller to prefix its key: 0 trains no block, and more blocks than the model has are refused where
    LLaMA-Factory would quietly train them all."""
    if trainable_layers and abs(trainable_layers) <= n_layers:
        return ""
    return (f"given {trainable_layers}, expected 1..{n_layers} (the last blocks of the model's {n_layers}) or "
            f"-1..-{n_layers} (the first ones); or finetuning_type: full")


def freeze_blocks(n_layers: int, trainable_layers: int) -> list[int]:
    """The blocks finetuning_type: freeze trains: the last n for n > 0, the first -n for n < 0, as LLaMA-Factory
    0.9.5's _setup_freeze_tuning picks them (model/adapter.py:89-92: range(num_layers - n, num_layers), else
    range(-n)); one rule for the model, plan and the recipe rules."""
    if problem := freeze_layers_problem(n_layers, trainable_layers):
        raise UserError(f"freeze_trainable_layers: {problem}")
    if trainable_layers > 0:
        return list(range(n_layers - trainable_layers, n_layers))
    return list(range(-trainable_layers))


def freeze_trainable_names(cfg: ModelConfig, trainable_layers: int, llama_pro: bool = False,
                           trainable_modules: str | Iterable[str] | None = "all",
                           extra_modules: str | Iterable[str] | None = None) -> list[str]:
    """finetuning_type: freeze trains the last `trainable_layers` blocks (the first -trainable_layers when negative:
    freeze_blocks) and the final norm (and a reward model's
    new score head: it starts random). With use_llama_pro, the expanded blocks alone (LLaMA-Factory trains no norm
    then either): the rest is the original model, which LLaMA Pro keeps. freeze_trainable_modules narrows each block
    to the named modules and freeze_extra_modules adds modules outside the blocks, both by the family's HF names as
    LLaMA-Factory; once either is given the recipe spells out what trains, so the final norm trains only when
    freeze_extra_modules names it (LLaMA-Factory's set exactly)."""
    head = ["score"] if cfg.num_labels else []
    blocks = llama_pro_blocks(cfg.n_layers, trainable_layers) if llama_pro else freeze_blocks(cfg.n_layers,
                                                                                              trainable_layers)
    modules, extra = normalise_targets(trainable_modules or "all"), split_names(extra_modules)
    if problems := freeze_module_problems(cfg, modules, extra):
        raise UserError([f"{key}: {why}" for key, why in problems])
    if modules == ["all"] and not extra:
        return [f"layers.{i}" for i in blocks] + ([] if llama_pro else ["norm"]) + head
    return [m.name for m in layout(cfg) if _freeze_picks(cfg, m.name, blocks, modules, extra)] + head


def _freeze_picks(cfg: ModelConfig, name: str, blocks: list[int], modules: list[str], extra: list[str]) -> bool:
    """Whether our leaf module `name` trains: inside a chosen block and (all or) one of `modules` below it, or one
    of the `extra` top-level modules (a tied head goes with embed_tokens: they are one tensor)."""
    fam = FAMILIES[cfg.family]
    hf = fam.strip(fam.to_hf(name))
    if (block := re.match(r"^[^.]+\.(\d+)\.([^.]+)", hf)) is not None:
        return int(block.group(1)) in blocks and ("all" in modules or block.group(2) in modules)
    return hf.rsplit(".", 1)[-1] in extra


def module_paths(cfg: ModelConfig) -> list[str]:
    """Every module path of GPTModel(cfg) with parameters below it: leaves, their parents, and the containers."""
    paths: dict[str, None] = {}
    for m in layout(cfg):
        parts = m.name.split(".")
        for end in range(1, len(parts) + 1):
            paths[".".join(parts[:end])] = None
    return list(paths)


def additional_target_modules(cfg: ModelConfig, patterns: str | Iterable[str] | None) -> list[ModuleSpec]:
    """additional_target: any module (norms, embeddings, head, whole blocks) trained in full alongside LoRA.

    A comma string is split as LLaMA-Factory does ('embed_tokens,lm_head'), like lora_target."""
    if not patterns:
        return []
    chosen = select_modules(module_paths(cfg), normalise_targets(patterns), key="additional_target",
                            family=cfg.hf)
    return [m for m in layout(cfg) if any(m.name == c or m.name.startswith(c + ".") for c in chosen)]


def _nearest_divisor(in_features: int, wanted: int) -> int:
    """PEFT's OFTLayer.adjust_oft_parameters: the divisor of in_features nearest `wanted` (the lower on a tie);
    in_features itself when `wanted` exceeds it."""
    if wanted >= in_features:
        return in_features
    higher = wanted
    while higher <= in_features and in_features % higher != 0:
        higher += 1
    lower = wanted
    while lower > 1 and in_features % lower != 0:
        lower -= 1
    return lower if wanted - lower <= higher - wanted else higher


# Why OFT is refused on GPT-2 (the recipe rule oft_needs_linear_layers, and oft.refuse_conv1d below it): PEFT 0.21's OFT
# wraps Linear, Conv2d and Embedding (tuners/oft/model.py:30-41, _get_tuner_layer_class), and get_peft_model raises
# TypeError on GPT-2's Conv1D (:140-144), so LLaMA-Factory's OFT run on GPT-2 fails before training.
OFT_NO_CONV1D = ("PEFT's OFT cannot wrap Conv1D (get_peft_model raises TypeError: \"Target module Conv1D is not "
                 "supported\"), so LLaMA-Factory fails there too")


def oft_blocks(in_features: int, rank: int, block_size: int) -> tuple[int, int]:
    """(number of blocks, block size) of OFT's rotation on a layer of `in_features` inputs: one of oft_rank /
    oft_block_size is given, the other 0 (PEFT's OFTLayer.update_layer refuses both or neither); a value that does
    not divide in_features moves to the nearest that does, as PEFT moves it. Here (no torch) for plan's counts."""
    if (rank == 0) == (block_size == 0):
        raise UserError(f"OFT takes either oft_rank (the number of blocks) or oft_block_size, the other 0 (given "
                        f"oft_rank {rank}, oft_block_size {block_size}; PEFT refuses both or neither)")
    if rank == 0:
        size = block_size if in_features % block_size == 0 and block_size <= in_features \
            else _nearest_divisor(in_features, block_size)
        return in_features // size, size
    blocks = rank if in_features % rank == 0 and rank <= in_features else _nearest_divisor(in_features, rank)
    return blocks, in_features // blocks


@dataclass(frozen=True)
class TensorSpec:
    """One parameter tensor of GPTModel(cfg), or of an adapter on it: our name (as model.named_parameters() gives
    it) and shape. The optimizers' memory in plan (pipeline.model.optimizer_state) reads these."""
    name: str
    shape: tuple[int, ...]
    adapter: bool = False  # a LoRA / OFT adapter's own weight: held in fp32 (pipeline.model.adapter.upcast_adapter)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def module_tensors(m: ModuleSpec) -> list[TensorSpec]:
    """The parameters of one leaf module, in its registration order (a Linear's weight is (out, in), GPT-2's
    Conv1D ones too: stored as a Linear here)."""
    if m.kind == "embedding":
        return [TensorSpec(f"{m.name}.weight", (m.in_dim, m.out_dim))]
    if m.kind == "sinks":  # a parameter of the attention module itself, not a leaf module's weight
        return [TensorSpec(m.name, (m.out_dim,))]
    if m.kind in NORMS:
        return [TensorSpec(f"{m.name}.{leaf}", (m.out_dim,)) for leaf in ("weight", "bias")[:m.params // m.out_dim]]
    return [TensorSpec(f"{m.name}.weight", (m.out_dim, m.in_dim))] + \
        ([TensorSpec(f"{m.name}.bias", (m.out_dim,))] if m.bias else [])


def model_tensors(cfg: ModelConfig) -> list[TensorSpec]:
    """Every distinct parameter of GPTModel(cfg): a tied head's weight is the embedding's, listed once."""
    return [t for m in layout(cfg) if not (m.name == "lm_head" and cfg.tie_weights) for t in module_tensors(m)]


def adapter_tensors(m: ModuleSpec, finetuning_type: str, lora_rank: int, use_dora: bool,
                    oft: tuple[int, int] | None) -> list[TensorSpec]:
    """The trained tensors an adapter adds on the Linear `m` (pipeline.model.lora, pipeline.model.oft): LoRA's A
    (in, rank) and B (rank, out), DoRA's magnitude (out); OFT's skew-symmetric upper triangles, one row a block."""
    if finetuning_type == "oft":
        blocks, size = oft_blocks(m.in_dim, *(oft or (0, 32)))
        return [TensorSpec(f"{m.name}.oft.weight", (blocks, size * (size - 1) // 2), adapter=True)]
    return [TensorSpec(f"{m.name}.lora.A", (m.in_dim, lora_rank), adapter=True),
            TensorSpec(f"{m.name}.lora.B", (lora_rank, m.out_dim), adapter=True)
            ] + ([TensorSpec(f"{m.name}.magnitude", (m.out_dim,), adapter=True)] if use_dora else [])


def fused_adapter_tensors(m: ModuleSpec, finetuning_type: str, lora_rank: int, use_dora: bool,
                          oft: tuple[int, int] | None) -> list[TensorSpec]:
    """adapter_tensors, but an expert's gate_proj and up_proj share one pair of rank 2 lora_rank over both
    (pipeline.model.expert_lora: PEFT's LoRA on the fused gate_up_proj), counted on gate_proj."""
    expert = expert_of(m.name)
    if expert is None or expert[2] not in PAIR:
        return adapter_tensors(m, finetuning_type, lora_rank, use_dora, oft)
    if expert[2] != PAIR[0]:
        return []
    return [TensorSpec(f"{m.name}.lora.A", (m.in_dim, 2 * lora_rank), adapter=True),
            TensorSpec(f"{m.name}.lora.B", (2 * lora_rank, 2 * m.out_dim), adapter=True)]


def trainable_tensors(cfg: ModelConfig, finetuning_type: str, lora_rank: int = 8,
                      lora_target: str | Iterable[str] | None = "all", freeze_trainable_layers: int = 2,
                      additional_target: str | Iterable[str] | None = None, use_dora: bool = False,
                      resize_vocab: bool = False, use_llama_pro: bool = False,
                      freeze_modules: tuple[str | Iterable[str] | None, str | Iterable[str] | None] = ("all", None),
                      oft: tuple[int, int] | None = None) -> list[TensorSpec]:
    """The tensors the optimizer updates (trainable_params counts them; plan's optimizer memory reads their shapes):
    DoRA adds one magnitude per output feature of each adapted layer; resize_vocab (new_special_tokens that add a
    token) trains vocab_modules in full under LoRA, unless additional_target names others; use_llama_pro: the
    expanded blocks; freeze_modules: freeze_trainable_modules and freeze_extra_modules."""
    if finetuning_type == "full":
        return model_tensors(cfg)
    if finetuning_type == "freeze":
        prefixes = freeze_trainable_names(cfg, freeze_trainable_layers, use_llama_pro, *freeze_modules)
        return [t for m in layout(cfg) if any(m.name == p or m.name.startswith(p + ".") for p in prefixes)
                for t in module_tensors(m)]
    if trains_adapter(finetuning_type):
        targets = lora_target_modules(cfg, lora_target, llama_pro_blocks(cfg.n_layers, freeze_trainable_layers)
                                      if use_llama_pro else None)
        extra = {m.name: m for m in additional_target_modules(cfg, additional_target)}
        kept = set(adapted([m.name for m in targets], normalise_targets(additional_target) if additional_target
                           else [], cfg.hf))  # a module trained in full takes none
        adapters = [t for m in targets if m.name in kept
                    for t in fused_adapter_tensors(m, finetuning_type, lora_rank, use_dora, oft)]
        if resize_vocab and additional_target is None:
            extra = {m.name: m for m in layout(cfg) if m.name in vocab_modules(cfg)}
        if cfg.tie_weights and "lm_head" in extra and "embed_tokens" in extra:
            extra.pop("lm_head")
        extra.update({m.name: m for m in layout(cfg) if m.name == "score"})  # a reward model's head: always trained
        return adapters + [t for m in extra.values() for t in module_tensors(m)]
    raise UserError(f"finetuning_type: '{finetuning_type}' is not one of lora, oft, full, freeze"
                    f"{did_you_mean(finetuning_type, ['lora', 'oft', 'full', 'freeze'])}")


def trainable_params(cfg: ModelConfig, finetuning_type: str, *args: Any, **kwargs: Any) -> int:
    """How many parameters the optimizer updates (for plan's memory estimate and the trainable report): the sum over
    trainable_tensors, which takes the same arguments."""
    return sum(t.numel for t in trainable_tensors(cfg, finetuning_type, *args, **kwargs))
