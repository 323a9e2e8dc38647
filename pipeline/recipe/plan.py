"""`plan`: the resolved recipe with provenance, the derived numbers, the DeepSpeed JSON and a memory estimate.

Torch is never imported: the parameter counts come from pipeline.model.config's torch-free layout.

Memory per rank (bytes; w = 2 with bf16/fp16/pure_bf16 (a LoRA / OFT adapter's own weights 4 there), else 4;
P = all parameters of the model train builds, an adapter's own included, T = trainable ones, N = world size):
    parameters   P * w                      ZeRO-3: / N;   offload_param: moved to CPU
    gradients    T_g * w                    ZeRO-2/3: / N;  ZeRO-1/2: + the reduce bucket's staging buffer,
                                            reduce_bucket_size * w (DeepSpeed allocates it whole, per rank);
                                            T_g = T, but BAdam's largest decoder layer (only the active layer
                                            has gradients), ratio mode's all but embedding and head (dense)
    optimizer    S*4 (+ T_s*4 if w == 2)    the optimizer's state, S numbers over the trained tensors, in fp32
                                            (+ fp32 master copies of the T_s tensors it steps under mixed precision);
                                            pure_bf16: S * 2, the state in bf16 and no fp32 master copy
                                            (+ T * 2 at ZeRO 1/2: DeepSpeed's bf16 partition copy);
                                            with LoRA / OFT the adapter's weights, gradients and state are
                                            fp32 (PEFT's upcast; 4 bytes in the lines above), additional_target
                                            modules' bf16 (ZeRO 1/2: DeepSpeed's bf16 is off, its fp32
                                            partition copy and fp32 state for those too);
                                            ZeRO-1/2/3: / N;   offload_optimizer: moved to CPU.
                                            S per tensor of n numbers (pipeline.model.optimizer_state, exact):
                                              AdamW      2n: m and v (+ torch's 4-byte fp32 step count
                                                         per tensor)
                                              Muon       n for its matrices (momentum), 2n for the rest
                                              GaLore     its matrices: m and v projected to rank k (rows x k,
                                                         k x cols, or k x k for full) + the basis; the rest 2n
                                              APOLLO     as GaLore, + one norm per matrix
                                              Adam-mini  n (m) + one v per block (element, head, row or tensor)
                                              BAdam      the largest decoder layer's 2n (+ a 4-byte fp32 step
                                                         count per tensor); T_s: the decoder layers;
                                                         ratio mode: 2 x int(n x badam_update_ratio) (+ the
                                                         step count) per tensor; T_s: all but embedding, head
    activations  L * s*b*h * (34 + 5*a*s/h) * w/2  +  s*b*V*4   (Korthikanti et al. 2022, no recomputation,
                                            plus fp32 logits for the loss; an upper bound: sft computes the
                                            head only where labels are trained). 34h is GPT-2's block; for
                                            GQA and SwiGLU blocks pipeline.model.config.activation_bytes
                                            counts q, k/v and the MLP at their own widths (a sparse MoE
                                            block: each chosen expert's copy of the row, its MLP, its output).
                 with gradient checkpointing (per block): L * s*b*h * w + one block's share + the logits
                 sft's use_asft_loss: the logits 3 times (the policy's log-softmax and the reference's softmax,
                                            both kept for the backward, and the KL's per-token terms)
    reference    stage dpo / kto / ppo, or sft's use_asft_loss, with a frozen reference copy (full / freeze, or
                                            ref_model): its parameters * w; LoRA / OFT: the kept starting copies
                                            of the additional_target modules (the adapters-off policy is the rest),
                                            ZeRO-3: / N (an engine of its own);   offload_param: moved to CPU
    reward_model stage ppo: the frozen reward model in the compute dtype, on every rank (reward_model_params), its
                                            quantized Linears packed (quantized_reward_saving); a LoRA reward
                                            adapter on a quantized base: + its own weights in fp32, unfolded
                                            (reward_adapter_params)
    rollout      stage ppo: 2*L*b*kv*(s + max_new_tokens)*d * w, the decoding KV cache of a micro-batch
                                            (kv key/value heads of d numbers; latent attention: 2*kv*d is
                                            kv_lora_rank + qk_rope_head_dim);   ZeRO-3: + P * w (pure_bf16: an
                                            adapter's in fp32), the policy gathered whole for decoding; + the step's
                                            rollout: b*accumulation*ppo_buffer_size rows x ((s + max_new_tokens)
                                            x 44 + 8) bytes (rollout_bytes)
with s = cutoff_len, b = per_device_train_batch_size (stage dpo: 2x, the chosen and the rejected sequences of a
pair go through one forward), h = width, a = heads, L = layers, V = vocabulary (50,257 for GPT-2, 128,256 for
Llama 3, 151,936 for Qwen).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.data.args import PAIRED_FORMS, data_form
from pipeline.recipe.args import data_args
from pipeline.recipe.typed import run_this_for
from pipeline.recipe import Resolved, batches_per_step, spec
from pipeline.recipe.check import DERIVED_KEYS
from pipeline.recipe.dsconfig import REDUCE_BUCKET_MAX
from pipeline.model.config import ModelConfig, TensorSpec, built_params, count_params
from pipeline.model.quant_layout import Quantization
from pipeline.recipe.modelinfo import model_info, recipe_tensors, scales_past_context
from pipeline.recipe.text import format_table
from pipeline.names import split_names, trains_adapter, uses_reference

if TYPE_CHECKING:
    from pipeline.model.reward_folder import RewardSource


@dataclass(frozen=True)
class Memory:
    params_total: int
    params_trainable: int
    gpu: dict[str, int]  # parameters, gradients, optimizer, activations -> bytes per rank on the accelerator
    cpu: dict[str, int]  # what offloading moved to host memory, per rank
    # quantization_bit: (bytes of the base's quantized Linear weights, what they would take unquantized), counted
    # in `parameters`
    quantized: tuple[float, float] | None = None

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())


ASFT_LOGITS = 3  # pipeline.model.asft: log p and q (N x V fp32, kept for the backward) and the KL terms


def estimate_memory(r: Resolved) -> Memory | None:
    """Per-rank memory for training, or None when the model cannot be read here."""
    info = model_info(r["model_name_or_path"])
    found = recipe_tensors(r, info) if info else None
    if info is None or found is None:
        return None
    from pipeline.model.optimizer_state import with_gradients
    from pipeline.recipe.precision import compute_bytes

    cfg, found_tensors = found
    head = value_head_tensors(r, cfg)
    tensors = found_tensors + head
    total, trainable = built_params(cfg, tensors) + sum(t.numel for t in head), sum(t.numel for t in tensors)
    ds = r.ds_config
    zero = ds.get("zero_optimization", {})
    stage = int(zero.get("stage", 0))
    world = r["world_size"]
    pure = bool(r["pure_bf16"])  # bf16 weights, gradients and Adam states, no master copy (DeepSpeed's bf16 off)
    half = bool(ds.get("bf16", {}).get("enabled")) or bool(ds.get("fp16", {}).get("enabled"))
    w = 2 if half or pure else 4
    upcast = sum(t.numel * (width(r, t, w) - w) for t in tensors)  # pure_bf16: an adapter's fp32 weights
    quantized = quantized_base(r, cfg, w)
    params = (total * w + upcast - (quantized[1] - quantized[0] if quantized else 0)) / (world if stage == 3 else 1)
    grads = sum(t.numel * width(r, t, w) for t in with_gradients(r, cfg, tensors)) / (world if stage >= 2 else 1)
    if stage in (1, 2) and zero.get("contiguous_gradients", True):  # in the adapter's fp32 under pure_bf16
        bucket_width = max((width(r, t, w) for t in tensors), default=w)
        grads += int(zero.get("reduce_bucket_size", REDUCE_BUCKET_MAX)) * bucket_width  # DeepSpeed's default
    optim = optimizer_bytes(r, cfg, tensors, pure, half, stage) / (world if stage >= 1 else 1)
    s = min(r["cutoff_len"], r["context_length"] or info.context_length)
    if scales_past_context(info, r["rope_scaling"], r["cutoff_len"]):  # dynamic NTK: rows run past the context
        s = r["cutoff_len"]
    from pipeline.model.config import activation_bytes

    pairs = 2 if data_form(r["stage"]) in PAIRED_FORMS else 1  # dpo, rm: chosen + rejected; kto: + KL, one forward
    b, h, L = r["per_device_train_batch_size"] * pairs, info.n_embd, info.n_layer
    V = 1 if r["stage"] == "rm" else info.vocab_size  # rm: one score per position, no vocabulary logits
    V *= ASFT_LOGITS if r["stage"] == "sft" and r["use_asft_loss"] else 1
    per_block = activation_bytes(info.config, s, b, w)
    if r["disable_gradient_checkpointing"]:
        activations = L * per_block + s * b * V * 4
    else:  # recomputation per block: each block's input is kept, and one block's activations at a time
        activations = L * s * b * h * w + per_block + s * b * V * 4
    gpu = {"parameters": params, "gradients": grads, "optimizer": optim, "activations": activations}
    reference = reference_params(r, count_params(cfg), found_tensors)  # without ppo's value head or an adapter
    if reference:
        gpu["reference"] = reference * w / (world if stage == 3 else 1)
    reward = reward_model_params(r, cfg)
    if reward:  # a plain module on every rank: neither ZeRO-3 partitioned nor offloaded
        gpu["reward_model"] = reward * compute_bytes(r) - quantized_reward_saving(r, cfg, compute_bytes(r)) \
            + 4 * reward_adapter_params(r)  # fp32, as upcast_adapter holds an adapter's own weights
    if r["stage"] == "ppo":  # under ZeRO 3 the whole policy is gathered for decoding, its adapter's weights too
        gpu["rollout"] = rollout_bytes(r, cfg, s, total * w + upcast if stage == 3 else 0)
    cpu: dict[str, float] = {}
    if stage == 3 and _offloaded(zero, "offload_param"):
        for key in ("parameters", "reference"):
            if key in gpu:
                cpu[key] = gpu.pop(key)
                gpu[key] = 0
    if stage >= 1 and _offloaded(zero, "offload_optimizer"):
        cpu["optimizer"] = gpu.pop("optimizer")
        gpu["optimizer"] = 0
    order = ("parameters", "gradients", "optimizer", "activations", "reference", "reward_model", "rollout")
    return Memory(total, trainable, {k: int(round(gpu[k])) for k in order if k in gpu},
                  {k: int(round(cpu[k])) for k in order if k in cpu}, quantized)


def quantized_base(r: Resolved, cfg: ModelConfig, w: int) -> tuple[float, float] | None:
    """quantization_bit: (bytes of the base's quantized Linear weights, the bytes they would take at `w`), or None."""
    from pipeline.model.quant_layout import base_weight_bytes

    spec = Quantization.of(r)
    if spec is None:
        return None
    spec, linears = quantized_linears(r["model_name_or_path"], cfg, spec)
    return base_weight_bytes(linears, spec, w)


def quantized_linears(model: str, cfg: ModelConfig, spec: Quantization) -> tuple[Quantization,
                                                                                 list[tuple[str, int, int]]]:
    """(the quantization, the Linears (path, in, out) of checkpoint `model` built as `cfg`) base_weight_bytes counts:
    a pre-quantized checkpoint's own quantization_config when `model` is one, its llm_int8_skip_modules (unsloth's
    dynamic quants) matched against the HF paths as transformers matches them; a tied head is the embedding, never a
    quantized Linear, and a Linear the checkpoint does not hold (stage rm's score head on a language model, drawn at
    load) is a plain one beside the stored codes, as the loader makes it (pipeline.model.weights.load_model)."""
    from pipeline.model.config import layout
    from pipeline.recipe.modelinfo import model_info, stored_quantization

    spec = stored_quantization(model) or spec
    hf = spec.skip_modules is not None
    info = model_info(model)
    held = None if info is None else {m.name for m in layout(info.config) if m.kind == "linear"}
    return spec, [(cfg.hf.to_hf(m.name) if hf else m.name, m.in_dim, m.out_dim) for m in layout(cfg)
                  if m.kind == "linear" and not (cfg.tie_weights and m.name == "lm_head")
                  and (held is None or m.name in held)]


def optimizer_bytes(r: Resolved, cfg: ModelConfig, tensors: list[TensorSpec], pure: bool, half: bool,
                    stage: int) -> int:
    """The optimizer's state over the trained `tensors` (pipeline.model.optimizer_state: what AdamW, Muon, GaLore,
    APOLLO, Adam-mini or BAdam keeps), in bf16 under pure_bf16 (plus ZeRO 1-2's bf16 partition copy of the
    weights DeepSpeed steps), else in fp32 (plus the fp32 master copy of the stepped tensors under bf16 / fp16
    mixed precision). pure_bf16 with LoRA / OFT: the adapter's state fp32 (its weights are), additional_target
    modules' bf16 at ZeRO 0; at ZeRO 1-2 DeepSpeed's bf16 is off, so all of it fp32, with an fp32 partition copy of
    the bf16 modules."""
    from pipeline.model.optimizer_state import state_bytes, stepped

    if pure and any(t.adapter for t in tensors):
        full = [t for t in tensors if not t.adapter]  # additional_target modules, bf16 as the base
        if stage in (1, 2):  # DeepSpeed's bf16 off: its ZeRO optimizer steps an fp32 partition copy of each tensor
            return state_bytes(r, cfg, tensors, 4) + 4 * sum(t.numel for t in full)
        return state_bytes(r, cfg, [t for t in tensors if t.adapter], 4) + state_bytes(r, cfg, full, 2)
    state = state_bytes(r, cfg, tensors, 2 if pure else 4)
    if pure:
        return state + (2 * sum(t.numel for t in tensors) if stage in (1, 2) else 0)
    return state + (4 * sum(t.numel for t in stepped(r, cfg, tensors)) if half else 0)


def width(r: Resolved, tensor: TensorSpec, w: int) -> int:
    """Bytes of one number of a trained tensor as the run holds it: the run's `w`, but under pure_bf16 a LoRA / OFT
    adapter's own weights (and their gradients) are fp32 (pipeline.recipe.precision.trained_dtype)."""
    from pipeline.recipe.precision import trained_dtype

    return {"fp32": 4, "bf16": 2}[trained_dtype(r, tensor.adapter)] if r["pure_bf16"] else w


def reference_params(r: Resolved, total: int, trained: list[TensorSpec]) -> int:
    """Parameters of the frozen reference copy of stage dpo / kto / ppo and of sft's use_asft_loss
    (pipeline.train.preference.starting_reference): ref_model's (its ref_model_adapters are folded into its weights:
    no parameters of their own), or the base's `total` for full / freeze; for LoRA / OFT, whose reference is the
    policy with its adapters off, the copies of the modules trained in full beside the adapter that it keeps as they
    start (pipeline.model.lora.keep_starting_modules: the `trained` tensors that are not the adapter's); 0 without
    a reference (orpo / simpo)."""
    if not (uses_reference(r["stage"], r["pref_loss"], r["use_asft_loss"]) or r["stage"] == "ppo"):
        return 0
    if r["ref_model"] is not None:
        info = model_info(r["ref_model"])
        return int(count_params(info.config)) if info is not None else total
    if trains_adapter(r["finetuning_type"]):
        return sum(t.numel for t in trained if not t.adapter)
    return total


def value_head_tensors(r: Resolved, cfg: ModelConfig) -> list[TensorSpec]:
    """Stage ppo's value head (pipeline.train.ppo.ValueHead: TRL's Linear(hidden, 1) with a bias), trained beside the
    policy's weights by the same optimizer; none for the other stages."""
    if r["stage"] != "ppo":
        return []
    return [TensorSpec("v_head.summary.weight", (1, cfg.emb_dim)), TensorSpec("v_head.summary.bias", (1,))]


def reward_model_params(r: Resolved, cfg: ModelConfig) -> int:
    """Parameters of stage ppo's frozen reward model (pipeline.train.ppo.load_reward_model), held in the compute
    dtype: under reward_model_type lora the policy's base built as a reward model (its score head in place of
    lm_head) with the adapter folded in, one more copy of the base; under full the reward model folder's own
    weights (0 when that folder cannot be read here); under api none (the reward server holds its model)."""
    if r["stage"] != "ppo" or r["reward_model"] is None or r["reward_model_type"] == "api":
        return 0
    if r["reward_model_type"] == "lora":
        return count_params(cfg.replace(num_labels=1)) + value_head_bias(r)
    from pipeline.recipe.run_folders import run_model

    info = model_info(run_model(r["reward_model"]))  # a hub id: only a cached snapshot (model_info downloads nothing)
    return count_params(info.config.replace(num_labels=1)) + value_head_bias(r) if info is not None else 0


def quantized_reward_saving(r: Resolved, cfg: ModelConfig, w: int) -> float:
    """What quantized weights save on stage ppo's reward model, counted at `w` bytes a parameter by
    reward_model_params: under reward_model_type lora quantization_bit's, its base the policy's, quantized as the
    policy's is, the reward adapter beside it unfolded (pipeline.train.ppo.load_reward_model; its own weights are
    reward_adapter_params'); under full a pre-quantized reward model folder's stored 4/8-bit Linears, which the
    load keeps as stored (pipeline.model.weights.load_model); 0 otherwise (an unquantized full reward model)."""
    if r["stage"] != "ppo" or r["reward_model_type"] not in ("lora", "full"):
        return 0.0
    quantized = quantized_base(r, cfg.replace(num_labels=1), w) if r["reward_model_type"] == "lora" \
        else stored_reward_bytes(r, w)
    return quantized[1] - quantized[0] if quantized else 0.0


def stored_reward_bytes(r: Resolved, w: int) -> tuple[float, float] | None:
    """A pre-quantized full reward model's (stage ppo's reward_model folder): (bytes of its stored 4/8-bit Linear
    weights, the bytes they would take at `w`), as reward_model_params builds it (num_labels 1); None for an
    unquantized folder or one not readable here."""
    from pipeline.model.quant_layout import base_weight_bytes
    from pipeline.recipe.modelinfo import stored_quantization
    from pipeline.recipe.run_folders import run_model

    folder = run_model(r["reward_model"])
    spec, info = stored_quantization(folder), model_info(folder)
    if spec is None or info is None:
        return None
    spec, linears = quantized_linears(folder, info.config.replace(num_labels=1), spec)
    return base_weight_bytes(linears, spec, w)


def reward_adapter_params(r: Resolved) -> int:
    """Stage ppo's LoRA reward adapter's own weights (LoRA's A and B, DoRA's magnitudes, OFT's rotations) where the
    policy's base is quantized: no fold fits a 4/8-bit weight, so they stay beside it (load_reward_model), in fp32.
    Counted from the adapter file's safetensors header (shapes only, no tensor read; a module it saves whole, the
    score head, takes the base's own place and is counted there); 0 otherwise, and for a folder not readable here."""
    from pipeline.model.config import is_adapter_tensor
    from pipeline.model.safetensors_header import safetensors_shapes
    from pipeline.names import ADAPTER_WEIGHTS

    if r["stage"] != "ppo" or r["reward_model_type"] != "lora" or r["quantization_bit"] is None:
        return 0
    source = _reward_source(r)
    shapes = safetensors_shapes(source.folder / ADAPTER_WEIGHTS) if source is not None else {}
    return sum(math.prod(shape) for key, shape in shapes.items() if is_adapter_tensor(key))


def value_head_bias(r: Resolved) -> int:
    """1 for LLaMA-Factory's value head (the score head's bias, pipeline.model.reward_folder), else 0 (0 too where
    _reward_source finds none)."""
    source = _reward_source(r)
    return int(source is not None and source.value_head is not None)


def _reward_source(r: Resolved) -> RewardSource | None:
    """What stage ppo's reward_model folder holds (pipeline.model.reward_folder); None for a folder not there yet or
    refused (the rule says why) or a hub id (plan downloads nothing)."""
    from pipeline.errors import UserError
    from pipeline.model.reward_folder import reward_source
    from pipeline.recipe.run_folders import reward_folder

    if not os.path.isdir(r["reward_model"]):
        return None
    try:
        kind = r["reward_model_type"]
        return reward_source(reward_folder(r["reward_model"], kind), kind, None)
    except UserError:
        return None


# What a step's rollout keeps through its last update (pipeline.train.ppo.PPOTrainer.rollout): a position's input_ids,
# attention_mask, labels (int64) and mask, log-probs, values, advantages, returns (fp32); a row's score and KL (fp32)
ROLLOUT_POSITION_BYTES, ROLLOUT_ROW_BYTES = 3 * 8 + 5 * 4, 2 * 4


def rollout_bytes(r: Resolved, cfg: ModelConfig, prompt: int, gathered: int) -> int:
    """What stage ppo's rollouts hold (pipeline.train.ppo.PPOTrainer): while the policy decodes (responses), the KV
    cache generate allocates for one micro-batch, per_device_train_batch_size prompts of at most `prompt` tokens
    (cutoff_len; cut to generate's room when longer) and their max_new_tokens, in the compute dtype
    (pipeline.model.config.kv_cache_bytes: layers x rows x (prompt + new tokens, at most 2 x window - 1 in a
    sliding-window layer) x kv_cache_values (2 x kv_heads x head_dim; latent attention's kv latent and rotated key
    part) x bytes); under ZeRO 3 also `gathered`, the whole parameters (P x w) gathered beside their partitions for
    decoding (deepspeed_compat.gathered_for_generation), not offloaded; and the step's rollout, kept through its
    updates: every row of the step (per_device_train_batch_size x batches_per_step: the whole ppo_buffer_size) at
    prompt + max_new_tokens positions (ROLLOUT_POSITION_BYTES, ROLLOUT_ROW_BYTES). Decoding runs before the step's
    forward and backward passes, so the total, which adds this to the activations, is an upper bound."""
    from pipeline.model.config import kv_cache_bytes
    from pipeline.recipe.precision import compute_bytes

    kv = kv_cache_bytes(cfg, r["per_device_train_batch_size"], prompt, r["max_new_tokens"], compute_bytes(r))
    rows = r["per_device_train_batch_size"] * batches_per_step(r)
    held = rows * ((prompt + r["max_new_tokens"]) * ROLLOUT_POSITION_BYTES + ROLLOUT_ROW_BYTES)
    return kv + gathered + held


def _offloaded(zero: dict[str, Any], key: str) -> bool:
    section = zero.get(key)
    return isinstance(section, dict) and section.get("device", "none") not in ("none", None)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def render(r: Resolved, exact: bool = False) -> str:
    """The plan's text; `exact`: the step counts are counted (after the length policy), not the built rows'."""
    out = [f"recipe: {r.recipe_path}" + (f" (extends {', '.join(r.files[1:])})" if len(r.files) > 1 else "")]
    out.extend(_made_first(r))
    for group, keys in spec.groups().items():
        out.append(f"\n[{group}]")
        out.append(format_table([(k, _show(r[k]), r.source(k)) for k in keys], header=("key", "value", "source")))
    out.append("\n[derived]")
    out.append(format_table([(k, _show(r[k]), _explain(r, k, exact)) for k in DERIVED_KEYS],
                            header=("key", "value", "how")))
    out.append("\n[deepspeed]" + (f" from {r['deepspeed']} (\"auto\" filled from the recipe)" if r["deepspeed"]
                                  else " generated from the recipe"))
    out.append(json.dumps(r.ds_config, indent=2))
    out.append("\n[memory per rank, training]")
    mem = estimate_memory(r)
    if mem is None:
        out.append(f"unknown: the model {r['model_name_or_path']!r} cannot be read here yet "
                   "(a checkpoint produced by another recipe?)")
    else:
        out.append(f"parameters: {mem.params_total:,} total, {mem.params_trainable:,} trainable "
                   f"({100 * mem.params_trainable / mem.params_total:.2f}%)")
        out.extend(filter(None, [trainable_blocks(r), quantization_line(r, mem)]))
        rows = [(k, human(v), human(mem.cpu[k]) if k in mem.cpu else "-") for k, v in mem.gpu.items()]
        rows.append(("total", human(mem.gpu_total), human(sum(mem.cpu.values())) if mem.cpu else "-"))
        out.append(format_table(rows, header=("", "accelerator", "offloaded to cpu")))
        out.append("(estimate: weights, gradients and optimizer states exact up to framework buffers; activations "
                   "an upper bound" + (" without recomputation)" if r["disable_gradient_checkpointing"] else
                                          " with per-block recomputation)"))
    return "\n".join(out)


def quantization_line(r: Resolved, mem: Memory) -> str | None:
    """What the parameters row counts for a QLoRA recipe: its base's Linears at 4 (8) bits plus their constants."""
    from pipeline.model.quant_layout import is_quantized_path

    spec = Quantization.of(r)
    info = model_info(r["model_name_or_path"])
    if spec is None or mem.quantized is None or info is None:
        return None
    quantized, unquantized = mem.quantized
    per = "0.5 byte" if spec.bits == 4 else "1 byte"
    spec, linears = quantized_linears(r["model_name_or_path"], info.config, spec)
    kept = sum(not is_quantized_path(name, spec.skip_modules) for name, _, _ in linears)
    rest = ("embeddings, norms and the output head" if spec.skip_modules is None else
            f"embeddings, norms and the {kept} Linears the checkpoint keeps unquantized (llm_int8_skip_modules)")
    return (f"quantization_bit {spec.bits}: the base's Linear weights counted at {per} a parameter + their "
            f"quantization constants ({spec.describe()}): {human(quantized)} instead of {human(unquantized)}; "
            f"{rest} at the run's precision")


def _made_first(r: Resolved) -> list[str]:
    """The upstream recipes make runs before this recipe's train or export (pipeline.recipe.deps), so that plan
    says what `make train` will run besides this recipe, as `make -n` does."""
    from pipeline.recipe.deps import upstreams

    found = upstreams(r)
    return [f"made first by make train / export: {', '.join(f'{recipe} ({goal})' for recipe, goal in found)}"] \
        if found else []


def trainable_blocks(r: Resolved) -> str:
    """Which blocks train when only some do (freeze, or use_llama_pro's expanded blocks), so that a user checks the
    ids against expand's output before a long run; "" otherwise or when the model cannot be read here."""
    from pipeline.model.config import freeze_blocks, llama_pro_blocks

    info = model_info(r["model_name_or_path"])
    kind, n = r["finetuning_type"], r["freeze_trainable_layers"]
    if info is None or kind not in ("freeze", "lora", "oft") or (kind != "freeze" and not r["use_llama_pro"]):
        return ""
    last = info.n_layer - 1
    modules, extra = r["freeze_trainable_modules"], r["freeze_extra_modules"]
    if kind == "freeze" and (modules != "all" or extra):
        blocks = llama_pro_blocks(info.n_layer, n) if r["use_llama_pro"] else freeze_blocks(info.n_layer, n)
        inside = "whole" if modules == "all" else f"their {', '.join(split_names(modules))}"
        return (f"trainable blocks: {', '.join(map(str, blocks))} of 0..{last} ({inside}: freeze_trainable_modules)"
                + (f"; outside the blocks: {', '.join(split_names(extra))} (freeze_extra_modules)" if extra else
                   "; nothing outside the blocks (freeze_extra_modules names what would)"))
    if not r["use_llama_pro"]:
        return f"trainable blocks: {', '.join(map(str, freeze_blocks(info.n_layer, n)))} of 0..{last} (the " \
               f"{'last' if n > 0 else 'first'} {abs(n)}: freeze_trainable_layers) and the final norm"
    what = {"freeze": "in full, nothing else", "lora": "LoRA on lora_target inside them",
            "oft": "OFT on lora_target inside them"}[kind]
    return (f"trainable blocks: {', '.join(map(str, llama_pro_blocks(info.n_layer, n)))} of 0..{last} (use_llama_pro:"
            f" the {n} blocks `python -m pipeline expand` inserted; {what})")


def _explain(r: Resolved, key: str, exact: bool = False) -> str:
    micro, accum, world = r["per_device_train_batch_size"], r["gradient_accumulation_steps"], r["world_size"]
    n = r["num_train_examples"]
    if key in ("world_size", "rank", "local_rank"):
        return f"{key.upper()} from the launcher (default {'1' if key == 'world_size' else '0'})"
    if key == "total_train_batch_size":
        return f"per_device_train_batch_size {micro} x gradient_accumulation_steps {accum} x world_size {world}"
    if key == "num_train_examples":
        if r["stage"] == "pt":
            return f"windows of cutoff_len {r['cutoff_len']} in the built train split's text (tokenized as train " \
                "does)" if exact else "pt: the trainer counts windows after tokenizing"
        if n is not None and exact and (r["packing"] or r["neat_packing"]):
            return f"packed rows of cutoff_len {r['cutoff_len']} (the built train split, tokenized and packed)"
        if n is None:
            return f"unknown until {run_this_for('data', r)}"
        trained = "splits.train in the built manifests" + (
            " (and splits.val of the datasets eval_dataset does not name: nothing else reads them)"
            if r["eval_dataset"] and set(r["dataset"]) - set(r["eval_dataset"]) else "")
        rows = f"{r['mix_strategy']} of {trained}, interleaved with seed {r['seed']}" \
            if r["mix_strategy"] != "concat" and len(r["dataset"]) > 1 else f"sum of {trained}"
        return f"{rows}: the rows that fit cutoff_len {r['cutoff_len']} (tokenized as train does)" if exact else rows
    if key == "steps_per_epoch":
        if n is None:
            return "needs num_train_examples"
        per_step = f"({accum} x ppo_buffer_size {r['ppo_buffer_size']})" if batches_per_step(r) != accum else accum
        return f"floor(floor({n} / ({micro} x {world})) / {per_step})"
    if key == "total_steps":
        if r["max_steps"] is not None:
            return "max_steps"
        return f"ceil(num_train_epochs {r['num_train_epochs']} x steps_per_epoch)" if n is not None else \
            "needs steps_per_epoch"
    if key == "num_warmup_steps":
        if r["warmup_steps"] is not None:
            return "warmup_steps"
        if r["warmup_ratio"] is not None:
            return f"ceil(warmup_ratio {r['warmup_ratio']} x total_steps)"
        return "no warmup set"
    return ""


def counted(r: Resolved) -> tuple[Resolved, bool]:
    """(`r` with the step counts train runs, True) once the built train split is tokenized as train does (the length
    policy's drops, sft's packs, pt's windows: pipeline.recipe.exact, validate's count too; read back where an earlier
    command kept it for the same build and settings: pipeline.data.counts); (`r`, False) with the
    built rows' counts when nothing trains, the data is not built or built with other settings than the recipe's (a
    changed val_size, overwrite_cache: true: train rebuilds it first, or refuses it; plan showed the recipe, and a
    count refused it), or the tokenizer is not on this machine yet."""
    from pipeline.data.load import build_problem, dataset_names
    from pipeline.recipe.exact import counted_steps

    data = data_args(r)
    built = r["num_train_examples"] is not None or r["stage"] == "pt"  # pt's windows: only a count knows them
    if not built or not r["do_train"] or any(build_problem(data, name) for name in dataset_names(data, "dataset")):
        return r, False
    found = counted_steps(r, data)
    return (r, False) if found is None else (found, True)


def run(r: Resolved, args: argparse.Namespace | None = None) -> int:
    if r["task"] is not None:  # a benchmark recipe: how eval will run it (nothing trains, so no steps or memory)
        from pipeline.recipe.benchmark import render as render_benchmark

        print(render_benchmark(r))
        return 0
    r, exact = counted(r)
    print(render(r, exact))
    from pipeline.recipe.notices import warmup_notice
    from pipeline.recipe.precision import bf16_notice
    from pipeline.recipe.rules import core

    for notice in (warmup_notice(r), bf16_notice(r, cuda=core.cuda_available())):  # the warmup: of the steps shown
        if notice:
            print(notice, file=sys.stderr)
    return 0
