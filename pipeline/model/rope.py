"""Rotary frequencies per rope type, as transformers' modeling_rope_utils computes them.

Two facts per model: the inverse frequency of each rotary pair, and the factor cos and sin are multiplied
by (YaRN's attention temperature; 1 for the others). Both are pure functions of the config, computed once
per device, so training, the KV-cache generate path and every attention kernel see the same rotation.

Dynamic NTK is the exception: its frequencies are a function of the config and of a length that each forward
may change (dynamic_length, the rule of transformers' dynamic_rope_update), so the model keeps that length.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from pipeline.model.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, device: torch.device | None = None, length: int = 0) -> torch.Tensor:
    """theta^(-2j/d) per frequency j, rescaled per cfg.rope_scaling: linear (all slowed by `factor`), llama3
    (Llama 3.1's smooth interpolation: long wavelengths slowed, short ones kept, a linear blend between),
    yarn (the same idea with the blend over rotation counts, transformers' _compute_yarn_parameters) or
    dynamic (a larger theta for sequences of `length` > context_length; the others ignore `length`)."""
    d = cfg.rope_dim
    s = dict(cfg.rope_scaling or {})
    theta = _dynamic_theta(cfg, s["factor"], length, device) if s.get("type") == "dynamic" else cfg.rope_theta
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    if s.get("type") == "linear":
        return inv / s["factor"]
    if s.get("type") == "llama3":
        return _llama3(inv, s)
    if s.get("type") == "yarn":
        return _yarn(cfg.rope_theta, d, s, device)
    if s.get("type") == "longrope":  # _compute_longrope_parameters: 1 / (ext_factor x theta^(2j/d))
        factors = s["long_factor"] if longrope_long(cfg, length) else s["short_factor"]
        ext = torch.tensor(factors, dtype=torch.float32, device=device)
        return 1.0 / (ext * cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    return inv


def longrope_restart(cfg: ModelConfig, width: int, cached: int) -> bool:
    """Whether a cached decode of a sequence `width` tokens long (its pads included) with `cached` tokens in the KV
    cache starts again from no cache: LongRoPE's keys cached on the short factors while the sequence now runs past
    original_max_position_embeddings (Phi3ForCausalLM.prepare_inputs_for_generation's rule, modeling_phi3.py)."""
    s = dict(cfg.rope_scaling or {})
    return s.get("type") == "longrope" and width >= s["original_max_position_embeddings"] + 1 \
        and cached <= s["original_max_position_embeddings"]


def longrope_long(cfg: ModelConfig, length: int) -> bool:
    """Whether LongRoPE runs its long factors for a forward whose largest position is length - 1: past
    original_max_position_embeddings (transformers' longrope_frequency_update, per forward, whole batch); the short
    ones up to it. False for every other rope type."""
    s = dict(cfg.rope_scaling or {})
    return s.get("type") == "longrope" and length > s["original_max_position_embeddings"]


def _dynamic_theta(cfg: ModelConfig, factor: float, length: int,
                   device: torch.device | None) -> float | torch.Tensor:
    """transformers' _compute_dynamic_ntk_parameters: theta x ((factor x L / C) - (factor - 1))^(d / (d - 2))
    with L = max(length, C), C = max_position_embeddings (context_length; LLaMA-Factory's window x factor,
    not the window). At L = C the multiplier is 1: the plain frequencies. Past C it is computed as there, in
    fp32 from a tensor length on the device (there it is max(position_ids) + 1), so the frequencies match."""
    c, d = cfg.context_length, cfg.rope_dim
    if length <= c:
        return cfg.rope_theta
    return cfg.rope_theta * ((factor * torch.tensor(length, device=device) / c) - (factor - 1)) ** (d / (d - 2))


def dynamic_length(cached: int, longest: int, context: int) -> int:
    """The length dynamic NTK's frequencies stand for after a forward whose largest position is longest - 1,
    given the length they stood for before (`cached`; context_length at load), as transformers'
    dynamic_rope_update keeps it per model: it grows to `longest` when a forward exceeds it, falls back to
    `context` when a forward is shorter than the context (strictly) after growing, and stays otherwise. So a
    forward of 80 positions after one of 100 uses the frequencies for 100, and the same tokens give other
    logits after a shorter call; with a KV cache every decoding step past the context recomputes them while
    the cached keys keep the rotation of the step that computed them."""
    if longest > cached:
        return longest
    if longest < context < cached:
        return context
    return cached


def rope_attention_factor(cfg: ModelConfig) -> float:
    """What cos and sin are multiplied by: YaRN's attention_factor when given, else 0.1 ln(factor) + 1 (the
    paper's sqrt(1/t)), or the DeepSeek form mscale(factor, mscale) / mscale(factor, mscale_all_dim) when
    both are set and non-zero; LongRoPE's attention_factor when given, else sqrt(1 + ln(factor) / ln(original)) with
    factor max_position_embeddings / original_max_position_embeddings when not given (1 at factor <= 1); 1 for
    every other rope type."""
    s = dict(cfg.rope_scaling or {})
    if s.get("type") == "longrope":  # _compute_longrope_parameters: the factor from the two lengths when not given
        old = s["original_max_position_embeddings"]
        factor = s.get("factor") or cfg.context_length / old
        if s.get("attention_factor") is not None:
            return float(s["attention_factor"])
        return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))
    if s.get("type") != "yarn":
        return 1.0
    if s.get("attention_factor") is not None:
        return float(s["attention_factor"])
    if s.get("mscale") and s.get("mscale_all_dim"):
        return _mscale(s["factor"], s["mscale"]) / _mscale(s["factor"], s["mscale_all_dim"])
    return _mscale(s["factor"])


def latent_score_scale(cfg: ModelConfig) -> float:
    """DeepSeek's factor on the attention scores beside head_dim ** -0.5 (latent attention): mscale(factor,
    mscale_all_dim) ** 2 under a scaled RoPE with mscale_all_dim (transformers' yarn_apply_mscale,
    models/deepseek_v3/modeling_deepseek_v3.py:268-274), else 1."""
    s = dict(cfg.rope_scaling or {})
    if s.get("type", "default") == "default" or not s.get("mscale_all_dim"):
        return 1.0
    return _mscale(s["factor"], s["mscale_all_dim"]) ** 2


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _llama3(inv: torch.Tensor, s: Mapping[str, Any]) -> torch.Tensor:
    old, factor = s["original_max_position_embeddings"], s["factor"]
    low_wavelen, high_wavelen = old / s["low_freq_factor"], old / s["high_freq_factor"]
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(base: float, d: int, s: Mapping[str, Any], device: torch.device | None) -> torch.Tensor:
    """Frequencies that turn fewer than beta_slow times over the original window are interpolated (divided
    by factor), those turning more than beta_fast times are kept, a linear ramp over the pair index between;
    the ramp's ends are floored / ceiled unless truncate is false (defaults 32, 1, true as in transformers)."""
    factor, old = s["factor"], s["original_max_position_embeddings"]
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def pair(rotations: float) -> float:  # the (fractional) pair index that turns `rotations` times over `old`
        return (d * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = pair(beta_fast), pair(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    pos_freqs = base ** (torch.arange(0, d, 2).to(device=device, dtype=torch.float) / d)
    ramp = torch.clamp((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    keep = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
