"""What QLoRA's quantized base is, without torch: the recipe's three keys (Quantization), which Linears are quantized
(all but the output heads: NOT_QUANTIZED) and the bytes a quantized weight takes. pipeline.model.quantize does the
quantizing; `plan` (which must not import torch) counts the memory from here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

BITS = (4, 8)
NOT_QUANTIZED = ("lm_head", "score")  # transformers' get_keys_to_not_convert: the output embedding (tied or not)
# why a sparse MoE model is not quantized (pipeline.model.quantize at load; the recipe rule quantization_fits before)
SPARSE_MOE_REFUSED = ("a sparse MoE model is not quantized here (transformers' bnb quantizer leaves its fused experts "
                      "and router unquantized, ours are per-expert Linears); quantization_bit works on dense Llama / "
                      "Qwen / Mistral / Gemma / Phi-3 / GPT-2 checkpoints: remove the key")


def is_quantized_path(path: str, skip: Sequence[str] | None = None) -> bool:
    """Whether QLoRA quantizes the Linear at this module path: all but the output heads (NOT_QUANTIZED). With `skip`
    (a checkpoint's llm_int8_skip_modules, `path` then the HF module path): all but those transformers' bnb quantizer
    leaves unconverted, which then replace the heads rule (quantizers/base.py get_modules_to_not_convert adds the
    default heads only where the list is None: unsloth's dynamic quants list lm_head themselves)."""
    if skip is None:
        return path.split(".")[-1] not in NOT_QUANTIZED
    return not any(_skips(key, path) for key in skip)


_BOUNDARY = r"(?:(?<=\.)|(?=\.|$))"  # a module boundary after the match (quantizers_utils.should_convert_module)


def _skips(key: str, path: str) -> bool:
    """transformers 5's quantizers_utils.should_convert_module, one pattern: `key` matches the module path from its
    start up to a module boundary ("model.layers.1" the whole block, not "model.layers.11"), as a regex with that
    boundary ("model.layers.*.mlp"), or as a suffix ("down_proj"). A key that is no valid regex (transformers would
    raise) is matched as its literal text."""
    try:
        if re.match(rf"(?:{key}){_BOUNDARY}", path):
            return True
    except re.error:
        if re.match(rf"(?:{re.escape(key)}){_BOUNDARY}", path):
            return True
    return path.endswith(key)


# The tensors transformers' save_pretrained writes beside each bitsandbytes weight, as the hub's unsloth/*-bnb-4bit
# files hold them: 4 bits, Params4bit's packed codes under the Linear's `weight` and its QuantState.as_dict(packed=True)
# beside it (`weight.absmax`, ...: Params4bit.from_prequantized's quantized_stats keys); 8 bits, the int8 `weight` (out
# x in) with the Linear's `SCB` (one fp32 scale a row) and `weight_format` (0: row-major)
_STORED_4BIT_PART = re.compile(r"^(.+\.weight)\.(absmax|quant_map|nested_absmax|nested_quant_map"
                               r"|quant_state\.bitsandbytes__(?:nf4|fp4))$")
_STORED_8BIT_PART = re.compile(r"^(.+)\.(SCB|weight_format)$")


def stored_part(key: str) -> tuple[str, str] | None:
    """(the weight's key, the part) for a tensor saved beside a bitsandbytes weight (a quant-state part); else None."""
    four = _STORED_4BIT_PART.match(key)
    if four:
        return four.group(1), four.group(2)
    eight = _STORED_8BIT_PART.match(key)
    return (eight.group(1) + ".weight", eight.group(2)) if eight else None


def header_shapes(shapes: Mapping[str, list[int]]) -> dict[str, list[int]]:
    """A checkpoint's tensor shapes from its safetensors headers, as the checks that read them use them: a bitsandbytes
    checkpoint's quant-state parts left out, and its 4-bit weights too (their header shape is the packed codes'
    bytes, [out x in / 2, 1]; the weight's own is in the quant state's data); 8-bit weights keep theirs (out x in)."""
    parts = {key: stored_part(key) for key in shapes}
    packed = {part[0] for part in parts.values() if part and part[1] == "absmax"}
    return {key: shape for key, shape in shapes.items() if not parts[key] and key not in packed}


BLOCK = 64          # values per absmax block (bitsandbytes' Params4bit blocksize)
NESTED_BLOCK = 256  # double quantization: absmax values per second-level block


@dataclass(frozen=True)
class Quantization:
    """The recipe's quantization_bit, quantization_type and double_quantization (LLaMA-Factory's names)."""

    bits: int
    quant_type: str = "nf4"
    double_quant: bool = True
    # a pre-quantized checkpoint's quantization_config beyond those keys (stored_quantization): the Linears it keeps
    # unquantized (llm_int8_skip_modules; None: the heads), the 4-bit matmuls' dtype (bnb_4bit_compute_dtype, a torch
    # dtype's name, float32 where the config has none as BitsAndBytesConfig; None: the recipe's quantization, whose
    # matmuls are in the run's precision) and LLM.int8's outlier threshold (llm_int8_threshold)
    skip_modules: tuple[str, ...] | None = None
    compute_dtype: str | None = None
    int8_threshold: float = 6.0

    @classmethod
    def of(cls, args: Any) -> "Quantization | None":
        """From a ModelArgs or a resolved recipe (the three keys); None when quantization_bit is unset."""
        def get(key: str, default: Any) -> Any:
            return args.get(key, default) if isinstance(args, Mapping) else getattr(args, key, default)

        bits = get("quantization_bit", None)
        if bits is None:
            return None
        return cls(int(bits), str(get("quantization_type", "nf4")), bool(get("double_quantization", True)))

    def describe(self) -> str:
        if self.bits == 8:
            return "8-bit (LLM.int8)"
        return f"4-bit {self.quant_type}" + (" with double quantization" if self.double_quant else "")


def quantized_bytes(out_features: int, in_features: int, spec: Quantization) -> float:
    """Bytes one quantized weight takes: 4 bits a value + one absmax per 64-value block (fp32, or with double
    quantization one byte per block + an fp32 absmax per 256 blocks), bitsandbytes' Params4bit layout; 8 bits a value
    + one fp32 scale per output row for Linear8bitLt."""
    values = out_features * in_features
    if spec.bits == 8:
        return values + 4 * out_features
    blocks = values / BLOCK
    stats = blocks + 4 * blocks / NESTED_BLOCK if spec.double_quant else 4 * blocks
    return values / 2 + stats


def base_weight_bytes(linears: list[tuple[str, int, int]], spec: Quantization, width: int) -> tuple[float, float]:
    """(bytes of the quantized weights, bytes the same weights take at `width` bytes a value) over the base's Linears
    (path, in, out; HF paths where `spec` has skip_modules) that are quantized: what plan's memory estimate puts in
    place of the unquantized count."""
    chosen = [(i, o) for name, i, o in linears if is_quantized_path(name, spec.skip_modules)]
    return sum(quantized_bytes(o, i, spec) for i, o in chosen), float(sum(i * o * width for i, o in chosen))


def stored_quantization(quantization_config: Any) -> "Quantization | None":
    """The bitsandbytes quantization a checkpoint's files hold, from its config.json quantization_config as
    transformers' BitsAndBytesConfig.to_dict writes it (quant_method bitsandbytes; load_in_4bit with
    bnb_4bit_quant_type and bnb_4bit_use_double_quant, whose BitsAndBytesConfig defaults are fp4 and false; or
    load_in_8bit); None for an unquantized checkpoint and every other method (GPTQ, AWQ, FP8, gpt-oss's MXFP4).
    With it what transformers reads back besides (replace_with_bnb_linear): llm_int8_skip_modules (unsloth's dynamic
    quants, *-unsloth-bnb-4bit), bnb_4bit_compute_dtype and llm_int8_threshold."""
    q = quantization_config
    if not isinstance(q, Mapping) or q.get("quant_method") != "bitsandbytes":
        return None
    skip = q.get("llm_int8_skip_modules")
    skip = tuple(str(key) for key in skip) if isinstance(skip, (list, tuple)) else None
    threshold = q.get("llm_int8_threshold", 6.0)
    threshold = float(threshold) if isinstance(threshold, (int, float)) and not isinstance(threshold, bool) else 6.0
    if q.get("load_in_4bit") or q.get("_load_in_4bit"):
        dtype = q.get("bnb_4bit_compute_dtype")
        return Quantization(4, str(q.get("bnb_4bit_quant_type") or "fp4"), bool(q.get("bnb_4bit_use_double_quant")),
                            skip, str(dtype or "float32").removeprefix("torch."), threshold)
    if q.get("load_in_8bit") or q.get("_load_in_8bit"):
        return Quantization(8, skip_modules=skip, int8_threshold=threshold)
    return None


# Added tokens on a checkpoint whose output head is stored quantized (quantized_head): the load's refusal
# (pipeline.model.build.refuse_quantized_head) and the recipe rule's (rules.prequantized.added_tokens_fit_the_head),
# after "model_name_or_path: "
QUANTIZED_HEAD_REFUSED = ("{name} stores its output head (lm_head) quantized (its quantization_config's"
                          " llm_int8_skip_modules does not list lm_head), which has no rows to add tokens to (LLaMA-Factory:"
                          " 'Cannot resize embedding layers of a quantized model.'); remove the added tokens (new_special_"
                          "tokens, add_tokens, add_special_tokens), or start from a checkpoint that keeps lm_head unquantized")


# stage rm training a reward model's score head that the checkpoint stores quantized (quantized_head "score"): the
# load's refusal (pipeline.model.build.build_model) and the recipe rule's (rules.prequantized.score_head_trains)
SCORE_HEAD_REFUSED = ("{name} is a reward model (XForSequenceClassification) whose score head is stored quantized (its"
                      " quantization_config's llm_int8_skip_modules does not list score): stage rm trains the score head"
                      " in full, and packed 4/8-bit codes cannot train (LLaMA-Factory does not continue it either: it"
                      " loads such a checkpoint as a causal LM with a new value head); start from the language model it"
                      " was trained from (stage rm draws a new score head), or from a checkpoint whose"
                      " llm_int8_skip_modules lists score")


def quantized_head(stored: Quantization | None, cfg: Any, scored: bool) -> str | None:
    """The output head of the model a recipe builds (`cfg`: its ModelConfig, stage rm's num_labels and
    tie_word_embeddings applied) that a pre-quantized checkpoint (`stored`) holds in 4/8 bits, by its module name
    (lm_head, score); None where that head is plain. `scored`: the checkpoint is a reward model (its config's
    num_labels: XForSequenceClassification), whose score head stage rm keeps; an rm run on a language model draws a new
    plain one (its lm_head dropped). transformers quantizes a head its llm_int8_skip_modules does not list, and keeps
    the heads without a list (is_quantized_path); a tied lm_head is the embedding. The one decision the load and the
    recipe rules share: added tokens need rows in lm_head, stage rm trains the score head, and packed codes do
    neither."""
    if stored is None:
        return None
    head = ("score" if scored else None) if cfg.num_labels else (None if cfg.tie_weights else "lm_head")
    return head if head and is_quantized_path(head, stored.skip_modules) else None


def stored_keys(stored: Quantization) -> tuple[tuple[str, Any], ...]:
    """The recipe keys (LLaMA-Factory's names) and values that describe a checkpoint stored as `stored`: the bit width,
    and at 4 bits the data type and double quantization (at 8 bits those two have no effect)."""
    if stored.bits == 8:
        return (("quantization_bit", 8),)
    return (("quantization_bit", 4), ("quantization_type", stored.quant_type),
            ("double_quantization", stored.double_quant))
