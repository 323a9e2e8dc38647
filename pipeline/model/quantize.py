"""QLoRA's base: the frozen base Linears held by bitsandbytes in 4 bits (Linear4bit: nf4 / fp4, double quantization)
or 8 bits (Linear8bitLt), as transformers' BitsAndBytesConfig(load_in_4bit / load_in_8bit) loads a checkpoint for
LLaMA-Factory's `quantization_bit`.

Which Linears: every one transformers' bnb quantizer converts (integrations/bitsandbytes.py replace_with_bnb_linear,
minus quantizers/base.py get_keys_to_not_convert): all but the output head (lm_head, tied or not; a reward model's
score). Embeddings and norms are no Linears and stay in the run's precision. Sparse MoE blocks are refused: in
transformers 5 their experts are fused 3-D parameters and their router no Linear, so its quantizer leaves them in
full precision, while ours are per-expert Linears; quantizing them would give another model than the reference.

Why at load and frozen: QLoRA (Dettmers et al. 2023) keeps the base in 4 bits for the whole run; only the adapter
beside it (LinearWithLoRA, OFT) trains, in fp32 (pipeline.model.adapter.upcast_adapter), and the quantized layer is
called as it is, its matmul in the compute dtype (the run's precision, LLaMA-Factory's bnb_4bit_compute_dtype; a
pre-quantized checkpoint's own bnb_4bit_compute_dtype, stored_layer).

bitsandbytes is imported here only, and only when a recipe sets quantization_bit: every other run works without it.
Its CPU path (the torch fallback) is what the tests exercise; on CUDA the same calls use its kernels.
"""
from __future__ import annotations

import logging
from types import ModuleType
from typing import Mapping

import torch
from torch import nn

from pipeline.errors import UserError

from pipeline.model.quant_layout import BITS, SPARSE_MOE_REFUSED, Quantization, is_quantized_path

PIN = "bitsandbytes==0.50.2"  # requirements.txt's line
INT8_THRESHOLD = 6.0  # transformers' BitsAndBytesConfig llm_int8_threshold default (LLM.int8()'s outlier threshold)


def bitsandbytes() -> ModuleType:
    """The bitsandbytes module, or the one clear message a QLoRA recipe gets where it is not installed."""
    try:
        import bitsandbytes
    except ImportError as e:
        raise UserError(f"quantization_bit needs bitsandbytes, which is not installed ({e}); `make setup` installs "
                        f"it (requirements.txt: {PIN}), or pip install {PIN}") from None
    return bitsandbytes


def quantized_names(model: nn.Module) -> list[str]:
    """The Linears transformers' bnb quantizer would convert: all but the output heads."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and is_quantized_path(name)]


def quantize_model(model: nn.Module, spec: Quantization, compute_dtype: torch.dtype) -> list[str]:
    """Replace the base's Linears (quantized_names) by frozen bitsandbytes layers holding their weights; returns their
    paths. The weights are quantized from the values the model holds (the checkpoint's, in the dtype it was loaded
    in), as transformers quantizes each tensor it reads."""
    if spec.bits not in BITS:
        raise UserError(f"quantization_bit: given {spec.bits}, expected 4 or 8 (bitsandbytes)")
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "n_experts", 0):
        raise UserError("quantization_bit: " + SPARSE_MOE_REFUSED)
    bnb = bitsandbytes()
    names = quantized_names(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, _quantized(bnb, getattr(owner, child), spec, compute_dtype))
    return names


def _quantized(bnb: ModuleType, linear: nn.Linear, spec: Quantization, compute_dtype: torch.dtype) -> nn.Module:
    """One Linear as Linear4bit / Linear8bitLt with its weight and bias, frozen, on the Linear's device."""
    device, has_bias = linear.weight.device, linear.bias is not None
    weight = linear.weight.data
    if spec.bits == 4:
        layer = _linear4bit(bnb, linear, spec, compute_dtype)
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=spec.double_quant,
                                         quant_type=spec.quant_type, module=layer).to(device)
    else:
        layer = _linear8bit(bnb, linear)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to(device)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.train(linear.training)


def _linear4bit(bnb: ModuleType, linear: nn.Linear, spec: Quantization, compute_dtype: torch.dtype) -> nn.Module:
    """An empty (meta) Linear4bit in place of `linear`, its matmul in `compute_dtype`; the caller gives it its weight."""
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=spec.double_quant,
                              quant_type=spec.quant_type, device="meta")
    # bitsandbytes' CPU inference shortcut (avx512_bf16 CPUs, eval without grad) repacks the weight with its absmax
    # rounded to bf16, and fails on layers narrower than a 64-value block: another model than the one that trained.
    # Off, every device computes the reference dequantize + matmul (CUDA never takes it).
    layer.support_avx512bf16_for_cpu = False
    return layer


def _linear8bit(bnb: ModuleType, linear: nn.Linear, threshold: float = INT8_THRESHOLD) -> nn.Module:
    """An empty (meta) Linear8bitLt in place of `linear` (LLM.int8 with the outlier threshold: transformers' default,
    or a pre-quantized checkpoint's llm_int8_threshold, which transformers' replace_with_bnb_linear reads)."""
    quiet_int8_cast()
    return bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                               has_fp16_weights=False, threshold=threshold, device="meta")


def stored_weight(weight: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One stored bitsandbytes weight as its parameter, read as transformers reads it back
    (integrations/bitsandbytes.py). 4 bits: Params4bit.from_prequantized of the packed codes (uint8) and the quant
    state save_pretrained wrote beside them (absmax, quant_map, with double quantization nested_absmax and
    nested_quant_map, quant_state.bitsandbytes__nf4 / __fp4: the shape, block size and dtype as packed JSON;
    Bnb4bitDeserialize), its quant_state.shape the weight's (out x in). 8 bits: Int8Params of the int8 weight (out x
    in) with its per-row scales SCB (Bnb8bitDeserialize); weight_format 0 is row-major, the one bitsandbytes writes."""
    bnb = bitsandbytes()
    try:
        if "SCB" in parts:
            if int(parts.get("weight_format", torch.tensor(0))) != 0 or weight.dtype != torch.int8:
                raise ValueError(f"expected an int8 row-major weight, got {weight.dtype} in format "
                                 f"{int(parts.get('weight_format', torch.tensor(0)))}")
            return bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False, CB=weight, SCB=parts["SCB"])
        return bnb.nn.Params4bit.from_prequantized(data=weight, quantized_stats=dict(parts), requires_grad=False,
                                                   device=weight.device)
    except (ValueError, KeyError, AssertionError, TypeError) as err:
        raise UserError(f"a bitsandbytes weight whose quant state cannot be read ({sorted(parts)}: {err}); the"
                        " checkpoint may be truncated or written by another tool (save it again with transformers'"
                        " save_pretrained)") from None


def stored_layer(linear: nn.Linear, weight: torch.Tensor, stored: Quantization) -> nn.Module:
    """`linear` (its weight a placeholder; its bias loaded) as a frozen Linear4bit / Linear8bitLt holding the stored
    `weight` (stored_weight) as it is: the checkpoint's codes are the base, never quantized again (re-quantizing their
    dequantized values would not give the same codes under double quantization). The layer as transformers'
    replace_with_bnb_linear makes it from the checkpoint's quantization_config (`stored`): 4 bits, the matmul in its
    bnb_4bit_compute_dtype, whatever the run's precision (LLaMA-Factory passes a PTQ-quantized model no
    quantization_config of its own, so transformers keeps the checkpoint's); 8 bits, its llm_int8_threshold."""
    bnb = bitsandbytes()
    state = getattr(weight, "quant_state", None)
    if state is not None:
        layer = _linear4bit(bnb, linear, Quantization(4, state.quant_type, state.nested), stored_compute_dtype(stored))
        layer.quant_state = state
    else:
        layer = _linear8bit(bnb, linear, stored.int8_threshold)
    layer.weight = weight
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.train(linear.training)


def stored_compute_dtype(stored: Quantization) -> torch.dtype:
    """A stored 4-bit checkpoint's bnb_4bit_compute_dtype as a torch dtype (BitsAndBytesConfig: getattr(torch, name));
    one that is no floating dtype is the checkpoint's mistake, said once."""
    dtype = getattr(torch, str(stored.compute_dtype or "float32"), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserError(f"config.json quantization_config: bnb_4bit_compute_dtype given {stored.compute_dtype!r},"
                        " expected a floating torch dtype (float32, bfloat16, float16); correct it in the"
                        " checkpoint's config.json")
    return dtype


def load_stored(model: nn.Module, weights: Mapping[str, torch.Tensor], stored: Quantization) -> list[str]:
    """Each Linear whose `<path>.weight` is in `weights` (stored_weight's, by our parameter names) replaced by its
    stored_layer (`stored`: the checkpoint's quantization_config, quant_layout.stored_quantization); returns their
    paths. The Linears a checkpoint stores unquantized (the output head, llm_int8_skip_modules: unsloth's dynamic
    quants) stay plain Linears in the run's precision, as transformers leaves them: the file says which."""
    paths = []
    for name, weight in weights.items():
        path = name.removesuffix(".weight")
        parent, _, child = path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, stored_layer(getattr(owner, child), weight, stored))
        paths.append(path)
    return paths


def dequantize_model(model: nn.Module) -> int:
    """Every quantized Linear replaced by a plain fp32 Linear holding its dequantized weight (what its matmul
    multiplies by): a pre-quantized base as merge folds an adapter into it, the 4-bit values written out in 16/32
    bits, as unsloth's merged_16bit save does. Returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if not is_quantized(module):
            continue
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = nn.Parameter(dequantized_weight(module).float(), requires_grad=False)
        if module.bias is not None:
            plain.bias = nn.Parameter(module.bias.data.float(), requires_grad=False)
        model.set_submodule(name, plain.train(module.training))
        count += 1
    return count


class _Int8CastNotice(logging.Filter):
    """Drops bitsandbytes' "MatMul8bitLt: inputs will be cast from ... to float16" line, logged on every call of every
    8-bit layer (thousands a step); the fact is said once, in the schema's quantization_bit description and here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def quiet_int8_cast() -> None:
    """LLM.int8 quantizes each 8-bit layer's input from fp16 (bitsandbytes casts it): expected, not the user's to fix."""
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastNotice) for f in log.filters):
        log.addFilter(_Int8CastNotice())


def stored_width(model: nn.Module) -> str | None:
    """How a model's quantized Linears hold their weights, for the notes that name it ("4-bit", "8-bit (LLM.int8)"):
    Linear8bitLt's int8, Params4bit's uint8 codes; None where none is quantized."""
    dtypes = {module.weight.dtype for module in model.modules() if is_quantized(module)}
    return None if not dtypes else "8-bit (LLM.int8)" if torch.int8 in dtypes else "4-bit"


def parameter_count(param: torch.Tensor) -> int:
    """The parameters a tensor holds, as PEFT's get_nb_trainable_parameters (and LLaMA-Factory's count_parameters)
    count them: its elements, except a 4-bit weight (Params4bit, from quantization_bit 4 or a pre-quantized
    checkpoint) whose storage packs two 4-bit values a byte, numel * 2 * its storage's itemsize (an out x in weight
    is stored as (out * in / 2) x 1 uint8). An 8-bit weight (Int8Params) holds one int8 a value: its numel. A
    parameter ZeRO-3 has partitioned (local numel 0) counts its full size, DeepSpeed's ds_numel."""
    count = getattr(param, "ds_numel", param.numel())
    if type(param).__name__ == "Params4bit":  # by name, as PEFT checks it: bitsandbytes stays unimported
        count *= 2 * param.element_size()
    return count


def is_quantized(linear: nn.Module) -> bool:
    """Whether this Linear holds a bitsandbytes-quantized weight (uint8 / int8 storage)."""
    return isinstance(linear, nn.Linear) and not linear.weight.is_floating_point()


def dequantized_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight as a float matrix (out x in): the quantized layer's dequantized (what its matmul multiplies by),
    else the weight itself. DoRA's column norms and its dropout path read it (PEFT's dequantize_module_weight)."""
    if not is_quantized(linear):
        return linear.weight
    import bitsandbytes.functional as F

    weight = linear.weight
    if getattr(weight, "quant_state", None) is not None:  # Params4bit
        return F.dequantize_4bit(weight.data, weight.quant_state).float()
    scales = weight.SCB if weight.SCB is not None else linear.state.SCB  # a forward moves them to the layer's state
    return F.int8_vectorwise_dequant(weight.data, scales).float()  # Int8Params: CB * SCB / 127


def adapter_dtype(linear: nn.Linear) -> torch.dtype:
    """The dtype an adapter beside this Linear is made in: the weight's, or for a quantized one its compute dtype
    (fp32 where it has none: Linear8bitLt); upcast_adapter then holds it in fp32 as PEFT does."""
    if linear.weight.is_floating_point():
        return linear.weight.dtype
    return getattr(linear, "compute_dtype", None) or torch.float32
