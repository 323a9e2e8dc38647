"""Model sizes as data (LitGPT-style presets) and the torch-free facts derived from them.

`plan` imports this module to estimate memory, so nothing here may import torch. The module
`layout(cfg)` is the single description of which parameters a GPTModel has; the parameter counts
and the LoRA target matching below are computed from it, and the tests check it against the real
module tree of `pipeline.model.gpt.GPTModel`.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from pipeline.errors import UserError, did_you_mean
from pipeline.names import split_names

FORMAT = "pipeline-gpt"  # the "format" value in the config.json of our own checkpoints
FORMAT_VERSION = 1
HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # GPT-2's tanh-approximated GELU under its HF names


@dataclass(frozen=True)
class GPTConfig:
    """The book's GPT_CONFIG_124M dict as a dataclass (same key names where the book has them)."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True
    tie_weights: bool = True
    ffn_dim: int | None = None  # hidden width of the MLP; None means 4 * emb_dim (GPT-2)
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = [f"{name} must be a positive integer, got {getattr(self, name)!r}"
                    for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers")
                    if not isinstance(getattr(self, name), int) or getattr(self, name) < 1]
        if not problems and self.emb_dim % self.n_heads:
            problems.append(f"emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}")
        if not 0 <= self.drop_rate < 1:
            problems.append(f"drop_rate must be in [0, 1), got {self.drop_rate!r}")
        if problems:
            raise UserError([f"model config: {p}" for p in problems])

    @property
    def hidden_dim(self) -> int:
        return self.ffn_dim or 4 * self.emb_dim

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def replace(self, **changes: Any) -> "GPTConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _gpt2(emb_dim: int, n_layers: int, n_heads: int) -> GPTConfig:
    return GPTConfig(emb_dim=emb_dim, n_layers=n_layers, n_heads=n_heads)


# name -> config. The gpt2-* shapes are OpenAI's; the rest are small enough to train on a CPU.
PRESETS: dict[str, GPTConfig] = {
    "gpt2-small": _gpt2(768, 12, 12),     # 124M
    "gpt2-medium": _gpt2(1024, 24, 16),   # 355M
    "gpt2-large": _gpt2(1280, 36, 20),    # 774M
    "gpt2-xl": _gpt2(1600, 48, 25),       # 1558M
    "tiny": GPTConfig(context_length=128, emb_dim=64, n_heads=2, n_layers=2),
    "mini": GPTConfig(context_length=256, emb_dim=128, n_heads=4, n_layers=4),
    "small-demo": GPTConfig(context_length=512, emb_dim=384, n_heads=6, n_layers=6),
}


# ---------------------------------------------------------------------------------------------
# Reading a config: preset name, HF GPT-2 config.json, or our own checkpoint's config.json
# ---------------------------------------------------------------------------------------------

def _missing_model_message(name: str) -> str:
    text = (f"model_name_or_path: '{name}' is neither a preset nor a directory holding config.json"
            f"{did_you_mean(name, PRESETS)}. Presets (random weights): {', '.join(PRESETS)}.")
    if "gpt2" in name.lower():
        text += (" For OpenAI's trained GPT-2 weights, download a Hugging Face checkpoint on a machine with network"
                 " (`huggingface-cli download openai-community/gpt2 config.json model.safetensors"
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
        raise UserError(f"{path}: no config.json in this directory; a model directory holds config.json +"
                        " model.safetensors (a Hugging Face GPT-2 checkpoint or one saved by this pipeline)")
    return path / "config.json"


def read_config(name_or_path: str | Path) -> GPTConfig:
    """A GPTConfig from a preset name, an HF GPT-2 checkpoint directory, or one of our own checkpoints."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    path = config_path(name_or_path)
    assert path is not None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") == FORMAT:
        return _from_own(raw, path)
    return from_hf_config(raw, path)


def checkpoint_kind(raw: Mapping[str, Any]) -> str:
    """'pipeline' for our own config.json, 'hf' for a Hugging Face GPT-2 one."""
    return "pipeline" if raw.get("format") == FORMAT else "hf"


def _from_own(raw: Mapping[str, Any], path: Path) -> GPTConfig:
    fields = {f.name for f in dataclasses.fields(GPTConfig)}
    unknown = sorted(set(raw) - fields - {"format", "format_version"})
    if unknown:
        raise UserError([f"{path}: unknown key '{k}'{did_you_mean(k, fields)}" for k in unknown])
    try:
        return GPTConfig(**{k: v for k, v in raw.items() if k in fields})
    except TypeError as err:
        raise UserError(f"{path}: {err}") from None


def from_hf_config(raw: Mapping[str, Any], path: Path | str = "config.json") -> GPTConfig:
    """Map HF GPT2Config keys (n_embd, n_layer, ...) to ours; refuse variants our model does not implement."""
    model_type = raw.get("model_type")
    if model_type not in (None, "gpt2"):
        raise UserError(f"{path}: model_type '{model_type}' is not supported; only GPT-2 checkpoints"
                        " (model_type 'gpt2') or our own (\"format\": \"pipeline-gpt\") load")
    problems = [f"{path}: missing key '{k}' (a GPT-2 config.json has it)"
                for k in ("n_embd", "n_layer", "n_head") if k not in raw]
    activation = raw.get("activation_function", "gelu_new")
    if activation not in HF_ACTIVATIONS:
        problems.append(f"{path}: activation_function '{activation}' is not supported; expected one of"
                        f" {', '.join(HF_ACTIVATIONS)} (GPT-2's tanh GELU)")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False)):
        if key in raw and bool(raw[key]) != ok:
            problems.append(f"{path}: {key}={raw[key]!r} is not supported (GPT-2 uses {ok})")
    if problems:
        raise UserError(problems)
    return GPTConfig(
        vocab_size=int(raw.get("vocab_size", 50257)),
        context_length=int(raw.get("n_positions", raw.get("n_ctx", 1024))),
        emb_dim=int(raw["n_embd"]),
        n_heads=int(raw["n_head"]),
        n_layers=int(raw["n_layer"]),
        drop_rate=float(raw.get("resid_pdrop", 0.0) or 0.0),
        qkv_bias=True,
        tie_weights=bool(raw.get("tie_word_embeddings", True)),
        ffn_dim=raw.get("n_inner") or None,
        layer_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
    )


def to_hf_config(cfg: GPTConfig, dtype: str = "float32") -> dict[str, Any]:
    """The config.json transformers' GPT2LMHeadModel reads (GPT-2 has no switch for qkv bias: it is always on)."""
    from pipeline.data.tokenizer import gpt2

    tok = gpt2()
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.ffn_dim,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "use_cache": True,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "tie_word_embeddings": cfg.tie_weights,
        "torch_dtype": dtype,
    }


def to_own_config(cfg: GPTConfig) -> dict[str, Any]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **cfg.to_dict()}


# ---------------------------------------------------------------------------------------------
# Layout: every leaf module, its kind and parameter count (torch-free mirror of GPTModel)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModuleSpec:
    name: str          # our module path == the HF GPT-2 path without the "transformer." prefix
    kind: str          # "embedding" | "layernorm" | "linear"
    in_dim: int
    out_dim: int
    bias: bool = False

    @property
    def params(self) -> int:
        if self.kind == "embedding":
            return self.in_dim * self.out_dim
        if self.kind == "layernorm":
            return 2 * self.out_dim
        return self.in_dim * self.out_dim + (self.out_dim if self.bias else 0)


def layout(cfg: GPTConfig) -> list[ModuleSpec]:
    """Every parameterised leaf module of GPTModel(cfg), in module order."""
    c, h = cfg.emb_dim, cfg.hidden_dim
    mods = [ModuleSpec("wte", "embedding", cfg.vocab_size, c), ModuleSpec("wpe", "embedding", cfg.context_length, c)]
    for i in range(cfg.n_layers):
        p = f"h.{i}."
        mods += [
            ModuleSpec(p + "ln_1", "layernorm", c, c),
            ModuleSpec(p + "attn.c_attn", "linear", c, 3 * c, cfg.qkv_bias),
            ModuleSpec(p + "attn.c_proj", "linear", c, c, True),
            ModuleSpec(p + "ln_2", "layernorm", c, c),
            ModuleSpec(p + "mlp.c_fc", "linear", c, h, True),
            ModuleSpec(p + "mlp.c_proj", "linear", h, c, True),
        ]
    mods += [ModuleSpec("ln_f", "layernorm", c, c), ModuleSpec("lm_head", "linear", c, cfg.vocab_size, False)]
    return mods


def count_params(cfg: GPTConfig) -> int:
    """Distinct parameters (a tied output head shares the token embedding and is not counted twice)."""
    return sum(m.params for m in layout(cfg) if not (m.name == "lm_head" and cfg.tie_weights))


def lora_candidates(names: Iterable[str]) -> list[str]:
    """Linear modules that may take LoRA: all but the output head (its export would not be PEFT's Conv1D)."""
    return [n for n in names if n != "lm_head"]


def _strip_hf(pattern: str) -> str:
    return pattern[len("transformer."):] if pattern.startswith("transformer.") else pattern


def matches(name: str, pattern: str) -> bool:
    """PEFT's rule: a pattern matches a module path equal to it or ending in '.' + pattern."""
    pattern = _strip_hf(pattern)
    return name == pattern or name.endswith("." + pattern)


def _short_names(names: Iterable[str]) -> list[str]:
    """Module paths without their h.N. prefix, de-duplicated in order (c_attn, attn.c_proj, ...)."""
    seen: dict[str, None] = {}
    for n in names:
        parts = n.split(".")
        seen[".".join(parts[2:]) if parts[0] == "h" and len(parts) > 2 else n] = None
    return list(seen)


def normalise_targets(targets: str | Iterable[str] | None) -> list[str]:
    """'all' | 'c_attn,c_proj' | ['c_attn', ...] -> a list of patterns."""
    return ["all"] if targets is None else split_names(targets)


def default_lora_alpha(rank: int) -> int:
    """lora_alpha when the recipe leaves it null: twice the rank (LLaMA-Factory's default, the schema's words)."""
    return 2 * rank


def select_modules(names: Iterable[str], targets: str | Iterable[str] | None, key: str = "lora_target") -> list[str]:
    """Module paths matched by the target patterns; a pattern that matches nothing is a UserError."""
    names = list(names)
    patterns = normalise_targets(targets)
    if "all" in patterns:
        return list(names)
    problems, chosen = [], set()
    for pattern in patterns:
        if _strip_hf(pattern) == "lm_head" or _strip_hf(pattern).endswith(".lm_head"):
            problems.append(f"{key}: '{pattern}': the output head takes no LoRA (train it in full with"
                            " additional_target or finetuning_type: full)")
            continue
        hit = [n for n in names if matches(n, pattern)]
        if not hit:
            short = _short_names(names)
            leaves = list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in short))
            problems.append(f"{key}: '{pattern}' matches no module{did_you_mean(pattern, leaves + short)}; available:"
                            f" all, {', '.join(short)} (in every block h.0 .. h.N; a full path such as"
                            " h.0.attn.c_attn picks one block)")
        chosen.update(hit)
    if problems:
        raise UserError(problems)
    return [n for n in names if n in chosen]


def lora_target_modules(cfg: GPTConfig, targets: str | Iterable[str] | None) -> list[ModuleSpec]:
    linears = {m.name: m for m in layout(cfg) if m.kind == "linear"}
    return [linears[n] for n in select_modules(lora_candidates(linears), targets)]


def freeze_trainable_names(cfg: GPTConfig, trainable_layers: int) -> list[str]:
    """finetuning_type: freeze trains the last `trainable_layers` blocks and the final norm."""
    if not 1 <= trainable_layers <= cfg.n_layers:
        raise UserError(f"freeze_trainable_layers: {trainable_layers} is out of range; the model has"
                        f" {cfg.n_layers} blocks (use 1..{cfg.n_layers}, or finetuning_type: full)")
    return [f"h.{i}" for i in range(cfg.n_layers - trainable_layers, cfg.n_layers)] + ["ln_f"]


def additional_target_modules(cfg: GPTConfig, patterns: Iterable[str] | None) -> list[ModuleSpec]:
    """additional_target: any module (norms, embeddings, head) trained in full alongside LoRA."""
    if not patterns:
        return []
    mods = {m.name: m for m in layout(cfg)}
    return [mods[n] for n in select_modules(mods, list(patterns), key="additional_target")]


def trainable_params(cfg: GPTConfig, finetuning_type: str, lora_rank: int = 8,
                     lora_target: str | Iterable[str] | None = "all", freeze_trainable_layers: int = 2,
                     additional_target: Iterable[str] | None = None) -> int:
    """How many parameters the optimizer updates (for plan's memory estimate and the trainable report)."""
    if finetuning_type == "full":
        return count_params(cfg)
    if finetuning_type == "freeze":
        prefixes = freeze_trainable_names(cfg, freeze_trainable_layers)
        return sum(m.params for m in layout(cfg) if any(m.name == p or m.name.startswith(p + ".") for p in prefixes))
    if finetuning_type == "lora":
        lora = sum(lora_rank * (m.in_dim + m.out_dim) for m in lora_target_modules(cfg, lora_target))
        extra = {m.name: m for m in additional_target_modules(cfg, additional_target)}
        if cfg.tie_weights and "lm_head" in extra and "wte" in extra:
            extra.pop("lm_head")
        return lora + sum(m.params for m in extra.values())
    raise UserError(f"finetuning_type: '{finetuning_type}' is not one of lora, full, freeze"
                    f"{did_you_mean(finetuning_type, ['lora', 'full', 'freeze'])}")
