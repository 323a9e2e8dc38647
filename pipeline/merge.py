"""`python -m pipeline merge RECIPE`: fold the LoRA adapter into the base, prove it, export the family's HF layout.

Incumbents have shipped "merged" models that silently equal the base. Here nothing is written until
the merged model is shown to be the adapter model:

1. every LoRA layer's adapter is non-empty (lora_B not all zero) and the merged weight differs from
   the base weight; per layer, merged_linear(x) - base_linear(x) equals the LoRA branch on random x;
2. on a few real validation samples the merged logits equal the adapter logits (fp32, relative
   1e-4 of the logits' spread, softmax-invariant centring), then the model cast to export_dtype is
   checked the same way within that dtype's tolerance, after making sure the cast keeps the update
   (a change below bf16/fp16 resolution would be rounded away and the export would be the base);
3. the written files are loaded back and give the verified logits.

The adapter is folded into the loaded base in place, one layer at a time (merge_verified): each layer's
base weight is kept only for its own check, the cast to export_dtype is made in place, and the model is
let go before the written files are read back. The host memory is the fp32 model once plus a layer,
where holding the adapter model beside a merged copy (and a cast copy) took about three times that.

Any failure is a UserError naming the layer. output_dir/merged/ (config.json, model.safetensors or
shards + index, generation_config.json, tokenizer files: GPT-2's rebuilt, other families' copied from the
base checkpoint, verification.json) appears complete or
not at all. Its tokenizer_config.json carries the recipe's template as `chat_template`
(pipeline.data.chat_template), so transformers and vLLM prompt the model as it was trained, and the template's
end of answer as `eos_token` (export_eos_token), so tools that stop there stop after the answer, and the
recipe's `split_special_tokens` (tokenizer_files.write_split_special_tokens), so AutoTokenizer reads typed
special tokens as training did. For full/freeze runs merge is a re-export of output_dir/model with the same checks.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from pipeline.data.chat_template import TRAINING_TEMPLATE_FILE, recipe_chat_template
from pipeline.data.model_tokenizer import recipe_tokenizer
from pipeline.data.tokenizer import Tokenizer
from pipeline.errors import UserError
from pipeline.io import atomic_dir, write_json, write_text
from pipeline.model.hub import resolve_model_path
from pipeline.model.weights import DTYPES, note
from pipeline.model.config import ModelConfig, base_folder, length_limit
from pipeline.data.args import DataArgs
from pipeline.model.build import ModelArgs
from pipeline.names import CHECKPOINT_NAME, trains_adapter
from pipeline.recipe.precision import weights_dtype
from pipeline.recipe.args import ExportArgs, GenerationArgs, RecipeModel, data_args, export_args, key_at, recipe_args
from pipeline.recipe.typed import run_this_for
from pipeline.runtime import guard, hostmem
from pipeline.runtime.layout import RunLayout, trained_weights

# Relative tolerance on centred logits (max |diff| / max |reference|) per export dtype; measured
# cast errors on tiny..gpt2-small: fp32 ~3e-6, fp16 ~2e-3, bf16 ~1.4e-2.
LOGIT_RTOL = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 5e-2}
LAYER_RTOL = 1e-3  # of the LoRA branch's output, plus LAYER_ATOL of the layer's output scale
LAYER_ATOL = 1e-5
MAX_UPDATE_LOST = 0.5  # relative error of a layer's update after the export cast (||.||_F)
NUM_SAMPLES = 4
MAX_SAMPLE_TOKENS = 256
_ROWS = 16  # positions at a time in _rel_error: 16 x 128k fp32 logits are 8 MB
VERIFICATION = "verification.json"  # every folder export writes holds it: what marks a folder as ours to replace


def run(r: Mapping[str, Any], args: Any = None) -> int:
    """`python -m pipeline merge RECIPE`: the run's adapter folded into the base (full / freeze: the trained model
    re-exported), verified, written to output_dir/merged (or export_dir) in the Hugging Face layout."""
    models, data, ex = recipe_args(r), data_args(r), export_args(r)
    out = RunLayout.of(r["output_dir"], ex.export_dir)
    target = _export_target(r, out.merged)
    files = export_files(r)  # before the merge: a template the vocabulary lacks is refused at once
    lora = trains_adapter(models.finetune.finetuning_type)
    trained = DTYPES[weights_dtype(r)]  # pure_bf16: the base trained as bf16 (its model/ is bf16)
    if lora:
        adapter = adapter_dir(r)  # the run's own adapter/ is trained by this recipe; another by its own run
        own = adapter.resolve() == out.adapter.resolve()
        check = merge_adapter(models.model, data, ex, adapter, trained, run_this_for("train", r) if own else None)
    else:
        check = reexport_full(models, data, ex, out, run_this_for("train", r), trained)
    target = export(check, target, ex, files)
    errors = ", ".join(f"{err:.2e} ({dtype})" for dtype, err in check.report["logits"].items())
    note(f"merged model written to {target} ({ex.export_dtype}); verified on {check.report['samples']} samples,"
         f" max relative logit error vs the {'adapter' if lora else 'trained'} model: {errors}")
    return 0


def export_run(r: Mapping[str, Any], args: Any = None) -> int:
    """`python -m pipeline export RECIPE`: LLaMA-Factory's merge_lora recipes (llamafactory-cli export).

    model_name_or_path + adapter_name_or_path (an adapter, or a run's output_dir) + export_dir: the adapter
    folded into the base, verified as `merge` does, written to export_dir. Without an adapter the model
    itself (e.g. a full fine-tuning run's output) is re-exported to export_dir in the Hugging Face layout.
    """
    if not r.get("export_dir"):
        raise UserError(f"{_recipe(r)}: export needs export_dir (where the merged model goes), e.g. "
                        "export_dir: saves/merged; to merge a run of this recipe into output_dir/merged use "
                        f"{run_this_for('merge', r)}")
    target = _export_target(r, Path(r["export_dir"]))
    models, data, ex = recipe_args(r), data_args(r), export_args(r)
    files = export_files(r)
    if r["adapter_name_or_path"]:
        adapter = resolve_model_path(r["adapter_name_or_path"], key="adapter_name_or_path")  # a path or a hub id
        trained = _adapter_base_dtype(r, adapter)
        check = merge_adapter(models.model, data, ex, adapter, DTYPES[trained])
        source = f"adapter {r['adapter_name_or_path']}"
        onto = f" onto {r['model_name_or_path']}" + (" (in bf16, as its pure_bf16 run held it)"
                                                    if trained != weights_dtype(r) else "")
    else:
        _refuse_exporting_the_base_of_a_trained_run(RunLayout.of(r["output_dir"]), r["model_name_or_path"], models,
                                                    _recipe(r), run_this_for("merge", r))
        model = _load_base(models.model, ex, folded=False)
        samples = validation_samples(data, model.cfg)
        check = Verified(model, {"source": str(r["model_name_or_path"]), "samples": len(samples),
                                 "logits": {"fp32": 0.0}, "tolerance": {"fp32": LOGIT_RTOL["fp32"]}},
                         samples, _logits(model, samples))
        _check_cast(check, r["export_dtype"], {})
        source, onto = f"model {r['model_name_or_path']}", ""
    export(check, target, ex, files)
    note(f"exported {source}{onto} as {target} ({r['export_dtype']}, shards up to {r['export_size']} GB); loads "
         f"with transformers' AutoModelForCausalLM.from_pretrained('{target}')")
    return 0


def run_of(adapter: Path) -> RunLayout:
    """The run folder that wrote `adapter`, whose resolved.yaml says how it trained: adapter/'s parent, or for a
    run's checkpoint-<step>/adapter the run's folder above the checkpoint (a checkpoint holds no resolved.yaml: a
    merge recipe naming saves/x/checkpoint-500, LLaMA-Factory's way, read none)."""
    folder = adapter.parent
    return RunLayout(folder.parent if CHECKPOINT_NAME.fullmatch(folder.name) else folder)


def _adapter_base_dtype(r: Mapping[str, Any], adapter: Path) -> str:
    """The dtype the adapter's run held its base in (weights_dtype): a LLaMA-Factory merge recipe (model + the run's
    adapter) does not say it, but the run's resolved.yaml beside adapter/ does. A pure_bf16 run's adapter is folded
    onto the base in bf16, as `merge` of the run's own recipe folds it (onto the fp32 base it is another model, by
    the base's bf16 rounding); this recipe's own pure_bf16 still counts, and an adapter not from a run of ours goes
    by this recipe alone."""
    import yaml

    mine = weights_dtype(r)
    try:
        run = yaml.safe_load(run_of(adapter).resolved_yaml.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return mine
    return "bf16" if isinstance(run, dict) and weights_dtype(run) == "bf16" else mine


def _refuse_exporting_the_base_of_a_trained_run(out: RunLayout, model_name_or_path: str, models: RecipeModel,
                                                recipe: str, merge: str) -> None:
    """export without adapter_name_or_path writes model_name_or_path as it is. When this recipe trained other
    weights (its output_dir holds them), that would leave the fine-tune out of the export without a word. `merge`:
    the recipe's merge with the overrides typed (recipe.typed.run_this_for), which exports the trained model."""
    kind = models.finetune.finetuning_type
    trained = trained_weights(out, kind, None)
    if trained is None or trained.path.resolve() == resolve_model_path(model_name_or_path).resolve():
        return
    fix = f"adapter_name_or_path: {out.root}" if trains_adapter(kind) else f"model_name_or_path: {out.root}"
    raise UserError(f"{recipe}: export without adapter_name_or_path would write model_name_or_path "
                    f"({model_name_or_path}) unchanged, but this recipe trained {trained.path}. To export the "
                    f"trained model run {merge} (it writes export_dir when set), or "
                    f"set {fix}")


@dataclass
class ExportFiles:
    """What an export writes beside the weights: the tokenizer's files, generation_config.json, config.json's own
    token ids (base_config_ids), tokenizer_config.json's chat template (None keeps the base's), its eos_token
    (export_eos_token; None keeps the base's) and the chat template's copy with {% generation %} blocks for training
    on (TRAINING_TEMPLATE_FILE; None: no file)."""

    tokenizer: Tokenizer
    generation: Mapping[str, Any]
    config_ids: Mapping[str, Any] = field(default_factory=dict)
    chat_template: str | None = None
    eos_token: str | None = None
    training_chat_template: str | None = None
    source: Path | None = None  # the base checkpoint's folder (None: a preset): a wrapped model's other towers


def export_files(r: Mapping[str, Any]) -> ExportFiles:
    """merge's and export's ExportFiles for recipe `r`, gathered before any merging (cheap: configs are read)."""
    data = data_args(r)
    tokenizer = recipe_tokenizer(data)
    return ExportFiles(tokenizer, export_generation(r, tokenizer, data),
                       base_config_ids(recipe_args(r).model.model_name_or_path),
                       recipe_chat_template(data, tokenizer, key_at(r, "template")),
                       export_eos_token(data, tokenizer),
                       recipe_chat_template(data, tokenizer, key_at(r, "template"), marked=True),
                       base_folder(recipe_args(r).model.model_name_or_path))


@dataclass
class Verified:
    """The model to export, what the verification measured, and the reference logits the written files are
    checked against. export() takes the model (release) so that its memory is free before the files are read back."""

    model: nn.Module | None
    report: dict[str, Any]
    samples: list[list[int]]
    reference: list[torch.Tensor]

    def release(self) -> nn.Module:
        model, self.model = self.model, None
        if model is None:
            raise RuntimeError("this verified model was exported already")
        return model


# ---------------------------------------------------------------- loading
def adapter_dir(r: Mapping[str, Any]) -> Path:
    """The adapter to merge (pipeline.runtime.layout.trained_weights: the one this recipe trained, else
    adapter_name_or_path), or a UserError that says what produces one."""
    out = RunLayout.of(r["output_dir"])
    found = trained_weights(out, "lora", r["adapter_name_or_path"])  # any adapter method: adapter/
    if found is None:
        given = f" nor at adapter_name_or_path '{r['adapter_name_or_path']}'" if r["adapter_name_or_path"] else ""
        raise UserError(
            f"{out.adapter}: no adapter here{given} (adapter_config.json +"
            f" adapter_model.safetensors). {run_this_for('train', r)} produces"
            " output_dir/adapter/; or point adapter_name_or_path at an adapter directory (PEFT layout)."
        )
    return found.path


def _recipe(r: Mapping[str, Any]) -> str:
    return str(getattr(r, "recipe_path", None) or "<recipe>")


def _load_base(base: ModelArgs, ex: ExportArgs, trained: torch.dtype = torch.float32, *,
               folded: bool = True) -> nn.Module:
    """The base in fp32, its values those of `trained` (bf16: a pure_bf16 run's base, cast as train cast it). A QLoRA
    run's base unquantized, re-read from the checkpoint: the adapter folds into the model's own weights, and the
    export is a plain checkpoint (pipeline.model.build.unquantized)."""
    from pipeline.model.build import load_for_inference, unquantized

    device = "cuda" if ex.export_device == "auto" and torch.cuda.is_available() else "cpu"
    # export_device cpu (default): exact, and any size fits
    model = load_for_inference(unquantized(base), "base", device=device, dtype=trained)
    dequantized_base(model, base.model_name_or_path, folded)
    return model.float().eval()


def dequantized_base(model: nn.Module, model_name_or_path: str, folded: bool = True) -> None:
    """A pre-quantized checkpoint's base (the hub's unsloth/*-bnb-4bit) holds no other weights than its 4-bit codes:
    merge folds into their dequantized values, written in export_dtype, as unsloth's merged_16bit save does, and says
    so (LLaMA-Factory refuses instead: 'Cannot merge adapters to a quantized model.'). The original 16-bit weights
    are another checkpoint: merging into them is QLoRA's merge, with model_name_or_path set to it. `folded`: whether
    an adapter goes into it (export of a recipe without one writes the dequantized base alone)."""
    from pipeline.model.quantize import dequantize_model, stored_width

    width = stored_width(model)
    count = dequantize_model(model)
    if count:
        note(f"merge: {model_name_or_path} is a pre-quantized bitsandbytes checkpoint: the export holds its {width}"
             f" weights dequantized ({count} Linears){' with the adapter folded in' if folded else ''}, not the"
             " 16-bit weights it was"
             " quantized from; to merge into those, run merge with model_name_or_path=<the unquantized checkpoint>"
             " (e.g. unsloth/Llama-3.2-1B-Instruct for unsloth/Llama-3.2-1B-Instruct-bnb-4bit)")


def merge_adapter(base: ModelArgs, data: DataArgs, ex: ExportArgs, path: Path,
                  trained: torch.dtype = torch.float32, train: str | None = None) -> Verified:
    """The base with the adapter folded in (fp32) and the verification; UserError when it is not the adapter model.
    trained: the dtype the run held the base in (bf16 under pure_bf16): the adapter is folded into that base, the
    model that trained (B A onto the fp32 base would be another one, by the base's bf16 rounding). train: the command
    that trains it (rerun.run_this), for the refusal of an untrained adapter; None: the one its resolved.yaml
    records (trained_by)."""
    from pipeline.model import lora

    model = _load_base(base, ex, trained)
    lora.load_adapter(model, path)
    model.eval()
    samples = validation_samples(data, model.cfg)
    return merge_verified(model, samples, ex.export_dtype, source=str(path), cause=untrained_cause(path),
                          train=train or trained_by(path))


def reexport_full(models: RecipeModel, data: DataArgs, ex: ExportArgs, out: RunLayout, train: str,
                  start: torch.dtype = torch.float32) -> Verified:
    """full/freeze: output_dir/model re-exported; it must differ from the base and survive the dtype cast.
    start: the dtype the run started from the base in (bf16 under pure_bf16): the update is measured from that
    base, so that the base's own bf16 rounding counts neither as a change nor as an update the cast loses.
    train: the command that trains the run (rerun.run_this), for the message when there is nothing to re-export."""
    from pipeline.model.build import base_tensors
    from pipeline.model.weights import load_model

    kind = models.finetune.finetuning_type
    trained = trained_weights(out, kind, None)
    path = out.model
    if trained is None:
        raise UserError(
            f"{path}: no trained model here (finetuning_type {kind} writes output_dir/model/)."
            f" {train} produces it."
        )
    model = load_model(path).float().eval()
    state = model.state_dict()
    changed = {n: _cast_loss(state[n], b, ex.export_dtype)  # the base is read a tensor at a time
               for n, b in ((n, b.to(start).float()) for n, b in base_tensors(models.model))
               if n in state and b.shape == state[n].shape and not torch.equal(b, state[n])}
    if not changed:
        raise UserError(f"{path}: every weight equals the base model's ({models.model.model_name_or_path}); the"
                        " training run did not change the model (learning_rate 0? zero steps?)")
    samples = validation_samples(data, model.cfg)
    report = {"source": str(path), "samples": len(samples), "tokens": sum(len(s) for s in samples),
              "changed_tensors": len(changed), "logits": {"fp32": 0.0}, "tolerance": {"fp32": LOGIT_RTOL["fp32"]}}
    check = Verified(model, report, samples, _logits(model, samples))
    _check_cast(check, ex.export_dtype, changed)
    return check


# ---------------------------------------------------------------- samples
def validation_samples(data: DataArgs, cfg: ModelConfig) -> list[list[int]]:
    """A few real token sequences as training sees them (val split, else train); fixed tokens when there is no data.
    At most MAX_SAMPLE_TOKENS long, and within the model's length limit (context, sliding window)."""
    from pipeline.data.tokenize import pt_stream, tokenized_split

    limit = min(length_limit(cfg) or MAX_SAMPLE_TOKENS, MAX_SAMPLE_TOKENS)
    for split in ("val", "train") if data.dataset else ():
        try:
            if data.stage == "pt":
                stream = pt_stream(data, split)
                samples = [stream[i * limit:(i + 1) * limit].tolist() for i in range(NUM_SAMPLES)]
            elif data.paired:  # dpo, rm: the chosen sequences; kto: the examples, not the KL ones
                from pipeline.data.loaders import tokenized_pair_split

                examples = tokenized_pair_split(data, split).chosen
                samples = [examples.example(i).input_ids[:limit] for i in range(min(NUM_SAMPLES, len(examples)))]
            else:
                examples = tokenized_split(data, split)
                samples = [examples.example(i).input_ids[:limit] for i in range(min(NUM_SAMPLES, len(examples)))]
        except UserError:
            samples = []
        samples = [s for s in samples if s]
        if samples:
            return samples
    if not data.dataset:  # a LLaMA-Factory merge recipe: `make data` has nothing to build for it
        note("merge: the recipe names no dataset, so the verification runs on fixed pseudo-random tokens (with a "
             "`dataset` line it would use real rows)")
    else:
        from pipeline.rerun import run_this

        note(f"merge: no built data found for the verification ({run_this('data', data.recipe, data.overrides)} "
             "builds it); using fixed pseudo-random tokens")
    gen = torch.Generator().manual_seed(0)
    vocab = recipe_tokenizer(data).n_vocab
    return [torch.randint(0, vocab, (min(limit, 64),), generator=gen).tolist() for _ in range(NUM_SAMPLES)]


# ---------------------------------------------------------------- verification
@torch.no_grad()
def _logits(model: nn.Module, samples: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(torch.tensor([ids], dtype=torch.long, device=device))[0].float().cpu() for ids in samples]


def _rel_error(got: Sequence[torch.Tensor], want: Sequence[torch.Tensor]) -> float:
    """max |got - want| / max |want| after centring each position's logits (softmax ignores a shift); inf when
    `got` is not finite (an overflow in the export dtype).

    Written for a 128k vocabulary, where one sample's logits are 128 MB: centring both, subtracting and taking
    magnitudes made five such copies (and isfinite a sixth pass), half of a Llama 3 merge's time. Centring commutes
    with the difference: per position, with d = got - want and s = mean(got) - mean(want), the centred error is
    max(max(d) - s, s - min(d)), and the centred reference's magnitude is max(max(w) - mean(w), mean(w) - min(w)).
    So one difference per block of _ROWS positions (a few MB, reused) and reductions give the same quantity; a
    non-finite value in got reaches d's max or min (or the mean), so the result says inf as before.
    """
    if got and got[0].shape[-1] == 1:  # a reward model's score per position: no softmax, so no shift to forgive
        errors = [float((g - w).abs().max()) for g, w in zip(got, want)]
        if not all(map(math.isfinite, errors)):  # max() of floats would pass over a nan
            return float("inf")
        return max(errors) / max(max(float(w.abs().max()) for w in want), 1e-12)
    err = scale = 0.0
    for g, w in zip(got, want):
        for gb, wb in zip(g.reshape(-1, g.shape[-1]).split(_ROWS), w.reshape(-1, w.shape[-1]).split(_ROWS)):
            d, w_mean = gb - wb, wb.mean(-1)
            shift = gb.mean(-1) - w_mean
            block_err = torch.maximum(d.amax(-1) - shift, shift - d.amin(-1)).max().item()
            if not math.isfinite(block_err):
                return float("inf")
            err = max(err, block_err)
            scale = max(scale, torch.maximum(wb.amax(-1) - w_mean, w_mean - wb.amin(-1)).max().item())
    return err / max(scale, 1e-12)


@torch.no_grad()
def merge_verified(model: nn.Module, samples: Sequence[Sequence[int]], export_dtype: str, *,
                   source: str = "adapter", cause: str | None = None, train: str | None = None) -> Verified:
    """Fold every LoRA layer of `model` into its base weight, in place, proving each fold and then the whole.

    Layer by layer: the folded Linear (lora.fold_lora) minus the base must be the layer's update (the LoRA
    branch; DoRA's rescaled sum) on random inputs, and must not be zero; then the merged model's logits must
    equal the adapter model's, taken before the first fold. In place, the memory is the model once plus one
    layer's base weight (kept for its check): keeping the adapter model next to a merged copy would double it.
    Layers whose update is nothing (an untrained adapter) are refused first, in one message (untrained_message;
    `cause`: why its run left them so, when the caller knows: untrained_cause; `train`: the command that trains it).
    """
    from pipeline.model import lora

    names = list(lora.lora_modules(model))  # names only: a held wrapper would keep its base weight alive
    shown = hf_namer(model)
    if not names:
        raise UserError(f"{source}: the adapter has no LoRA layers to merge")
    zero = {shown(n): which for n, which in untrained_layers(model, names).items()}
    if zero:
        raise UserError(untrained_message(source, zero, len(names), cause, train))
    reference = _logits(model, samples)
    gen = torch.Generator().manual_seed(0)
    layers: dict[str, dict[str, float]] = {}
    casts: dict[str, tuple[float, float]] = {}
    problems: list[str] = []
    for ours in names:
        name = shown(ours)  # what the user knows the layer as (the family's HF module name)
        wrapper = model.get_submodule(ours)
        base_linear = wrapper.linear
        base_weight = base_linear.weight.detach().clone()  # measured before the fold, which must not change it
        x = torch.randn(8, base_linear.in_features, generator=gen).to(base_weight)
        base_out = base_linear(x)
        want = wrapper(x) - base_out  # the update as the adapter model computes it (eval mode: no dropout)
        merged_linear = lora.fold_lora(wrapper)
        if not isinstance(merged_linear, nn.Linear) or lora.lora_modules(merged_linear):
            problems.append(f"layer {name}: still a LoRA wrapper after merging ({type(merged_linear).__name__})")
            continue
        delta = merged_linear.weight.float() - base_weight.float()
        if not delta.any() and want.any():  # an idle expert's update is nothing (untrained_layers)
            problems.append(f"layer {name}: the merged weight equals the base weight although its LoRA update is"
                            " non-zero (the adapter looks untrained/empty, or the merge did not apply it)")
            continue
        got = merged_linear(x) - base_out
        err = (got - want).abs().max().item()
        bound = LAYER_RTOL * want.abs().max().item() + LAYER_ATOL * base_out.abs().max().item()
        layers[name] = {"delta_max_abs": delta.abs().max().item(), "branch_max_abs": want.abs().max().item(),
                        "max_abs_error": err}
        if not err <= bound:
            problems.append(
                f"layer {name}: merged weight - base weight is not the LoRA update (max error {err:.3g} on an"
                f" update of size {want.abs().max().item():.3g}); a wrong scale (alpha/r) or a transposed delta"
            )
            continue
        casts[name] = _cast_loss(merged_linear.weight, base_weight, export_dtype)
        model.set_submodule(ours, merged_linear)  # the wrapper, and with it the base weight, goes
        del wrapper, base_linear, base_weight
        hostmem.release_freed()  # their space, left inside the C heap
    if problems:
        raise UserError(problems)

    fp32_err = _rel_error(_logits(model, samples), reference)
    report: dict[str, Any] = {"source": source, "samples": len(samples), "tokens": sum(len(s) for s in samples),
                              "layers": layers, "logits": {"fp32": fp32_err}, "tolerance": {"fp32": LOGIT_RTOL["fp32"]}}
    if not fp32_err <= LOGIT_RTOL["fp32"]:
        raise UserError(f"merged model: logits differ from the adapter model by {fp32_err:.3g} (relative, tolerance"
                        f" {LOGIT_RTOL['fp32']:g}) although every LoRA layer matches: a module outside the LoRA"
                        " layers behaves differently after the merge (please report it with the recipe)")
    check = Verified(model, report, list(map(list, samples)), reference)
    _check_cast(check, export_dtype, casts)
    return check


def untrained_layers(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Each adapted layer among `names` (ours) whose update is nothing -> the PEFT tensor that makes it so
    (AdapterLinear.unchanged_by). A MoE expert's Linear counts only where its whole fused tensor's update is nothing
    (pipeline.model.expert_lora: PEFT trains one lora_B over every expert of a block): an expert the router sent no
    token in training keeps its zero update beside the trained ones, as in PEFT, which merges that adapter, and
    lora_target cannot leave one expert out."""
    from pipeline.model.expert_lora import FUSED, expert_of

    def fused(name: str) -> tuple[str, str] | None:
        expert = expert_of(name)
        return None if expert is None else (expert[0], FUSED[expert[2]])

    zero = {n: which for n in names if (which := model.get_submodule(n).unchanged_by()) is not None}
    moved = {fused(n) for n in names if n not in zero} - {None}
    return {n: which for n, which in zero.items() if fused(n) is None or fused(n) not in moved}


def untrained_message(source: str, zero: Mapping[str, str], layers: int, cause: str | None = None,
                      train: str | None = None) -> str:
    """One message for the adapter layers whose update is nothing (`zero`: the family's layer name -> the PEFT tensor
    that is all zero, AdapterLinear.unchanged_by), out of `layers`: merging them changes nothing, which says the
    adapter (or those layers) did not train. One line per layer said the same thing a dozen times (every layer of a
    GPT-2 adapter from a run whose only step trained at lr 0). `train`: the command that trains the adapter's run
    (rerun.run_this: its recipe and overrides; None: none is known, an adapter from elsewhere)."""
    from pipeline.rerun import run_this

    train = train or run_this("train", None)
    which = " / ".join(sorted(set(zero.values())))
    if len(zero) < layers:
        shown = ", ".join(list(zero)[:4]) + (f" and {len(zero) - 4} more" if len(zero) > 4 else "")
        return (f"{source}: {which} is all zero in {len(zero)} of its {layers} adapted layers ({shown}), so merging"
                " would leave those layers as the base's. Likely cause: no gradient reached them in training (the"
                " loss does not depend on them), or the adapter file was edited. Fix: leave them out of lora_target"
                f" and train again ({train}); nothing was written")
    cause = cause or ("it was saved before any optimizer step, every step it took trained at lr 0 (a warmup covering a"
                      " 1-step run: the warmup starts at lr 0), or it was written from ZeRO-3 partitions without"
                      " gathering")
    return (f"{source}: the adapter is untrained: {which} is all zero in all {layers} of its adapted layers, so"
            f" merging would change nothing (the merged model would equal the base). Likely cause: {cause}. Fix:"
            " train again with steps at a learning rate above 0 (warmup_ratio: 0, or more steps: max_steps),"
            f" {train}; nothing was written")


def trained_by(adapter: Path) -> str | None:
    """The command that trains the run whose adapter/ (or checkpoint-<step>/adapter) `adapter` is: its recipe and
    command-line overrides as the run's resolved.yaml records them (recipe.resolve.recorded_command), typed in the
    folder the run was started in (`cd recipes && ...` for a run trained there: named from here, its relative
    output_dir would be another folder than this adapter's); None for an adapter without one (PEFT's, the hub's).
    A checkpoint's is its run's (run_of: a merge recipe naming saves/x/checkpoint-500 was told a bare `make train`,
    the Makefile's default recipe). Its python -m form carries --retrain-finished where that run finished
    (resolve.recorded_finished), which train would refuse to replace without it."""
    from pipeline.recipe.resolve import recorded_command, recorded_finished
    from pipeline.rerun import run_this

    try:
        text = run_of(adapter).resolved_yaml.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    recorded = recorded_command(text)
    return None if recorded is None else run_this("train", *recorded, finished=recorded_finished(text))


def untrained_cause(adapter: Path) -> str | None:
    """Why the run that wrote `adapter` (its resolved.yaml beside it, when it is a run's adapter/) trained nothing,
    when its recipe says so: a warmup that leaves a 1-step run's only step at lr 0 (steps.warmup_waste, which plan
    and train said as a notice); else None (untrained_message's general causes)."""
    import yaml

    from pipeline.recipe.steps import steps_word, warmup_waste

    resolved = run_of(adapter).resolved_yaml
    try:
        run = yaml.safe_load(resolved.read_text(encoding="utf-8"))
        total, warmup = run["total_steps"], run["num_warmup_steps"]
    except (OSError, yaml.YAMLError, TypeError, KeyError):
        return None
    if total != 1 or warmup_waste(total, warmup) is None:  # a later step trains at lr > 0: not the warmup's doing
        return None
    key = "warmup_steps" if run.get("warmup_steps") is not None else "warmup_ratio"
    return (f"its run ({resolved}) trained {steps_word(total)} with {key} {run[key]:g}, which is {warmup} warmup"
            f" step{'s' * (warmup > 1)}: {warmup_waste(total, warmup)}")


def hf_namer(model: nn.Module):
    """Our module/parameter path -> the family's HF name without the model prefix (h.0.attn.c_attn, layers.0...)."""
    from pipeline.model.lora import family_of_model

    family = family_of_model(model)
    return lambda name: family.strip(family.to_hf(name))


def _cast_loss(new: torch.Tensor, base: torch.Tensor, export_dtype: str) -> tuple[float, float]:
    """(norm of the part of the update new - base that casting both to export_dtype rounds away, norm of the update)."""
    delta = new.float() - base.float()
    if export_dtype == "fp32":
        return 0.0, delta.norm().item()
    dtype = DTYPES[export_dtype]
    kept = new.to(dtype).float() - base.to(dtype).float()
    return (kept - delta).norm().item(), delta.norm().item()


@torch.no_grad()
def _check_cast(check: Verified, export_dtype: str, casts: Mapping[str, tuple[float, float]]) -> None:
    """The model as it will be exported (export_dtype) must still be the verified model; it is cast in place.

    `casts` holds each fine-tuned weight's _cast_loss. A dtype with too few mantissa bits rounds a
    small update away (the export would be close to the base: the bug this stage exists to prevent),
    so the part of the whole update lost in the cast (Frobenius norm over all of them) must stay under
    MAX_UPDATE_LOST; then the cast model's logits must match within the dtype's tolerance.
    """
    if export_dtype == "fp32":
        return
    per_layer = {name: err / max(size, 1e-30) for name, (err, size) in casts.items()}
    update_sq = sum(size**2 for _, size in casts.values())
    lost = (sum(err**2 for err, _ in casts.values()) / update_sq) ** 0.5 if update_sq else 0.0
    check.report["update_lost"] = {export_dtype: lost}
    if "layers" in check.report:
        for name, value in per_layer.items():
            check.report["layers"][name][f"update_lost_{export_dtype}"] = value
    if lost > MAX_UPDATE_LOST:
        worst = sorted(per_layer, key=lambda n: -per_layer[n])[:3]
        raise UserError(
            f"export_dtype {export_dtype}: casting the merged model loses {100 * min(lost, 1):.0f}% of the"
            f" fine-tuning update (worst layers: {', '.join(f'{n} {100 * min(per_layer[n], 1):.0f}%' for n in worst)});"
            f" the update is small next to the weights and {export_dtype} rounds it away, so the export would be"
            " close to the base model. Use export_dtype: fp32"
        )
    assert check.model is not None
    check.model.to(DTYPES[export_dtype])  # in place, tensor by tensor: the export writes this dtype anyway
    hostmem.release_freed()
    err = _rel_error(_logits(check.model, check.samples), check.reference)
    check.report["logits"][export_dtype] = err
    check.report["tolerance"][export_dtype] = LOGIT_RTOL[export_dtype]
    if not err <= LOGIT_RTOL[export_dtype]:
        raise UserError(f"merged model cast to {export_dtype}: logits differ from the fp32 model by {err:.3g}"
                        f" (relative, tolerance {LOGIT_RTOL[export_dtype]:g}; inf means overflow); use export_dtype:"
                        f" {'fp32 or bf16' if export_dtype == 'fp16' else 'fp32'}")


# ---------------------------------------------------------------- export
def _export_target(r: Mapping[str, Any], target: Path) -> Path:
    """`target`, once it is safe to replace as a whole (export swaps a new folder in and deletes the old one): not
    a file, not the run merged from or any input, and new, empty or an earlier export. Checked before any work."""
    key = "export_dir" if r.get("export_dir") else "output_dir"
    named = guard.protected({**{k: r[k] for k in guard.INPUT_KEYS}, "output_dir, the run merged from": r["output_dir"]},
                            r.files)
    guard.refuse_to_clear(target, key_at(r, key), key, named, ours=VERIFICATION)
    folder = target.absolute().parent  # the export is built beside target, then swapped in
    place = next(p for p in (folder, *folder.parents) if p.exists())
    if not os.access(place, os.W_OK | os.X_OK):  # a read-only file system too: found before the model is merged
        raise UserError(f"{key_at(r, key)}: {target} cannot be written: {place} is not writable (a read-only file "
                        f"system, or no permission); nothing was done. Choose another {key}")
    return target


def export(check: Verified, target: Path, ex: ExportArgs, files: ExportFiles) -> Path:
    """save_hf + the files beside the weights (ExportFiles) + verification.json, as one atomic directory.

    The written files are loaded back and checked against the reference logits before the directory
    is put in place, so what is on disk is what was verified. The model in memory is let go before
    they are read, so the check does not hold two models.
    """
    from pipeline.model.weights import load_model, save_hf, shard_bytes_from_gb

    dtype = ex.export_dtype
    model = check.release()
    context_length = model.cfg.context_length
    with atomic_dir(target) as tmp:
        save_hf(model, tmp, dtype=dtype, max_shard_bytes=shard_bytes_from_gb(ex.export_size),
                special={k: v for k, v in files.generation.items() if k.endswith("_token_id")},
                config_ids=files.config_ids, source=files.source)
        del model
        hostmem.release_freed()
        written = load_model(tmp).eval()
        err = _rel_error(_logits(written, check.samples), check.reference)
        del written
        if not err <= LOGIT_RTOL[dtype]:
            raise UserError(f"{target}: the written model's logits differ from the verified model by {err:.3g}"
                            f" (relative, tolerance {LOGIT_RTOL[dtype]:g}); nothing was written")
        check.report["logits"]["written"] = err
        write_tokenizer_files(tmp, files.tokenizer, context_length, files.chat_template, files.eos_token)
        if files.training_chat_template is not None:
            write_text(tmp / TRAINING_TEMPLATE_FILE, files.training_chat_template)
        write_json(tmp / "generation_config.json", files.generation)
        write_json(tmp / VERIFICATION, {**check.report, "export_dtype": dtype})
    return target


DECODING_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "num_beams",
                 "length_penalty", "early_stopping")


def export_generation(r: Any, tokenizer: Tokenizer, data: DataArgs) -> dict[str, Any]:
    """The export's generation_config.json: the base checkpoint's, the recipe's decoding keys where it sets them,
    and the stop ids `python -m pipeline generate` stops at (export_stop_ids)."""
    from pipeline.data.tokenizer_files import optional_json
    from pipeline.model.config import config_path

    path = config_path(r["model_name_or_path"])  # None for a preset
    base = optional_json(path.parent / "generation_config.json") if path else {}
    explicit = {k for k in DECODING_KEYS if r.origin(k).kind in ("file", "cli")}
    return generation_config(GenerationArgs.from_recipe(r), tokenizer, base, explicit,
                             stops=export_stop_ids(data, tokenizer))


def export_stop_ids(data: DataArgs, tokenizer: Tokenizer) -> tuple[int, ...]:
    """Where the exported model's generation stops: the recipe's template's stop ids (Template.stop_ids: its EOS,
    its stop words, the tokenizer's), as `generate` and eval stop; pt, trained in no chat format: the tokenizer's.

    A base checkpoint stops at its end of text only (Qwen2.5 / Qwen3-Base: <|endoftext|>; Llama 3 base:
    <|end_of_text|>), but a model fine-tuned on qwen or llama3 ends an answer with <|im_end|> / <|eot_id|>:
    without them in generation_config.json's eos_token_id, transformers' generate and vLLM run on past the answer
    into turns the model makes up (LLaMA-Factory's export sets the template's stop word as the EOS too)."""
    if data.stage == "pt":
        return tuple(tokenizer.stop_ids)
    return data.chat_template().stop_ids(tokenizer)


def export_eos_token(data: DataArgs, tokenizer: Tokenizer) -> str:
    """The export tokenizer's eos_token: the token the fine-tune ends each answer with (Template.ids' EOS: for a
    `replace_eos` template, llama3, qwen, qwen3, qwen3_nothink, chatml, its first stop word, else the tokenizer's
    EOS); pt, trained in no chat format, ends documents with the tokenizer's EOS.

    Why: a Llama 3 base says <|end_of_text|> and a Qwen2.5 / Qwen3-Base <|endoftext|>, while a model tuned on llama3
    or qwen ends its answer with <|eot_id|> / <|im_end|>. generation_config.json lists both (export_stop_ids), but
    tools that stop at tokenizer.eos_token (TGI, transformers pipelines, LLaMA-Factory's chat on the export) would
    run past the answer. LLaMA-Factory's Template.fix_special_tokens makes the same change (replace_eos: eos_token
    becomes stop_words[0]) before its export saves the tokenizer. It also registers the other stop words as
    additional special tokens, adding them to a vocabulary that lacks them; here a template whose words the
    vocabulary lacks is refused, and in the Llama 3 and Qwen vocabularies they are special tokens already."""
    from pipeline.data.templates import EOS

    if data.stage == "pt":
        return tokenizer.eos_text
    eos = data.chat_template().ids(tokenizer)[EOS]
    assert eos is not None  # Template.ids: the first stop word the vocabulary has, or the tokenizer's EOS
    return tokenizer.decode([eos])


def base_config_ids(model_name_or_path: str) -> dict[str, Any]:
    """The base config.json's own eos_token_id, for the export's config.json: {} for a preset or a config without
    one (save_hf then writes the first stop id).

    Writing the first stop id changed model.config.eos_token_id for code that reads it: Llama-3.x-Instruct's
    [128001, 128008, 128009] became 128001, and a config saying 128009 (<|eot_id|>) also became 128001.
    Generation is unaffected either way; generation_config.json holds the stop ids.
    """
    from pipeline.model.config import config_path, read_raw

    path = config_path(model_name_or_path)  # None for a preset
    raw = read_raw(path) if path else {}
    return {"eos_token_id": raw["eos_token_id"]} if "eos_token_id" in raw else {}


def generation_config(gen: GenerationArgs, tokenizer: Tokenizer, base: Mapping[str, Any] | None = None,
                      explicit: set[str] | frozenset[str] = frozenset(),
                      stops: Sequence[int] | None = None) -> dict[str, Any]:
    """transformers' generate() defaults: the tokenizer's BOS / pad, `stops` (by default the tokenizer's stop ids;
    an export passes export_stop_ids) as eos_token_id; the decoding settings of the base
    checkpoint's generation_config.json (`base`), overridden by the recipe's keys it sets (`explicit`); the
    recipe's own for what neither says. Why the base's first: its sampling defaults (Qwen3's temperature 0.6,
    top_k 20, top_p 0.95) are how the model's authors meant it to be run, and a recipe's defaults are not a
    decision to change them."""
    stops = list(tokenizer.stop_ids if stops is None else stops)
    config: dict[str, Any] = {k: v for k, v in (base or {}).items() if not k.startswith("_")}
    given = config.get("eos_token_id")
    if set(given if isinstance(given, list) else [given]) != set(stops):  # the same stop ids keep the base's order
        config["eos_token_id"] = stops[0] if len(stops) == 1 else stops
    config["pad_token_id"] = tokenizer.pad_id
    if tokenizer.bos_id is not None or "bos_token_id" not in config:
        config["bos_token_id"] = tokenizer.bos_id
    ours = {"max_new_tokens": gen.max_new_tokens, "do_sample": gen.do_sample}
    if gen.do_sample:
        ours.update(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p)
    if gen.repetition_penalty != 1.0 or "repetition_penalty" in explicit:  # 1 is off (transformers too)
        ours["repetition_penalty"] = gen.repetition_penalty
    if gen.num_beams != 1 or "num_beams" in explicit:  # beam search's keys, only when it searches (1 is off)
        ours.update(num_beams=gen.num_beams, length_penalty=gen.length_penalty, early_stopping=gen.early_stopping)
    config.update({k: v for k, v in ours.items() if k in explicit or k not in config})
    if not config.get("do_sample"):  # greedy: sampling settings would only draw transformers' warnings
        for key in ("temperature", "top_k", "top_p"):
            config.pop(key, None)
    return config


def _split(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> list[bytes]:
    """Run byte-level BPE on `token` with merges of lower rank only: the last merge leaves its two parts."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(parts[i] + parts[i + 1], rank), i) for i in range(len(parts) - 1)]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


# hf_tokenizer_files' text, kept beside the offline ranks file it was rebuilt from (named after the pinned ranks'
# sha256 and the file's format: a change to either is a new name, never a stale file), and GPT2_HF_SUMS, written last:
# each file's sha256 (a kept file read back must match it, see _read_kept)
GPT2_HF_FILES = ("vocab.json", "merges-v0.2.txt")
GPT2_HF_SUMS = "sha256.json"


@functools.lru_cache(maxsize=1)
def hf_tokenizer_files() -> tuple[str, str]:
    """(vocab.json, merges.txt) text of GPT-2's tokenizer, rebuilt from the offline tiktoken ranks the first time
    and then read back from beside them: the rebuild runs BPE on each of 50,000 tokens (about a CPU-second, in every
    GPT-2 merge and every full or freeze GPT-2 run's export), and its result is a function of the pinned ranks
    alone. Nothing is kept without the offline ranks file (tiktoken's download), or where it cannot be written."""
    from pipeline.data.tokenizer import RANKS_SHA256, ranks_path

    kept = ranks_path().with_name(f"gpt2-hf-{RANKS_SHA256[:16]}")
    texts = _read_kept(kept)
    if texts is not None:
        return texts
    vocab, merges = _rebuild_hf_tokenizer_files()
    if ranks_path().is_file():
        # fsynced before the rename (pipeline.io): a power loss leaves the whole file or none, never a short one
        # that every later export would copy; a read-only or full cache is rebuilt in the next process too
        with contextlib.suppress(OSError, UserError):
            for name, text in zip(GPT2_HF_FILES, (vocab, merges)):
                write_text(kept / name, text)
            write_json(kept / GPT2_HF_SUMS, {name: _sha256(text) for name, text in zip(GPT2_HF_FILES, (vocab, merges))})
    return vocab, merges


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_kept(kept: Path) -> tuple[str, str] | None:
    """The kept (vocab, merges) text when both files match the sha256 written after them; None (rebuild) when a
    file is missing, short or changed: one kept by a release that wrote it without fsync may be short after a
    power loss, and nothing in a truncated merges.txt would say so to the tokenizer that reads it."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: JSON or UTF-8 that does not decode
        sums = json.loads((kept / GPT2_HF_SUMS).read_text(encoding="utf-8"))
        vocab, merges = ((kept / name).read_text(encoding="utf-8") for name in GPT2_HF_FILES)
        if isinstance(sums, dict) and [sums.get(name) for name in GPT2_HF_FILES] == [_sha256(vocab), _sha256(merges)]:
            return vocab, merges
    return None


def _rebuild_hf_tokenizer_files() -> tuple[str, str]:
    """hf_tokenizer_files' text from the ranks: vocab.json maps each token's bytes (as GPT-2's byte-to-unicode
    characters) to its rank; merges.txt lists, in rank order, the two parts whose merge makes each token."""
    from pipeline.data.tokenizer import GPT2_EOS, gpt2, gpt2_encoding
    from pipeline.data.tokenizer_files import bytes_to_unicode

    tok = gpt2()
    ranks: Mapping[bytes, int] = gpt2_encoding().ranks
    byte_char = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(byte_char[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    vocab[GPT2_EOS] = tok.eos_id
    merges = ["#version: 0.2"]
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _split(token, rank, ranks)
            merges.append(f"{text(left)} {text(right)}")
    return json.dumps(vocab, ensure_ascii=False), "\n".join(merges) + "\n"


def write_tokenizer_files(directory: Path, tokenizer: Tokenizer, context_length: int,
                          chat_template: str | None = None, eos_token: str | None = None) -> None:
    """The base model's tokenizer files (copied), or GPT-2's rebuilt from the ranks, so that
    AutoTokenizer.from_pretrained(merged) works offline; with `chat_template`, tokenizer_config.json's
    chat_template is that one (set_chat_template); with `eos_token`, the tokenizer's EOS is that one
    (set_eos_token); the recipe's new tokens and split_special_tokens as `tokenizer` has them
    (write_recipe_settings)."""
    from pipeline.data.tokenizer_files import CHAT_TEMPLATE_FILES, write_recipe_settings

    if tokenizer.files:
        for path in tokenizer.files:
            if chat_template is not None and path.name in CHAT_TEMPLATE_FILES:
                continue  # transformers reads these before tokenizer_config.json: the base's would win
            relative = path.name if path.parent.name != "original" else f"original/{path.name}"
            (directory / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, directory / relative)
        if chat_template is not None and set_chat_template(directory, chat_template, tokenizer.files):
            note("merge: the export's tokenizer_config.json holds the recipe's template as chat_template (the format "
                 "the model was trained on), in place of the base model's own chat template")
        if eos_token is not None and eos_token != tokenizer.eos_text:  # else the files stay as the base has them
            set_eos_token(directory, eos_token)
            note(f"merge: the export's tokenizer says eos_token {eos_token}, the end of an answer in the recipe's "
                 f"template, in place of the base model's {tokenizer.eos_text}")
        write_recipe_settings(directory, tokenizer)
        return
    from pipeline.data.tokenizer import GPT2_EOS as EOS_TEXT

    vocab, merges = hf_tokenizer_files()
    write_text(directory / "vocab.json", vocab)
    write_text(directory / "merges.txt", merges)
    special = {"bos_token": EOS_TEXT, "eos_token": eos_token or EOS_TEXT, "unk_token": EOS_TEXT, "pad_token": EOS_TEXT}
    write_json(directory / "special_tokens_map.json", special)
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": context_length, "add_prefix_space": False,
        "add_bos_token": False, "clean_up_tokenization_spaces": False, **special,
        **({"chat_template": chat_template} if chat_template is not None else {}),
    })
    write_recipe_settings(directory, tokenizer)


def set_chat_template(directory: Path, chat_template: str, base_files: Sequence[Path]) -> bool:
    """directory/tokenizer_config.json (as copied from the base; every other key kept) with `chat_template`;
    True when the base had another chat template, which this one replaces.

    Replaced whatever the base said, as LLaMA-Factory does for its own templates: the model was trained on the
    recipe's template, and the base's chat template (an Instruct model's own: Llama 3.1's with its dated system
    prompt, Qwen3's) prompts it in another format, or without the recipe's default_system."""
    from pipeline.data.tokenizer_files import CHAT_TEMPLATE_FILES, optional_json

    path = directory / "tokenizer_config.json"
    config = optional_json(path)
    base = config.get("chat_template")
    for file in base_files:  # what transformers would have read instead
        if file.name in CHAT_TEMPLATE_FILES:
            base = (file.read_text(encoding="utf-8") if file.suffix == ".jinja"
                    else optional_json(file).get("chat_template"))
    write_json(path, {**config, "chat_template": chat_template})
    return bool(base) and base != chat_template


def set_eos_token(directory: Path, eos_token: str) -> None:
    """directory's tokenizer_config.json and special_tokens_map.json (as copied from the base; every other key
    kept) with `eos_token`.

    Both files: transformers reads special_tokens_map.json's eos_token over tokenizer_config.json's, and a base may
    spell it there as an AddedToken object ({"content": ..., "lstrip": ...}), whose other fields are kept."""
    from pipeline.data.tokenizer_files import optional_json

    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = directory / name
        if name == "tokenizer_config.json" or path.is_file():
            config = optional_json(path)
            given = config.get("eos_token")
            token = {**given, "content": eos_token} if isinstance(given, dict) else eos_token
            write_json(path, {**config, "eos_token": token})
