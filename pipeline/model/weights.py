"""Weights in and out: presets (seeded random init), Hugging Face checkpoints of every supported family,
our own checkpoints.

Everything is safetensors; nothing is unpickled. Names go through the family's map
(pipeline.model.families): HF GPT-2 stores its projections as Conv1D (in x out), the transpose of our
nn.Linear (out x in); Llama and Qwen use our names under `model.`. Directories are written with
pipeline.io.atomic_dir: they appear complete or not at all.
"""
from __future__ import annotations

import math
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.errors import UserError
from pipeline.io import atomic_dir, write_json
from pipeline.launched import first_rank
from pipeline.model.config import (PRESETS, ModelConfig, checkpoint_kind, config_path, read_config, read_raw,
                                   to_hf_config, to_own_config)
from pipeline.model.families import GPT2, Family, check_exportable
from pipeline.model.adapter import cast_keeping_adapters
from pipeline.model.gpt import GPTModel, held_dtype
from pipeline.model.memory import dense_weight
from pipeline.model.quant_layout import stored_part
from pipeline.model.reward import new_score_weight
from pipeline.model.safetensors_header import INDEX, SINGLE, shard_files

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
MAX_TENSOR_PROBLEMS = 8


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------

def load_model(name_or_path: str | Path, *, seed: int = 0, cfg: ModelConfig | None = None,
               dtype: torch.dtype = torch.float32) -> GPTModel:
    """A GPTModel from a preset (random, seeded), an HF checkpoint directory or one of our checkpoints.

    `cfg` may override the checkpoint's config where the weights allow it (dropout, a shorter
    context: the position table is cut; untying a tied head: it starts as a copy of wte; num_labels 1 on a
    language model: a reward model, its score head drawn from `seed`, pipeline.model.reward). `dtype`: the
    weights' dtype, each tensor cast as it is read (read_tensors says why).
    """
    if str(name_or_path) in PRESETS:
        return cast_keeping_adapters(GPTModel(cfg or PRESETS[str(name_or_path)], seed=seed), dtype)
    directory, file_cfg, kind = _checkpoint(name_or_path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    state = read_state_dict(directory, kind=kind, cfg=file_cfg, dtype=dtype, parts=parts)
    stored = _stored_quantized(state, parts)
    if cfg is not None and cfg.num_labels and not file_cfg.num_labels:  # a language model becomes a reward model
        state.pop("lm_head.weight", None)  # XForSequenceClassification has no LM head; a new score head instead
        stored.pop("lm_head.weight", None)  # nor a stored 4/8-bit one (a skip list without lm_head quantizes it)
        state["score.weight"] = (directory, new_score_weight(cfg.emb_dim, seed, dtype))
    model = model_from_state_dict(file_cfg if cfg is None else cfg, state, source=directory, file_cfg=file_cfg,
                                  dtype=dtype, hf_names=kind != "pipeline")
    if stored:
        from pipeline.model.quant_layout import Quantization, stored_quantization
        from pipeline.model.quantize import load_stored

        spec = stored_quantization(read_raw(directory / "config.json").get("quantization_config"))
        load_stored(model, stored, spec or Quantization(4))  # no bnb config beside bnb tensors: BitsAndBytesConfig's
    return model


def _stored_quantized(state: dict[str, tuple[Path, torch.Tensor]],
                      parts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A bitsandbytes checkpoint's quantized weights as Params4bit / Int8Params (pipeline.model.quantize.stored_weight),
    by our names; in `state` each is replaced by a meta placeholder of the weight's shape, so that model_from_state_dict
    checks it against the config as any weight (and its quant state must say the shape the model expects)."""
    if not parts:
        return {}
    from pipeline.model.quantize import stored_weight

    stored = {}
    for name, quant_state in parts.items():
        if name not in state:
            raise UserError(f"{', '.join(sorted(quant_state))} of '{name}' without its quantized weight: the checkpoint"
                            " is incomplete (download or save it again)")
        file, packed = state[name]
        stored[name] = weight = stored_weight(packed, quant_state)
        shape = weight.quant_state.shape if getattr(weight, "quant_state", None) is not None else weight.shape
        state[name] = (file, torch.empty(tuple(shape), dtype=torch.float32, device="meta"))
    return stored


def _checkpoint(name_or_path: str | Path) -> tuple[Path, ModelConfig, str]:
    """(directory, config, kind: hf | pipeline-v1 | pipeline) of a checkpoint reference (a hub id is resolved)."""
    path = config_path(name_or_path)
    assert path is not None, "a preset has no files"
    return path.parent, read_config(path.parent), checkpoint_kind(read_raw(path))


def read_tensors(files: list[Path], dtype: torch.dtype | None = None,
                 held_fp32: Callable[[str], bool] | None = None) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, key, tensor) of every tensor; with `dtype`, each tensor cast to it as it is read (to fp32 where
    `held_fp32(key)`: a tensor transformers holds fp32 in a model of `dtype`, Family.held_fp32).

    safetensors maps the whole file and hands out views of that one mapping, read from disk page by page
    when touched; the mapping lives until the last view is gone. Casting the views of one handle (or
    letting DeepSpeed cast the model later, as before) therefore touches every page while the mapping is
    alive: the whole fp32 file is resident next to its bf16 copy (gpt2-small: 497 + 248 MB). With a
    different `dtype`, each tensor is read through a handle of its own and cast, and its mapping goes as
    soon as the cast is done: only one fp32 tensor is resident at a time (bench/README.md, "Gradient
    checkpointing").
    """
    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                for key in handle.keys():
                    target = torch.float32 if dtype is not None and held_fp32 is not None and held_fp32(key) else dtype
                    if target is None or handle.get_slice(key).get_dtype() in (_SAFETENSORS_NAMES.get(target), "U8",
                                                                                "I8") \
                            or stored_part(key):  # a quantized weight's state: read as bitsandbytes wrote it
                        yield file, key, handle.get_tensor(key)
                        continue
                    with safe_open(file, framework="pt") as own:
                        tensor = own.get_tensor(key).to(target)
                    yield file, key, tensor
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            if Path(file).is_file() and not os.access(file, os.R_OK):  # safetensors says "No such file" for it
                raise UserError(f"{file}: this user may not read it (permission denied, mode "
                                f"{stat.filemode(Path(file).stat().st_mode)}); give it read permission (chmod a+r) "
                                "or run as its owner") from None
            raise UserError(f"{file}: not a readable safetensors file ({err}); it may be truncated or corrupt"
                            " (download or save it again)") from None


def read_state_dict(directory: Path, *, kind: str, cfg: ModelConfig, dtype: torch.dtype | None = None,
                    parts: dict[str, dict[str, torch.Tensor]] | None = None) -> dict[str, tuple[Path, torch.Tensor]]:
    """Our parameter names -> (file, tensor), through the family's name map (iter_state_dict)."""
    return {name: (file, tensor) for name, file, tensor in iter_state_dict(directory, kind=kind, cfg=cfg, dtype=dtype,
                                                                           parts=parts)}


def iter_state_dict(directory: Path, *, kind: str, cfg: ModelConfig, dtype: torch.dtype | None = None,
                    parts: dict[str, dict[str, torch.Tensor]] | None = None) -> Iterator[tuple[str, Path, torch.Tensor]]:
    """(our parameter name, file, tensor), one tensor at a time, as read_tensors reads them.

    kind "hf": HF names (with or without the model prefix), buffers skipped, Conv1D weights transposed;
    "pipeline-v1": our GPT-2-only format 1 (HF GPT-2 names without prefix, nn.Linear layout); "pipeline": ours.
    `parts`: where a bitsandbytes checkpoint's quant-state tensors go (our weight name -> {part: tensor},
    quant_layout.stored_part), its quantized weights yielded as stored (uint8 / int8, never transposed: transformers
    quantizes a Conv1D's weight as out x in); None yields them as any tensor.
    """
    family = GPT2 if kind == "pipeline-v1" else cfg.hf
    files = shard_files(directory)
    fused = kind == "hf" and family.moe is not None and family.moe.fused_experts
    packed: dict[str, dict[str, torch.Tensor]] = {}  # MXFP4 experts: a fused tensor's blocks or scales, till both came
    def held_fp32(key: str) -> bool:  # the file's names: HF names, or ours in our own format
        return family.held_fp32(family.canonical(key) if kind != "pipeline" else family.to_hf(key), dtype)
    for file, key, tensor in read_tensors(files, dtype, held_fp32):
        name = key
        if kind != "pipeline":
            if key.endswith(family.skip) or family.is_carried(key):
                continue  # a buffer, or a wrapper's other tower (a vision tower: the export copies it)
            part = stored_part(key) if parts is not None else None
            if part:
                parts.setdefault(family.from_hf(part[0]), {})[part[1]] = tensor
                continue
            mxfp4 = _MXFP4.match(family.strip(key)) if fused else None
            if mxfp4:
                parts = packed.setdefault(mxfp4.group(1), {})
                parts[mxfp4.group(2)] = tensor
                if len(parts) < 2:
                    continue
                key, tensor = mxfp4.group(1), dequantize_mxfp4(parts["blocks"], packed.pop(mxfp4.group(1))["scales"],
                                                               dtype or torch.float32)
            if fused and _FUSED_EXPERTS.match(family.strip(key)):
                for name, part in split_experts(family.strip(key), tensor):
                    yield name, file, part
                continue
            name = family.from_hf(key)
            if family.is_mtp(name, cfg.n_layers):
                continue  # GLM-4.5's multi-token-prediction layer, which Glm4MoeForCausalLM does not load either
            if kind == "hf":
                if name == "lm_head.weight" and cfg.tie_weights:
                    _check_tied_head(directory, files, family, file, key, tensor)
                    continue  # a copy of the embedding, which is the head
                if family.is_conv1d(name) and tensor.is_floating_point():
                    tensor = tensor.t()  # a view: model_from_state_dict makes every parameter dense
        yield name, file, tensor


# GptOssExperts' fused parameters (modeling_gpt_oss.py:68-78): gate_up_proj (E, H, 2I), its columns gate, up, gate,
# up, ... (_apply_gate reads gate_up[..., ::2] and [..., 1::2]); gate_up_proj_bias (E, 2I) alike; down_proj (E, I, H),
# x @ W (the transpose of a Linear's weight); down_proj_bias (E, H)
_FUSED_EXPERTS = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)(_bias)?$")


# MXFP4 experts as the hub stores gpt-oss (quantization_config quant_method mxfp4): each fused weight's `_blocks`
# (uint8, (E, rows, cols / 32, 16): two 4-bit E2M1 codes a byte, the low nibble first) and `_scales` (uint8, (E, rows,
# cols / 32): one power-of-two exponent + 127 per 32 values); dequantized as transformers' convert_moe_packed_tensors
# (integrations/mxfp4.py:229-285) and Mxfp4Config(dequantize=True), which LLaMA-Factory loads them with
_MXFP4 = re.compile(r"^(layers\.\d+\.mlp\.experts\.(?:gate_up_proj|down_proj))_(blocks|scales)$")
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # E2M1 codes


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(E, rows, groups, 16) blocks and (E, rows, groups) scales -> the fused weight (E, groups * 32, rows) in `dtype`.
    Every value is a code times a power of two: exact in fp32, cast once (transformers computes in `dtype`, the same
    numbers but where a product leaves its range). One expert at a time: the codes' index tensors of a whole
    gpt-oss-20b layer would take 2 GB."""
    if blocks.shape[:-1] != scales.shape:
        raise UserError(f"MXFP4 blocks {list(blocks.shape)} do not fit scales {list(scales.shape)}; expected the"
                        " blocks' shape without its last dimension")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    out = []
    for codes, exponents in zip(blocks.to(torch.uint8), scales.to(torch.int32) - 127):
        values = torch.stack([lut[(codes & 0x0F).long()], lut[(codes >> 4).long()]], dim=-1)  # (rows, groups, 16, 2)
        values = torch.ldexp(values, exponents[..., None, None].float())
        out.append(values.reshape(codes.shape[0], -1).t().to(dtype))
    return torch.stack(out)


def split_experts(key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """A fused expert tensor (prefix-less HF name) -> our per-expert Linear parameters (views; made dense at
    assignment)."""
    match = _FUSED_EXPERTS.match(key)
    assert match is not None, key
    layer, which, bias = match.groups()
    leaf = "bias" if bias else "weight"
    out = []
    for e in range(tensor.shape[0]):
        base = f"layers.{layer}.mlp.experts.{e}."
        if which == "down_proj":
            out.append((base + "down_proj." + leaf, tensor[e] if bias else tensor[e].t()))
            continue
        for j, proj in enumerate(("gate_proj", "up_proj")):
            out.append((base + f"{proj}.{leaf}", tensor[e][j::2] if bias else tensor[e][:, j::2].t()))
    return out


def fuse_experts(state: dict[str, torch.Tensor], n_layers: int, n_experts: int) -> dict[str, torch.Tensor]:
    """The inverse of split_experts over a whole state dict (our names): each block's per-expert parameters
    replaced by GptOssExperts' four fused ones (prefix-less HF names)."""
    out = dict(state)
    for i in range(n_layers):
        def take(e: int, proj: str, leaf: str) -> torch.Tensor:
            return out.pop(f"layers.{i}.mlp.experts.{e}.{proj}.{leaf}")
        gate_up, gate_up_bias, down, down_bias = [], [], [], []
        for e in range(n_experts):
            gate_w, up_w = take(e, "gate_proj", "weight"), take(e, "up_proj", "weight")
            gate_b, up_b = take(e, "gate_proj", "bias"), take(e, "up_proj", "bias")
            gate_up.append(torch.stack([gate_w.t(), up_w.t()], dim=-1).flatten(-2))  # (H, 2I) interleaved
            gate_up_bias.append(torch.stack([gate_b, up_b], dim=-1).flatten())
            down.append(take(e, "down_proj", "weight").t())
            down_bias.append(take(e, "down_proj", "bias"))
        prefix = f"layers.{i}.mlp.experts."
        out.update({prefix + "gate_up_proj": torch.stack(gate_up), prefix + "gate_up_proj_bias": torch.stack(gate_up_bias),
                    prefix + "down_proj": torch.stack(down), prefix + "down_proj_bias": torch.stack(down_bias)})
    return out


def _check_tied_head(directory: Path, files: list[Path], family: Family, file: Path, key: str,
                     head: torch.Tensor) -> None:
    """A UserError when a tied config's files hold a head that is not the embedding.

    No reading is right for both transformers versions then (5 keeps the file's head untied, 4 ties it), and
    dropping the head silently gave transformers 5 users other logits. An equal copy (some exporters write
    one) is the embedding. The embedding is read again here, by key: only such checkpoints pay for it; files
    without one are left to model_from_state_dict (a missing tensor).
    """
    for other in files:
        with safe_open(other, framework="pt") as handle:
            embed = next((k for k in handle.keys() if family.from_hf(k) == "embed_tokens.weight"), None)
            if embed is None:
                continue
            if torch.equal(handle.get_tensor(embed).to(head.dtype), head):
                return
        raise UserError(f"{file}: tensor '{key}' differs from the embedding '{embed}', but {directory / 'config.json'}"
                        " says tie_word_embeddings: true (the head is then the embedding, and this tensor is not"
                        " used); to use this head, set \"tie_word_embeddings\": false in config.json (transformers 5"
                        " keeps it untied); to tie, remove lm_head.weight from the file")


def checkpoint_tensors(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(our parameter name, tensor in `dtype`) of a checkpoint, read as they are asked for: the whole model is
    never in memory at once (read_tensors)."""
    directory, cfg, kind = _checkpoint(name_or_path)
    for name, _, tensor in iter_state_dict(directory, kind=kind, cfg=cfg, dtype=dtype):
        yield name, tensor


def model_from_state_dict(cfg: ModelConfig, state: Mapping[str, tuple[Path, torch.Tensor]], *, source: Path,
                          file_cfg: ModelConfig | None = None, dtype: torch.dtype = torch.float32,
                          hf_names: bool = False) -> GPTModel:
    """Check every key and shape against GPTModel(cfg) and assign the tensors (no random init first)."""
    file_cfg = file_cfg or cfg
    state = dict(state)
    if cfg.context_length < file_cfg.context_length and "pos_embed.weight" in state:
        file, wpe = state["pos_embed.weight"]
        state["pos_embed.weight"] = (file, wpe[: cfg.context_length])
    if not cfg.num_labels and not cfg.tie_weights and file_cfg.tie_weights and "lm_head.weight" not in state and "embed_tokens.weight" in state:
        file, wte = state["embed_tokens.weight"]
        state["lm_head.weight"] = (file, wte.clone())
    family = file_cfg.hf

    def shown(key: str) -> str:  # a tensor as the user's files name it (HF names without the model prefix)
        return family.strip(family.to_hf(key)) if hf_names else key
    with torch.device("meta"):
        model = GPTModel(cfg, seed=None)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if cfg.tie_weights:
        expected.pop("lm_head.weight", None)
    problems = []
    for key, shape in expected.items():
        if key not in state:
            problems.append(f"{source}: missing tensor '{shown(key)}' (expected shape {list(shape)})"
                            f"{_untied_hint(key, shape, state, shown, source) if hf_names else ''}")
        elif tuple(state[key][1].shape) != shape:
            file, tensor = state[key]
            problems.append(f"{file or source}: tensor '{shown(key)}' has shape {list(tensor.shape)},"
                            f" the model expects {list(shape)}")
    for key in sorted(set(state) - set(expected)):
        file, tensor = state[key]
        problems.append(f"{file or source}: unexpected tensor '{shown(key)}' (shape {list(tensor.shape)})")
    if problems:
        if len(problems) > MAX_TENSOR_PROBLEMS:  # weights of another model size: the first ones say enough
            problems = problems[:MAX_TENSOR_PROBLEMS] + [
                f"{source}: ... and {len(problems) - MAX_TENSOR_PROBLEMS} more tensors that do not fit; these weights"
                f" belong to another model than config.json describes ({file_cfg.n_layers} layers, width"
                f" {file_cfg.emb_dim})"]
        changed = _shape_diff(file_cfg, cfg)
        if changed:
            problems.append(f"{source}: the recipe changed the checkpoint's config ({changed});"
                            " these weights do not fit the changed shapes")
        raise UserError(problems)
    # assign=True makes these tensors the parameters themselves: they must be dense whatever their source
    # (a transposed or sliced view would reach DeepSpeed, which views every parameter as bytes). Copies made
    # here (dtype conversion) land on huge pages where the OS offers them (pipeline.model.memory: decoding reads
    # every weight per token).
    model.load_state_dict({k: dense_weight(state[k][1], held_dtype(cfg, k, dtype)) for k in expected}, assign=True,
                          strict=False)
    model.tie_weights()
    return model


def _untied_hint(key: str, shape: tuple[int, ...], state: Mapping[str, tuple[Path, torch.Tensor]],
                 shown: Callable[[str], str], source: Path) -> str:
    """Why an HF checkpoint lacks its lm_head.weight when the embedding of that shape is there: a tied model whose
    config.json leaves out tie_word_embeddings, which then means false (LlamaConfig, Qwen2Config, Qwen3Config)."""
    embedding = state.get("embed_tokens.weight")
    if key != "lm_head.weight" or embedding is None or tuple(embedding[1].shape) != shape:
        return ""
    return (f"; the files hold the embedding '{shown('embed_tokens.weight')}' of that shape, so the model is likely"
            f" tied: set \"tie_word_embeddings\": true in {source / 'config.json'} (its default is false)")


# ModelConfig fields that size no tensor: a recipe that changes them (dropout 0.0 where GPT-2's config.json says
# 0.1) is never why weights do not fit, and naming them sends the user to the recipe for a config.json problem.
_NO_SHAPE = frozenset({"drop_rate", "norm_eps", "rope_theta", "rope_scaling"})


def _shape_diff(a: ModelConfig, b: ModelConfig) -> str:
    """`key a -> b, ...` for the fields that set tensor shapes and differ; "" when none does."""
    da, db = a.to_dict(), b.to_dict()
    return ", ".join(f"{k} {da[k]!r} -> {db[k]!r}" for k in da if k not in _NO_SHAPE and da[k] != db[k])


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------

def plain_state_dict(model: GPTModel) -> dict[str, torch.Tensor]:
    """Our names -> tensors, the tied head left out (safetensors refuses shared storage)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if any(".lora." in k or ".oft." in k for k in state):  # an adapter's branch (by name: pipeline.model.lora and
        # pipeline.model.oft import this module)
        raise ValueError("the model still holds LoRA wrappers (or OFT's): merge_lora(model) first, or save_adapter()")
    if model.cfg.tie_weights:
        state.pop("lm_head.weight", None)
    return state


def save_model(model: GPTModel, directory: str | Path, dtype: str = "fp32", source: str | Path | None = None) -> Path:
    """Our own checkpoint: config.json ("format": "pipeline-gpt", with torch_dtype as transformers names the
    weights' dtype) + model.safetensors in our names. A wrapped model (an image-text checkpoint's decoder) with its
    `source` folder (the checkpoint it was read from, or a folder of ours that carries one) also gets the rest of
    that source (pipeline.model.wrapped.carry), so that the folder exports the whole image-text model."""
    state = {k: v.to(DTYPES[dtype]).contiguous().cpu() for k, v in plain_state_dict(model).items()}
    with atomic_dir(directory) as tmp:
        write_json(tmp / "config.json", to_own_config(model.cfg, torch_name(dtype)))
        save_file(state, str(tmp / SINGLE), metadata={"format": "pt"})
        if model.cfg.wrapper and source is not None:
            from pipeline.model.wrapped import carry

            carry(model.cfg, source, tmp)
    return Path(directory)


def torch_name(dtype: str) -> str:
    """"bf16" -> "bfloat16": config.json's torch_dtype for one of DTYPES."""
    return str(DTYPES[dtype]).removeprefix("torch.")


def hf_state_dict(model: GPTModel, dtype: str = "fp32") -> dict[str, torch.Tensor]:
    """The family's HF names and layout (GPT-2: Conv1D); GPT-2 without qkv bias gets zeros (it always has one)."""
    cfg = model.cfg
    family = cfg.hf
    problems = [p for p in check_exportable(cfg) if not (family is GPT2 and "qkv_bias" in p)]
    if problems:
        raise UserError([f"export: {p}; this model cannot be written in the {family.architecture} layout"
                         for p in problems])
    out: dict[str, torch.Tensor] = {}
    state = plain_state_dict(model)
    if family.moe is not None and family.moe.fused_experts:  # GPT-OSS: the fused expert tensors, HF-named already
        state = fuse_experts(state, cfg.n_layers, cfg.n_experts)
    for name, tensor in state.items():
        if family.is_conv1d(name):
            tensor = tensor.t()
        key = family.prefix + name if _FUSED_EXPERTS.match(name) else family.to_hf(name)
        out[key] = tensor.to(DTYPES[dtype]).contiguous().cpu()
    if family is GPT2 and not cfg.qkv_bias:  # GPT2LMHeadModel always has a c_attn bias; zeros are the same function
        for i in range(cfg.n_layers):
            out[f"transformer.h.{i}.attn.c_attn.bias"] = torch.zeros(3 * cfg.emb_dim, dtype=DTYPES[dtype])
    return out


def _shards(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if max_bytes and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def default_special_ids(cfg: ModelConfig) -> dict[str, int | None]:
    """bos/eos/pad ids when the caller knows no tokenizer: GPT-2's <|endoftext|> for GPT-2, none otherwise."""
    if cfg.family == "gpt2":
        from pipeline.data.tokenizer import gpt2

        tok = gpt2()
        return {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {}


def save_hf(model: GPTModel, directory: str | Path, dtype: str = "fp32", max_shard_bytes: int | None = None,
            special: Mapping[str, Any] | None = None, config_ids: Mapping[str, Any] | None = None,
            source: str | Path | None = None) -> Path:
    """The family's Hugging Face layout (loads with transformers.AutoModelForCausalLM.from_pretrained; a reward
    model as XForSequenceClassification with AutoModelForSequenceClassification).

    Writes config.json (the family's architectures), generation_config.json (`special`: bos/eos/pad
    token ids, GPT-2's 50256 by default) and model.safetensors, or model-0000i-of-0000n.safetensors +
    model.safetensors.index.json when larger than max_shard_bytes. Tokenizer files are the caller's
    (merge copies the base checkpoint's, or writes GPT-2's). config.json's ids are `special`'s (the first
    of a list), except those `config_ids` gives: merge passes the base config.json's own eos_token_id, so
    that model.config.eos_token_id stays what the base model said. A wrapped model (ModelConfig.wrapper: an
    image-text checkpoint's decoder) is written around `source`, the checkpoint it was read from
    (pipeline.model.wrapped: its other towers, config.json and processor files).
    """
    if dtype not in DTYPES:
        raise UserError(f"export_dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    state = hf_state_dict(model, dtype)
    special = dict(default_special_ids(model.cfg) if special is None else special)
    ids = {k: (v[0] if isinstance(v, list) and v else v) for k, v in special.items()
           if k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids.update(config_ids or {})
    config = to_hf_config(model.cfg, torch_name(dtype), ids)
    with atomic_dir(directory) as tmp:
        if model.cfg.wrapper:
            from pipeline.model.wrapped import around

            state, config = around(model.cfg, state, config, source, tmp)
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", special)
        write_safetensors(state, tmp, max_shard_bytes)
    return Path(directory)


def write_safetensors(state: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int | None,
                      progress: bool = False) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json when larger than
    max_shard_bytes (transformers' names); progress: a bar per file, for writes that take minutes."""
    from tqdm import tqdm

    shards = _shards(state, max_shard_bytes)
    names = ([SINGLE] if len(shards) == 1 else
             [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)])
    for name, shard in tqdm(list(zip(names, shards)), desc="write weights", unit="file", disable=not progress):
        save_file({k: t.contiguous() for k, t in shard.items()}, str(directory / name), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        write_json(directory / INDEX, {"metadata": {"total_size": total},
                                       "weight_map": {k: n for n, s in zip(names, shards) for k in s}})


def shard_bytes_from_gb(gigabytes: float | None) -> int | None:
    """export_size (GB) -> bytes, as transformers' max_shard_size='5GB' counts (10^9)."""
    return None if gigabytes is None else max(1, math.floor(gigabytes * 1e9))


def note(message: str) -> None:
    """Status lines go to stderr so that `generate` keeps stdout for the completion only; rank 0's alone (every rank
    of a launched job loads the same model and would say the same line once per rank)."""
    if first_rank():
        print(message, file=sys.stderr, flush=True)
