"""From a resolved recipe to a model: base weights, the recipe's overrides, the fine-tuning type.

finetuning_type decides what the optimizer sees:
  lora    every base weight frozen; LoRA on lora_target (+ additional_target modules trained in full)
  oft     the same, with OFT's orthogonal rotations (pipeline.model.oft) on lora_target, as LLaMA-Factory picks them
  freeze  only the last freeze_trainable_layers blocks (negative: the first ones) and the final norm ln_f train
          (embeddings and the tied head stay frozen: they hold most of GPT-2's parameters and its vocabulary knowledge);
          with use_llama_pro, only the blocks `python -m pipeline expand` inserted (lora / oft: the adapter only there)
  full    every weight trains
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from pipeline.data.added_tokens import DESCRIBED, TokenNames
from pipeline.errors import UserError
from pipeline.model.adapter import cast_keeping_adapters
from pipeline.model.config import (PRESETS, ModelConfig, config_path, freeze_trainable_names, llama_pro_blocks,
                                   read_config, read_raw, resized_vocab_size, vocab_modules)
from pipeline.model.gpt import GPTModel
from pipeline.model.hub import resolve_model_path
from pipeline.model.lora import apply_lora, load_adapter, merge_lora, pissa_start_of
from pipeline.model.rope_recipe import recipe_rope
from pipeline.model.vocab import Described, resize_vocab
from pipeline.model.weights import checkpoint_tensors, load_model, note
from pipeline.names import split_names, trains_adapter

KINDS = ("base", "adapter", "model", "merged")


@dataclass(frozen=True)
class ModelArgs:
    """Which base weights, and what the recipe changes in their config (None keeps the checkpoint's value)."""

    model_name_or_path: str
    seed: int
    dropout: float
    context_length: int | None
    qkv_bias: bool | None
    tie_word_embeddings: bool | None
    rope_scaling: str | None = None  # LLaMA-Factory's rope_scaling type (pipeline.model.rope_recipe)
    cutoff_len: int = 0              # the input length rope_scaling is measured against
    # tokens the recipe adds to the tokenizer: the embedding grows to hold them (pipeline.model.vocab), and
    # where the tokenizer comes from (the recipe's tokenizer_name_or_path, else model_name_or_path)
    new_special_tokens: str | Sequence[str] | None = None
    add_tokens: str | Sequence[str] | None = None  # the other keys that add tokens (pipeline.data.added_tokens)
    add_special_tokens: str | Sequence[str] | None = None
    new_special_tokens_config: str | None = None
    split_special_tokens: bool = False  # the recipe's tokenizer reads special tokens in text as literal
    init_special_tokens: str = "noise_init"  # the new rows: noise_init, desc_init, desc_init_w_noise (model.vocab)
    tokenizer_name_or_path: str | None = None
    stage: str = "sft"               # rm: a reward model, the score head in place of lm_head (pipeline.model.reward)
    # QLoRA: the base's Linears held by bitsandbytes in 4 / 8 bits, frozen (pipeline.model.quantize); None: unquantized
    quantization_bit: int | None = None
    quantization_type: str = "nf4"   # 4 bits: nf4 or fp4
    double_quantization: bool = True  # 4 bits: the blocks' absmax quantized too


@dataclass(frozen=True)
class FinetuneArgs:
    """What the optimizer sees: finetuning_type and its LoRA / freeze settings, and a starting adapter."""

    finetuning_type: str
    lora_rank: int
    lora_alpha: float | None  # None: pipeline.model.config.default_lora_alpha(rank)
    lora_dropout: float
    lora_target: str | Sequence[str] | None
    use_rslora: bool
    use_dora: bool
    additional_target: Sequence[str] | None
    freeze_trainable_layers: int
    adapter_name_or_path: str | None
    seed: int
    pissa_init: bool = False  # LoRA starts from the base weights' principal singular vectors (lora.init_pissa)
    pissa_iter: int = 16      # its SVD: -1 exact, k >= 0 randomized with k power iterations (seeded by `seed`)
    resize_vocab: bool = False  # LoRA: the embedding and the head train in full (additional_target, unless given)
    use_llama_pro: bool = False  # only the blocks `expand` inserted train (freeze), or take the adapter (lora / oft)
    freeze_trainable_modules: str | Sequence[str] = "all"  # freeze: these modules of each trainable block (HF names)
    freeze_extra_modules: str | Sequence[str] | None = None  # freeze: these modules outside the blocks too
    oft_rank: int = 0           # oft: the number of blocks of each rotation (0: from oft_block_size)
    oft_block_size: int = 32    # oft: the size of its blocks (0: from oft_rank); pipeline.model.oft
    module_dropout: float = 0.0  # oft: written to adapter_config.json; no effect, as in PEFT (pipeline.model.oft)


def recipe_config(args: ModelArgs) -> ModelConfig:
    """The base model's config with the recipe's overrides (null keeps the preset/checkpoint value) and its
    rope_scaling (which sets the context length: resolve derives the same value into context_length)."""
    cfg = recipe_rope(read_config(args.model_name_or_path), args.rope_scaling, args.cutoff_len).config
    changes: dict[str, Any] = {"drop_rate": float(args.dropout)}
    if args.stage == "rm":
        changes["num_labels"] = 1
    elif cfg.num_labels:
        raise UserError(f"model_name_or_path: {args.model_name_or_path} is a reward model (a score head, no LM head): "
                        f"it trains with stage: rm only, not stage: {args.stage}; start from its language model")
    for value, field in ((args.context_length, "context_length"), (args.qkv_bias, "qkv_bias"),
                         (args.tie_word_embeddings, "tie_weights")):
        if value is not None:
            changes[field] = value
    if (tokens := vocab_tokens(args)) is not None:
        changes["vocab_size"] = resized_vocab_size(cfg.vocab_size, tokens)
    return cfg.replace(**changes)


def vocab_tokens(args: ModelArgs) -> int | None:
    """How many ids the recipe's tokenizer has once its tokens are added (pipeline.data.added_tokens); None when it
    adds none."""
    if not TokenNames.of(args):
        return None
    from pipeline.data.model_tokenizer import recipe_tokenizer

    return recipe_tokenizer(args).n_vocab


def described_rows(args: ModelArgs) -> Described | None:
    """init_special_tokens desc_init / desc_init_w_noise: each new special token of new_special_tokens_config with
    its description's ids, as LLaMA-Factory's tokenizer(description, add_special_tokens=False) gives them (every
    added token recognised; no BOS), the new tokens' ids left out. None for noise_init or without a config
    (LLaMA-Factory then falls back to noise_init; the recipe's notice says so)."""
    names = TokenNames.of(args)
    if args.init_special_tokens not in DESCRIBED or not names.descriptions:
        return None
    from pipeline.data.model_tokenizer import recipe_tokenizer

    tokenizer = recipe_tokenizer(args)
    new = {token: tokenizer.token_id(token) for token in tokenizer.new_tokens}
    left_out = set(new.values())
    rows = {new[token]: tuple(i for i in tokenizer.encode_special(text) if i not in left_out)
            for token, text in names.descriptions.items() if token in new}
    return Described(rows, noise=args.init_special_tokens == "desc_init_w_noise", new=frozenset(left_out))


def load_base(args: ModelArgs, *, dropout: bool = True, dtype: torch.dtype = torch.float32) -> GPTModel:
    """The base model of the recipe (a preset starts from a seeded random init: say so on stderr), in `dtype`; for
    stage rm with a new score head (seeded, pipeline.model.reward)."""
    name = str(args.model_name_or_path)
    cfg = recipe_config(args)
    if not dropout:
        cfg = cfg.replace(drop_rate=0.0)
    if name in PRESETS:
        note(f"model: preset '{name}' = random weights (seed {args.seed}); for trained weights set"
             " model_name_or_path to a directory with config.json + model.safetensors")
    tokens = vocab_tokens(args)
    if tokens is None:
        return quantized(load_model(name, seed=args.seed, cfg=cfg, dtype=dtype), args, dtype)
    refuse_quantized_head(cfg, name)
    model = load_model(name, seed=args.seed, cfg=cfg.replace(vocab_size=read_config(name).vocab_size), dtype=dtype)
    old = model.cfg.vocab_size
    described = described_rows(args)
    if resize_vocab(model, tokens, seed=args.seed, described=described) != old:
        note(f"model: embedding resized for the added tokens: {old} -> {model.cfg.vocab_size} rows (a multiple "
             "of 64, as LLaMA-Factory pads; new rows: the mean of the old ones + noise)")
    if described is not None and described.rows:
        note(f"model: {len(described.rows)} new token rows from their descriptions (init_special_tokens: "
             f"{args.init_special_tokens})")
    return quantized(model, args, dtype)


def refuse_quantized_head(cfg: ModelConfig, name: str) -> None:
    """Added tokens need a row each in the output head: one a pre-quantized checkpoint stores in 4/8 bits
    (stored_head) holds packed codes, no rows to grow or write (transformers' resize would read the packed shape as
    the vocabulary); LLaMA-Factory refuses resizing a quantized model ('Cannot resize embedding layers of a quantized
    model.', hparams/parser.py:195). Said before the weights are read."""
    from pipeline.model.quant_layout import QUANTIZED_HEAD_REFUSED

    if stored_head(cfg, name) == "lm_head":
        raise UserError("model_name_or_path: " + QUANTIZED_HEAD_REFUSED.format(name=name))


def stored_head(cfg: ModelConfig, name: str) -> str | None:
    """The output head of the recipe's model (`cfg`: recipe_config's) that checkpoint `name` stores quantized
    (quant_layout.quantized_head, the decision the recipe rules share), from its config.json; None for a preset."""
    from pipeline.model.quant_layout import quantized_head, stored_quantization

    path = config_path(name)
    if path is None:
        return None
    return quantized_head(stored_quantization(read_raw(path).get("quantization_config")), cfg,
                          scored=bool(read_config(name).num_labels))


def quantized(model: GPTModel, args: ModelArgs, dtype: torch.dtype) -> GPTModel:
    """With quantization_bit, the base's Linears quantized by bitsandbytes, their matmuls in `dtype` (the run's
    precision: LLaMA-Factory's bnb_4bit_compute_dtype); the model unchanged without it."""
    from pipeline.model.quantize import Quantization, is_quantized, quantize_model, stored_width

    spec = Quantization.of(args)
    width = stored_width(model)
    if width:  # a pre-quantized checkpoint: its codes are the base (resolve derived quantization_bit from it)
        stored = [module for module in model.modules() if is_quantized(module)]
        # 4 bits: the checkpoint's bnb_4bit_compute_dtype (quantize.stored_layer); LLM.int8 casts to fp16 itself
        matmuls = "" if width != "4-bit" else ", their matmuls in " + " / ".join(sorted(
            {str(module.compute_dtype).removeprefix("torch.") for module in stored})) + " (bnb_4bit_compute_dtype)"
        note(f"model: {len(stored)} Linears loaded as stored, bitsandbytes {width} (a pre-quantized checkpoint)"
             f"{matmuls}{stored_plain(model, scored=bool(read_config(args.model_name_or_path).num_labels))}")
    elif spec is not None:
        names = quantize_model(model, spec, dtype)
        note(f"model: {len(names)} Linears quantized to {spec.describe()} (bitsandbytes; quantization_bit)")
    return model


def stored_plain(model: GPTModel, scored: bool) -> str:
    """The note's words for the Linears a pre-quantized checkpoint stores unquantized, by what keeps them so: the
    output head (transformers' default, or listed: lm_head, or a reward model's score head where the checkpoint is
    one, `scored`) and those llm_int8_skip_modules lists; a 4-bit head (a list without it) is among the stored ones,
    stage rm's new score head on a language model no stored Linear."""
    from pipeline.model.quantize import is_quantized

    heads = ("lm_head", "score")
    plain = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
             and not is_quantized(module) and (name != "score" or scored)]
    listed = sum(name not in heads for name in plain)
    what = [*(f"the {'output' if head == 'lm_head' else 'score'} head" for head in heads if head in plain),
            *([f"{listed} listed in llm_int8_skip_modules"] if listed else [])]
    return f"; {len(plain)} stored unquantized ({', '.join(what)}) in the run's precision" if plain else ""


def unquantized(args: ModelArgs) -> ModelArgs:
    """The same base without quantization_bit: what merge folds a QLoRA adapter into (the checkpoint's own weights,
    QLoRA's and LLaMA-Factory's practice: its merge examples say not to quantize the base being merged into)."""
    return replace(args, quantization_bit=None)


def load_ref_model(path: str, base: ModelArgs, adapters: str | Sequence[str] | None = None) -> GPTModel:
    """ref_model (stage dpo / kto) as LLaMA-Factory's create_ref_model loads it: with the run's model arguments
    (ModelArguments.copyfrom) and tokenizer. So rope_scaling scales its positions as the policy's (a sequence past its
    saved max_position_embeddings stopped the reference pass), and new_special_tokens grow its embedding with the
    policy's rows (same seed): a ref_model that is the base is the starting policy. `adapters`
    (ref_model_adapters: LoRA or OFT folders, a comma string or a list) are folded into it in order, as LLaMA-Factory
    merges every adapter of a model it loads untrainable: the reference is then one plain model, no adapter pass.
    Never quantized: LLaMA-Factory's copy takes quantization_bit from ref_model_quantization_bit (refused here), not
    the policy's, so beside a QLoRA policy the ref_model is its checkpoint's own weights."""
    tokenizer = base.tokenizer_name_or_path or base.model_name_or_path
    model = load_base(replace(unquantized(base), model_name_or_path=path, tokenizer_name_or_path=tokenizer),
                      dropout=False)
    for adapter in split_names(adapters):
        fold_adapter(model, adapter, key="ref_model_adapters")
    return model


def fold_adapter(model: GPTModel, adapter: str, key: str) -> GPTModel:
    """Load the LoRA / OFT adapter at `adapter` (a folder or hub id, named by recipe key `key` in messages) onto
    `model` and fold it into the weights: the one way an adapter becomes part of a base here (full / freeze on top of
    adapter_name_or_path, a reference's ref_model_adapters). Folded in the model's dtype (fp32 as load_base builds)."""
    load_adapter(model, resolve_model_path(adapter, key=key))
    merge_lora(model)
    return model


def base_tensors(args: ModelArgs) -> Iterator[tuple[str, torch.Tensor]]:
    """The base model's fp32 tensors by our names, one at a time: a checkpoint's read from its files as they are
    asked for (the whole model is never in memory), a preset's from its seeded build (as load_base makes it), and so
    a base whose embedding new_special_tokens grow (the grown rows are the build's)."""
    if str(args.model_name_or_path) in PRESETS or vocab_tokens(args) is not None:
        yield from load_base(unquantized(args), dropout=False).state_dict().items()
    else:
        yield from checkpoint_tensors(args.model_name_or_path)


def base_as_built(model: ModelArgs, finetune: FinetuneArgs) -> bool:
    """Whether the model `train` builds holds the base's tensors as base_tensors gives them: no recipe override
    of the config (context_length, qkv_bias, tie_word_embeddings) and no adapter folded in. Then a freeze
    export reads its frozen weights from the base when it writes (base_subset) instead of keeping a built fp32
    copy of the whole model for the rest of the run."""
    overrides = (model.context_length, model.qkv_bias, model.tie_word_embeddings, vocab_tokens(model))
    return all(v is None for v in overrides) and not finetune.adapter_name_or_path


def base_subset(args: ModelArgs, names: set[str]) -> dict[str, torch.Tensor]:
    """The named base tensors in fp32, read one at a time (the others are dropped as they are read)."""
    return {name: tensor.float() for name, tensor in base_tensors(args) if name in names}


def lora_additional_targets(model: GPTModel, ft: FinetuneArgs) -> Sequence[str] | None:
    """additional_target, or with resize_vocab and none given the input embedding and the output head (their
    last name component, as LLaMA-Factory's adapter.py picks them): the new tokens' rows must train."""
    if ft.additional_target is not None or not ft.resize_vocab:
        return ft.additional_target
    return [model.cfg.hf.to_hf(name).split(".")[-1] for name in vocab_modules(model.cfg)]


def apply_finetuning_type(model: GPTModel, ft: FinetuneArgs, pissa_start: Path | None = None) -> GPTModel:
    """Freeze / inject per finetuning_type, and load adapter_name_or_path when set. pissa_start: a converted PiSSA
    adapter (a resumed checkpoint's) whose starting pairs make the residual base, instead of the SVD."""
    kind, adapter = ft.finetuning_type, ft.adapter_name_or_path
    blocks = llama_pro_blocks(model.cfg.n_layers, ft.freeze_trainable_layers) if ft.use_llama_pro else None
    if kind == "lora":
        apply_lora(model, ft.lora_target or "all", rank=ft.lora_rank, alpha=ft.lora_alpha, dropout=ft.lora_dropout,
                   use_rslora=ft.use_rslora, use_dora=ft.use_dora, seed=ft.seed,
                   additional_targets=lora_additional_targets(model, ft),
                   pissa_iter=ft.pissa_iter if ft.pissa_init and pissa_start is None else None,
                   pissa_start=pissa_start_of(pissa_start) if ft.pissa_init and pissa_start is not None else None,
                   blocks=blocks)
        if adapter:  # continue training an adapter: same rank/alpha required
            load_adapter(model, resolve_model_path(adapter, key="adapter_name_or_path"))
        return model
    if kind == "oft":
        from pipeline.model.oft import apply_oft

        apply_oft(model, ft.lora_target or "all", rank=ft.oft_rank, block_size=ft.oft_block_size,
                  module_dropout=ft.module_dropout, additional_targets=lora_additional_targets(model, ft),
                  blocks=blocks)
        if adapter:  # continue training an adapter: same oft_rank / oft_block_size required
            load_adapter(model, resolve_model_path(adapter, key="adapter_name_or_path"))
        return model
    if adapter:  # full/freeze on top of an adapter: fold it into the base first (as LLaMA-Factory does)
        fold_adapter(model, adapter, key="adapter_name_or_path")
    if kind == "freeze":
        model.requires_grad_(False)
        # layout's names: modules, or a parameter the attention holds itself (GPT-OSS's self_attn.sinks)
        params = dict(model.named_parameters(remove_duplicate=False))
        for name in freeze_trainable_names(model.cfg, ft.freeze_trainable_layers, ft.use_llama_pro,
                                           ft.freeze_trainable_modules, ft.freeze_extra_modules):
            (params[name] if name in params else model.get_submodule(name)).requires_grad_(True)
    elif kind == "full":
        model.requires_grad_(True)
    else:
        raise UserError(f"finetuning_type: '{kind}' is not one of lora, oft, full, freeze")
    return model


def build_model(model: ModelArgs, finetune: FinetuneArgs, dtype: torch.dtype = torch.float32,
                pissa_start: Path | None = None) -> GPTModel:
    """The model `train` optimises: base weights + recipe overrides + fine-tuning type, on CPU, in `dtype`.

    `train` passes its compute dtype (bf16 / fp16), the one DeepSpeed would cast the whole model to: the
    base weights are then read straight into it, one tensor at a time (pipeline.model.weights.read_tensors),
    instead of the whole fp32 file being resident while the cast copies it. New LoRA weights are still
    drawn in fp32, rounded to `dtype` and then held in fp32 as PEFT holds them (pipeline.model.adapter.upcast_adapter;
    a loaded adapter keeps its fp32 values), and an adapter folded into a full/freeze base is merged in fp32 before
    the cast: the same values as a cast of the fp32 model. PiSSA's SVD and residual are formed in fp32 from the weight
    as read (PEFT's pissa_init), here on the whole weights, before DeepSpeed partitions them (ZeRO-3).
    """
    if stored_head(recipe_config(model), str(model.model_name_or_path)) == "score":  # stage rm trains it
        from pipeline.model.quant_layout import SCORE_HEAD_REFUSED

        raise UserError("model_name_or_path: " + SCORE_HEAD_REFUSED.format(name=model.model_name_or_path))
    merges = not trains_adapter(finetune.finetuning_type) and bool(finetune.adapter_name_or_path)
    built = apply_finetuning_type(load_base(model, dtype=torch.float32 if merges else dtype), finetune, pissa_start)
    return cast_keeping_adapters(built, dtype)  # LoRA / OFT's own weights stay fp32 (PEFT's upcast_adapter)


def build_skeleton(model: ModelArgs, finetune: FinetuneArgs) -> GPTModel:
    """The model `train` optimises, without its weights: every tensor on the meta device (no memory, nothing read).

    Why: an export of LoRA or full fine-tuning writes only tensors the engine trained (pipeline/train/export.py),
    so it needs the model's names, shapes and LoRA settings, not its base weights. Building it for real would
    read the checkpoint again and hold an fp32 copy of the whole model on the host: 32 GB for an 8B model.
    A starting adapter is not read, nor LoRA drawn (no seed, no PiSSA): the engine's values replace them."""
    with torch.device("meta"):
        skeleton = GPTModel(recipe_config(model), seed=None)
        return apply_finetuning_type(skeleton, replace(finetune, adapter_name_or_path=None, seed=None,
                                                       pissa_init=False))


def load_for_inference(model: ModelArgs, kind: str = "base", path: str | Path | None = None,
                       device: str | torch.device | None = None, dtype: torch.dtype = torch.float32) -> GPTModel:
    """Weights for generate / eval / merge, in eval mode on `device` (CUDA when available), in `dtype` (bf16: a
    pure_bf16 run's model as it trained, the base cast as train casts it and the adapter on it in fp32, as it
    trained and as PEFT's from_pretrained holds it: pipeline.model.adapter.upcast_adapter).

    kind base: the recipe's base model; adapter: the base + the LoRA adapter at `path`; model or merged: the
    checkpoint at `path` (our format or the Hugging Face layout). Which weights are current is decided by
    pipeline.runtime.layout, not here.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind == "base":
        loaded = load_base(model, dropout=False, dtype=dtype)
    elif kind == "adapter":
        loaded = load_base(model, dropout=False, dtype=dtype)
        load_adapter(loaded, path)
    else:
        loaded = load_model(path, dtype=dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return loaded.to(device).eval()
