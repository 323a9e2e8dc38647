"""The client optimizers' rules on tensors and what their state holds, without torch: which tensors Muon, GaLore /
APOLLO, Adam-mini and BAdam treat how (pipeline.train.muon, galore, apollo, adam_mini and badam apply these rules
to the loaded model), and how many numbers each keeps, for `plan`'s optimizer and gradient memory
(pipeline.recipe.plan) and the rule that galore_target / apollo_target select a trainable Linear before the model
is built (pipeline.recipe.rules.optimizers).

The state per trained tensor of n numbers (rows x cols for a matrix) once it has stepped, as the optimizers here
keep it (tests/train/test_optimizer_state.py sums their state tensors after one step):
  AdamW (torch)  m and v: 2n, and torch's step count (a 4-byte fp32 tensor per tensor)
  SGD (torch)    nothing; with optim_args momentum (not 0) the momentum buffer: n
  Adagrad,       the sum of squared gradients (Adagrad) or their running mean (RMSprop's square_avg): n, and
  RMSprop        torch's step count (a 4-byte fp32 tensor per tensor)
  Adafactor      a matrix (2-D and more): the running means of the squared gradient over its rows and over its
                 columns, rows + cols numbers; any other tensor: n; and each tensor's RMS (a 0-d tensor), all in
                 float32 whatever the weights' dtype (transformers' Adafactor upcasts bf16 gradients)
  Muon           its matrices (2-D, no embedding or head): the momentum buffer, n; the rest: AdamW's m and v, 2n
  GaLore         its matrices: m and v in the projected shape (rows x k projected on the right, k x cols on the
                 left, k x k for full; k = min(galore_rank, rows, cols), the SVD's) and the basis (k x cols right,
                 rows x k left, both for full); the rest 2n
  APOLLO         its matrices: m and v projected as GaLore's, with k = apollo_rank for the random projection (a
                 rank x cols or rows x rank matrix, drawn whatever the matrix's size), the SVD's k for apollo_proj:
                 svd; the projection; and the last update's norm (1); the rest 2n
  Adam-mini      m per number; v per block: n for a bias, n / (hidden_size^2 / heads) for q and k, one per row of
                 an embedding, the head, v, o and the MLP's matrices, one for any other whole tensor
  BAdam          the active decoder layer's m and v, 2n each, and each tensor's step count (a 4-byte fp32 tensor):
                 the largest layer's (the others' state is dropped at each switch); ratio mode: every tensor but
                 the embedding and the head, m and v of its window's int(n x badam_update_ratio) entries each and
                 its step count (4 bytes)
Counters kept as Python integers (the steps of Muon, GaLore, APOLLO, Adam-mini; APOLLO's seeds) take no tensor.
The numbers are in the dtype of the tensors the optimizer steps: bfloat16 under pure_bf16, else float32 (under
bf16 / fp16 mixed precision DeepSpeed steps fp32 master copies, which plan counts beside the state).
"""
from __future__ import annotations

import math
import re
from typing import Any, Iterable, Mapping

from pipeline.model.config import ModelConfig, TensorSpec, layout

STEP_BYTES = 4  # torch AdamW's and BAdam's per-tensor step count: a float32 scalar tensor whatever the weights' dtype

# the recipe's `optim` names besides AdamW's -> the optimizer pipeline.train.optim builds for them as transformers'
# Trainer does (torch's SGD, Adagrad, RMSprop; transformers' Adafactor)
OTHER_OPTIMS = {"sgd": "SGD", "adagrad": "Adagrad", "rmsprop": "RMSprop", "adafactor": "Adafactor"}


# optim_args: the keys transformers' Trainer (5.x, trainer_optimizer.py _get_sgd / _get_adagrad / _get_rmsprop)
# reads for each optimizer, as float or as a flag ("true", "1", "yes" in any case: True; any other value: False).
# Any other key, and optim_args under every other optim (AdamW's names, adafactor), it ignores. Its weight_decay is
# the constructor's default, which the Trainer's decay groups (each with its own weight_decay) override: no effect.
OPTIM_ARGS_READ = {"sgd": {"momentum": float, "dampening": float, "weight_decay": float, "nesterov": bool},
                   "adagrad": {"lr_decay": float, "weight_decay": float, "eps": float},
                   "rmsprop": {"momentum": float, "alpha": float, "eps": float, "weight_decay": float,
                               "centered": bool}}
FLAG_TRUE = ("true", "1", "yes")


def parse_optim_args(text: str | None) -> dict[str, str]:
    """transformers' _parse_optim_args: spaces removed, comma-separated key=value pairs (a later key wins); empty or
    None is none. Raises ValueError naming the pair that is not one `key=value` (transformers' unpacking fails
    there too: a trailing comma, a bare key, two `=`)."""
    if not text:
        return {}
    pairs = {}
    for mapping in text.replace(" ", "").split(","):
        parts = mapping.split("=")
        if len(parts) != 2 or not parts[0]:
            raise ValueError(f"{mapping!r} is not one key=value pair")
        pairs[parts[0]] = parts[1]
    return pairs


def optim_kwargs(optim: str, text: str | None) -> dict[str, Any]:
    """The keyword arguments transformers' Trainer passes the optimizer of `optim` from optim_args (OPTIM_ARGS_READ;
    the others dropped, as there). Raises ValueError for a pair that does not parse or a number float() refuses."""
    read, out = OPTIM_ARGS_READ.get(optim, {}), {}
    for key, value in parse_optim_args(text).items():
        if read.get(key) is bool:
            out[key] = value.lower() in FLAG_TRUE
        elif key in read:
            try:
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"{key}={value}: {value!r} is not a number") from None
    return out


OVERRIDDEN_BY_GROUPS = ("weight_decay",)  # read into the constructor's defaults, then set by every decay group


def ignored_optim_args(optim: str, text: str | None) -> list[str]:
    """The optim_args keys transformers' Trainer does not read for `optim` (all of them but sgd's, adagrad's and
    rmsprop's OPTIM_ARGS_READ), and weight_decay, which its decay groups override."""
    read = OPTIM_ARGS_READ.get(optim, {})
    return [key for key in parse_optim_args(text) if key not in read or key in OVERRIDDEN_BY_GROUPS]


def effective_optim_args(optim: str, text: str | None) -> dict[str, Any]:
    """The optim_args that change the update (optim_kwargs less OVERRIDDEN_BY_GROUPS): what the plan's optimizer line
    shows and what a resume compares."""
    return {k: v for k, v in optim_kwargs(optim, text).items() if k not in OVERRIDDEN_BY_GROUPS}


def optimizer_named(optim: str) -> str:
    """The optimizer the recipe's `optim` builds: adamw_torch_fused, adamw_torch and adamw_hf all name torch's AdamW
    (the same update and state), so a resume may switch between them; the others are OTHER_OPTIMS'."""
    return OTHER_OPTIMS.get(optim, "AdamW")

# Muon (pipeline.train.muon)
SKIPPED = ("embed", "lm_head")  # a transformers name containing one of these goes to AdamW even when 2-D

# GaLore and APOLLO (pipeline.train.galore, apollo)
HEAD = "lm_head"  # LLaMA-Factory's find_all_linear_modules leaves out every module whose name contains it
NAMES = {"galore": "GaLore", "apollo": "APOLLO"}  # the recipe keys' prefix -> the optimizer's name, for messages

# Adam-mini (pipeline.train.adam_mini); adam_mini.py:115-128: the name words of each block kind, checked in this
# order (bias first, then q/k)
ADAM_WORDS = ("bias",)
HEAD_WORDS = ("k_proj", "q_proj", "wq", "wk", "query", "key")
ROW_WORDS = ("embed", "embd", "wte", "lm_head", "output", "final_layer", "v_proj", "wv", "value", "feed_forward",
             "linear", "mlp", "o_proj", "wo", "attn.proj")

# BAdam (pipeline.train.badam)
LAYER = re.compile(r".*layers.[^.]*\.")  # badam block_optim.py:159, its layer_pattern (the `.` unescaped there too)


def takes_muon(hf_name: str, ndim: int) -> bool:
    """LLaMA-Factory's rule, on the transformers / PEFT name: 2-D and neither an embedding nor the output head."""
    return ndim == 2 and not any(word in hf_name for word in SKIPPED)


def side(shape: Iterable[int], proj_type: str) -> str:
    """Which side of a (rows, cols) gradient the basis projects: 'left', 'right' or 'full' (galore_projector.py's
    `project`: std the shorter side, reverse_std the longer)."""
    rows, cols = list(shape)[:2]
    if proj_type == "std":
        return "right" if rows >= cols else "left"
    if proj_type == "reverse_std":
        return "left" if rows >= cols else "right"
    return proj_type


def linear_targets(hf_linears: list[str], galore_target: str) -> list[str]:
    """galore_target's words: `all` is the last name part of every Linear but the head (LLaMA-Factory's
    find_all_linear_modules), else the comma-separated list as given."""
    words = [word.strip() for word in galore_target.split(",")]
    if words == ["all"]:
        return sorted({name.rsplit(".", 1)[-1] for name in hf_linears if HEAD not in name})
    return words


def block_kind(hf_name: str) -> str:
    """adam_mini's block for the transformers name: "adam" (per element), "heads", "rows" or "whole"."""
    name = hf_name.lower()
    for kind, words in (("adam", ADAM_WORDS), ("heads", HEAD_WORDS), ("rows", ROW_WORDS)):
        if any(word in name for word in words):
            return kind
    return "whole"


def head_numel(dim: int, n_heads: int) -> int:
    """The elements of one q/k block: dim x dim / n_heads (adam_mini.py:93; a head's when head_dim = dim / n_heads)."""
    return dim * dim // n_heads


def block_prefixes(hf_names: Iterable[str]) -> list[str]:
    """The blocks' name prefixes in the order of the names (block_optim.py:156-175, embedding and head left out):
    the first match of LAYER for each name that no earlier prefix covers."""
    prefixes: list[str] = []
    for name in hf_names:
        if any(prefix in name for prefix in prefixes):
            continue
        found = LAYER.match(name)
        if found:
            prefixes.append(found.group(0))
    return prefixes


def linear_weights(cfg: ModelConfig) -> dict[str, str]:
    """transformers module name -> our name of its weight, for the modules that are an nn.Linear in transformers
    (GPT-2's projections are Conv1D there; a tied head's weight is the embedding's), in module order."""
    family = cfg.hf
    return {family.to_hf(m.name): "embed_tokens.weight" if m.name == "lm_head" and cfg.tie_weights
            else f"{m.name}.weight" for m in layout(cfg)
            if m.kind == "linear" and not family.is_conv1d(f"{m.name}.weight")}


def low_rank_weights(cfg: ModelConfig, target: str, trained: Iterable[str]) -> set[str]:
    """Our names of the matrices GaLore / APOLLO project: the trained weights of the Linear modules whose
    transformers name holds one of `target`'s words (pipeline.train.galore.low_rank_groups on the loaded model)."""
    linears = linear_weights(cfg)
    words = linear_targets(list(linears), target)
    return {weight for name, weight in linears.items() if any(word in name for word in words)} & set(trained)


def _projected(shape: tuple[int, ...], rank: int, where: str, clipped: bool) -> tuple[int, int]:
    """(numbers of the projected gradient, numbers of the projection) of a rows x cols matrix: the SVD's rank is at
    most min(rows, cols) (`clipped`), a random projection's is `rank`."""
    rows, cols = shape
    k = min(rank, rows, cols) if clipped else rank
    if where == "right":
        return rows * k, k * cols
    if where == "left":
        return k * cols, rows * k
    return k * k, rows * k + k * cols


def _low_rank_numbers(values: Mapping[str, Any], key: str, cfg: ModelConfig, tensors: list[TensorSpec]) -> int:
    """GaLore's (key galore) or APOLLO's (apollo) state: see the module docstring."""
    chosen = low_rank_weights(cfg, values[f"{key}_target"], (t.name for t in tensors))
    svd = key == "galore" or values["apollo_proj"] == "svd"
    total = 0
    for t in tensors:
        if t.name not in chosen:
            total += 2 * t.numel
            continue
        low, basis = _projected(t.shape, values[f"{key}_rank"], side(t.shape, values[f"{key}_proj_type"]), svd)
        total += 2 * low + basis + (1 if key == "apollo" else 0)  # APOLLO's scaled_grad: the last update's norm
    return total


def _adam_mini_numbers(cfg: ModelConfig, tensors: list[TensorSpec]) -> int:
    """Adam-mini's m per number and v per block (module docstring), over transformers' names and layout."""
    family, heads = cfg.hf, head_numel(cfg.emb_dim, cfg.n_heads)
    total = 0
    for t in tensors:
        kind = block_kind(family.to_hf(t.name))
        rows = t.shape[1] if family.is_conv1d(t.name) else t.shape[0]  # transformers' rows: Conv1D's are transposed
        total += t.numel + {"adam": t.numel, "heads": t.numel // heads, "rows": rows, "whole": 1}[kind]
    return total


def ratio_trained(hf_names: list[str]) -> list[bool]:
    """BAdam ratio mode's tensors (pipeline.train.badam.RatioAdam): all but the first whose transformers name holds
    `embed` and the first holding `lm_head` (badam's embedding_layer / lm_head_layer, block_optim.py:591-594, 615-625)."""
    frozen = {next((i for i, name in enumerate(hf_names) if word in name), None) for word in ("embed", "lm_head")}
    return [i not in frozen for i in range(len(hf_names))]


def _ratio_bytes(values: Mapping[str, Any], tensors: list[TensorSpec], width: int) -> int:
    """Ratio mode's state over its trained tensors: m and v of each window, and each tensor's step count."""
    return sum(2 * int(t.numel * values["badam_update_ratio"]) * width + STEP_BYTES for t in tensors)


def badam_blocks(cfg: ModelConfig, tensors: list[TensorSpec]) -> list[str | None]:
    """Each tensor's BAdam block, by its transformers name: the first prefix (block_prefixes) the name holds, None
    for the tensors outside the decoder layers (pipeline.train.badam.badam_groups)."""
    family = cfg.hf
    names = [family.to_hf(t.name) for t in tensors]
    prefixes = block_prefixes(names)
    return [next((prefix for prefix in prefixes if prefix in name), None) for name in names]


def _layers(cfg: ModelConfig, tensors: list[TensorSpec]) -> list[list[TensorSpec]]:
    """The tensors of each BAdam block (decoder layer), the tensors in no block left out."""
    per_block: dict[str, list[TensorSpec]] = {}
    for t, block in zip(tensors, badam_blocks(cfg, tensors)):
        if block is not None:
            per_block.setdefault(block, []).append(t)
    return list(per_block.values())


def _largest_block_bytes(cfg: ModelConfig, tensors: list[TensorSpec], width: int) -> int:
    """BAdam's peak: the decoder layer whose m, v and step counts take the most bytes."""
    return max((sum(2 * t.numel * width + STEP_BYTES for t in layer) for layer in _layers(cfg, tensors)), default=0)


def stepped(values: Mapping[str, Any], cfg: ModelConfig, tensors: list[TensorSpec]) -> list[TensorSpec]:
    """The tensors the optimizer steps (DeepSpeed's mixed precision keeps an fp32 master copy of each): all the
    trained ones, or under BAdam those in a decoder layer (the embedding, final norm and head never train)."""
    if not values["use_badam"]:
        return tensors
    if values["badam_mode"] == "ratio":
        family = cfg.hf
        return [t for t, keep in zip(tensors, ratio_trained([family.to_hf(t.name) for t in tensors])) if keep]
    return [t for t, block in zip(tensors, badam_blocks(cfg, tensors)) if block is not None]


def with_gradients(values: Mapping[str, Any], cfg: ModelConfig, tensors: list[TensorSpec]) -> list[TensorSpec]:
    """The trained tensors that hold a gradient at once, at the peak: all of them, but under BAdam's layer mode the
    largest decoder layer's alone (only the active layer requires gradients, the others' are dropped at each
    switch: pipeline.train.badam.BlockAdamW._activate) and under its ratio mode every tensor it steps (the gradient
    is dense, zeroed outside the window: RatioAdam._mask_gradient; the embedding and the head are frozen)."""
    if not values["use_badam"] or values["badam_mode"] == "ratio":
        return stepped(values, cfg, tensors)
    return max(_layers(cfg, tensors), key=lambda layer: sum(t.numel for t in layer), default=[])


def state_bytes(values: Mapping[str, Any], cfg: ModelConfig, tensors: list[TensorSpec], width: int) -> int:
    """Bytes of the recipe's optimizer state over the trained `tensors`, each number `width` bytes (module
    docstring); the optimizer as pipeline.train.optim.make_optimizer picks it."""
    if values["use_muon"]:
        family = cfg.hf
        return width * sum(t.numel * (1 if takes_muon(family.to_hf(t.name), len(t.shape)) else 2) for t in tensors)
    if values["use_galore"]:
        return width * _low_rank_numbers(values, "galore", cfg, tensors)
    if values["use_apollo"]:
        return width * _low_rank_numbers(values, "apollo", cfg, tensors)
    if values["use_adam_mini"]:
        return width * _adam_mini_numbers(cfg, tensors)
    if values["use_badam"] and values["badam_mode"] == "ratio":
        return _ratio_bytes(values, stepped(values, cfg, tensors), width)
    if values["use_badam"]:
        return _largest_block_bytes(cfg, tensors, width)
    if values["optim"] == "sgd":  # torch's SGD keeps a momentum buffer per tensor only with momentum
        return sum(t.numel * width for t in tensors) if optim_kwargs("sgd", values.get("optim_args")).get("momentum") else 0
    if values["optim"] in ("adagrad", "rmsprop"):
        return sum(t.numel * width + STEP_BYTES for t in tensors)
    if values["optim"] == "adafactor":
        return sum(4 * (_adafactor_numbers(t.shape) + 1) for t in tensors)
    return sum(2 * t.numel * width + STEP_BYTES for t in tensors)


def _adafactor_numbers(shape: tuple[int, ...]) -> int:
    """Adafactor's second-moment numbers for a tensor of `shape`: its row and column means when it has 2 or more
    dimensions (transformers' _get_options: factored), else one per element."""
    if len(shape) < 2:
        return math.prod(shape)
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]
