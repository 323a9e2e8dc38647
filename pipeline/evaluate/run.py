"""`python -m pipeline eval RECIPE`: held-out loss/perplexity and generation metrics, base vs tuned, and a report.

Read top to bottom: pick the models (tuned = output_dir/merged when it is up to date, else base +
adapter, or output_dir/model for full/freeze), then for each model

1. loss and perplexity over the whole val split (or eval_dataset) with exactly the training masks:
   the data layer's loader batches, forward(labels=..., reduction="sum"), summed over trained tokens
   (so the tuned loss is the trainer's final eval_loss), in the run's precision (pipeline.recipe.precision
   eval_precision, recorded in metrics.json and the report: pure_bf16 evaluates the bf16 weights without
   autocast, as the run trained and logged eval_loss);
2. sft only: a completion for each of the first max_eval_samples examples with the recipe's decoding
   settings (batched, left-padded, KV cache), cut at stop strings, scored against the reference.

For a dpo recipe the loss is over the chosen responses of the held-out pairs, the generations are scored
against the chosen responses, and pipeline.evaluate.preference adds preference accuracy and reward margins.
An rm recipe (a reward model: no text to generate) gets pipeline.evaluate.reward's pairwise loss and accuracy.
A recipe with `task` runs LLaMA-Factory's multiple-choice benchmark instead (pipeline.evaluate.choice).

With WORLD_SIZE > 1 every rank takes every world_size-th batch / example, the sums and predictions
are gathered, and rank 0 writes output_dir/eval/ (metrics.json, predictions.jsonl, report.md, plots).
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.evaluate import preference, report, reward
from pipeline.evaluate.devices import autocast as _autocast, device as _device
from pipeline.model.weights import DTYPES, note
from pipeline.data.args import DataArgs
from pipeline.data.loaders import tokenized_pair_split
from pipeline.data.registry import dataset_names
from pipeline.names import PREFERENCE_STAGES, trains_adapter
from pipeline.recipe.args import EvalArgs, GenerationArgs, data_args, eval_args, preference_args, recipe_args
from pipeline.recipe.typed import run_after_build_for, run_this_for
from pipeline.recipe.precision import eval_precision, weights_dtype
from pipeline.runtime.inference import load_weights
from pipeline.runtime.layout import RunLayout, Weights, current_weights, describe, trained_weights

# Set by the Makefile's `all`, which ends with its own `report: <path>` line (also when eval was up to date and did not
# run): eval's summary then leaves the path out, so that `make all` names the report once, last.
REPORT_BY_MAKE = "PIPELINE_REPORT_BY_MAKE"


def check_start(r: Mapping[str, Any], args: Any = None) -> None:
    """eval's refusals that need no model and no data (nothing trained to evaluate; the benchmark's own), asked
    before overwrite_cache's build (pipeline.__main__.refuse_before_build): the build rewrote the data and only then
    was the evaluation refused."""
    if r.get("task") is not None:
        from pipeline.evaluate import choice

        choice.check_start(r)
    else:
        tuned_model(r)


def run(r: Mapping[str, Any], args: Any = None) -> int:
    if r.get("task") is not None:  # LLaMA-Factory's eval recipe: a multiple-choice benchmark, not the held-out split
        from pipeline.evaluate import choice

        return choice.run(r, args)
    tuned = tuned_model(r)  # nothing trained: the first thing to say (train it), before the data's state
    data, ev, gen, pref = data_args(r), eval_args(r), GenerationArgs.from_recipe(r), preference_args(r)
    sft = ev.stage in ("sft", *PREFERENCE_STAGES)  # generation metrics (dpo: against the chosen responses)
    rows = _generation_rows(r, data, ev) if sft else []  # an empty split is refused before the ranks meet
    rank, world = _init_distributed()
    out = Path(r["output_dir"])
    dpo = ev.stage in PREFERENCE_STAGES  # log-probs of pairs (kto: of examples and their KL sequences)
    rm = ev.stage == "rm"  # a reward model's scores of the pairs (pipeline.evaluate.reward)
    tags = tokenized_pair_split(data, "val").tags if ev.stage == "kto" else None
    pair_scores: dict[str, Any] = {}
    models: list[tuple[str, Tuned | None]] = ([("base", None)] if r["eval_base"] else []) + [("tuned", tuned)]
    dtype = DTYPES[weights_dtype(r)]  # the frozen reference too (pure_bf16: bf16, as the run trained against it)

    results: dict[str, dict[str, Any]] = {}
    predictions: dict[str, list[str]] = {}
    for name, which in models:
        model = load_weights(r, which, _device())
        if rm:  # a score per sequence, no tokens: the pairwise metrics only
            scores = reward.split_scores(model, data, rank=rank, world=world, label=name)
            if rank == 0:
                results[name] = reward.summary(scores)
            loss_examples = len(scores[0])
            del model
            continue
        if dpo:  # loss = NLL of the chosen responses; the pairs' log-probs for the preference metrics
            pair_scores[name] = preference.split_logps(model, data, rank=rank, world=world, label=name)
            loss_sum, tokens, loss_examples = (preference.chosen_loss(pair_scores[name]) if tags is None
                                               else preference.desirable_loss(pair_scores[name], tags))
        else:
            loss_sum, tokens, loss_examples = split_loss(model, data, ev, rank=rank, world=world, label=name)
        if sft:
            predictions[name] = generate_predictions(model, data, gen, ev, rows, rank=rank, world=world, label=name)
        if rank == 0:
            refs = [row["output"] for row in rows] if sft else None
            results[name] = report.model_summary(loss_sum, tokens, predictions.get(name), refs)
        del model
    if dpo:
        ft = recipe_args(r).finetune
        # as train's frozen reference
        folded = ft.adapter_name_or_path if not trains_adapter(ft.finetuning_type) else None
        reference = preference.reference_logps(pref, recipe_args(r).model, data, pair_scores, rank=rank, world=world,
                                               device=_device(), folded_adapter=folded, dtype=dtype)
        if rank == 0:
            for name in results:
                results[name].update(preference.summary(pair_scores[name], reference, pref) if tags is None
                                     else preference.kto_summary(pair_scores[name], reference, tags, pref))

    if rank == 0:
        prompts = [_prompt_text(data, row) for row in rows]
        rows_out = report.prediction_rows(prompts, [row["output"] for row in rows], predictions) if sft else None
        metrics = {
            "run_name": Path(str(getattr(r, "recipe_path", out.name))).stem,
            "recipe": str(getattr(r, "recipe_path", "")) or None,
            "written_at": _dt.datetime.now().isoformat(timespec="seconds"),
            "stage": r["stage"],
            "base_model": str(r["model_name_or_path"]),
            # the base is model_name_or_path alone: an adapter_name_or_path (continued by training, folded into a
            # full run, or loaded for eval) is in the tuned model only, so the report says which it left out
            "base_without_adapter": None if r["adapter_name_or_path"] is None else str(r["adapter_name_or_path"]),
            "tuned_model": tuned.description,
            "data": _data_description(data),
            "n_examples": len(rows) if sft else None,
            "loss_examples": loss_examples,
            "decoding": decoding_settings(gen, ev) if sft else None,
            "world_size": world,
            "precision": eval_precision(r, cuda=_device().type == "cuda"),
            "training": report.read_training_results(out),
            "results": results,
        }
        target = report.write(RunLayout(out).eval, metrics, rows_out, output_dir=out)
        note(_summary_line(results, target, with_report=os.environ.get(REPORT_BY_MAKE) != "1"))
    _barrier()
    return 0


# ---------------------------------------------------------------- which models
@dataclass(frozen=True)
class Tuned(Weights):
    """The fine-tuned weights to evaluate and how the report names them."""

    description: str


def tuned_model(r: Mapping[str, Any]) -> Tuned:
    """The current tuned weights (pipeline.runtime.layout.current_weights: merged/ when up to date, else what
    training produced); a UserError when nothing was trained."""
    out = RunLayout.of(r["output_dir"], r["export_dir"])
    weights = current_weights(out, r["finetuning_type"], r["adapter_name_or_path"], run_this_for("merge", r))
    if weights is not None and weights.kind == "merged" and r["quantization_bit"] is not None:
        # QLoRA: the adapter on the quantized base, the model that trained and logged eval_loss, beside the base
        # quantized the same way; merged/ is the unquantized export (docs/training.md#qlora)
        weights = trained_weights(out, r["finetuning_type"], r["adapter_name_or_path"]) or weights
    if weights is None:
        lora = trains_adapter(r["finetuning_type"])
        raise UserError(f"{out.trained_dir(r['finetuning_type'])}: no trained {'adapter' if lora else 'model'} to "
                        f"evaluate; {run_this_for('train', r)} produces it")
    return Tuned(weights.kind, weights.path, describe(weights, r["model_name_or_path"], r["finetuning_type"]))


# ---------------------------------------------------------------- loss and perplexity
@torch.no_grad()
def split_loss(model: torch.nn.Module, data: DataArgs, ev: EvalArgs, *, rank: int = 0, world: int = 1,
               label: str = "") -> tuple[float, int, int]:
    """(sum of token cross-entropies, trained tokens, examples) over the val split, training's batches and masks.

    The loader is built for one rank and unshuffled, and ranks take every world-th batch, so each
    example counts exactly once (the loader's multi-rank padding would count some twice). With packing the
    loader's items are packed rows; the count is still of the examples they hold. No device read per batch (training's
    evaluation's way, pipeline.train.loop.evaluate): the tokens are counted and the padding asked of the host batch,
    the loss summed in float64 on the device (Python's double sum of the values read before, to the bit) and read
    once, after the one all-reduce of several ranks.
    """
    from pipeline.data.loaders import make_loader, packing_enabled
    from pipeline.data.tokenize import tokenized_split
    from pipeline.data.packing import model_inputs
    from pipeline.runtime.dist import all_sum_unread
    from pipeline.runtime.batches import lm_batch, to_device, trained_tokens

    # its batches are built here (loader.batch), never by DataLoader workers: no dataloader_num_workers notice
    loader = make_loader(data, "val", rank=0, world_size=1, shuffle=False, say_workers=False)
    device = next(model.parameters()).device
    total: Any = 0.0  # a float64 device sum, read once at the end
    count = 0  # counted on the host batches
    mine = range(rank, len(loader), world)
    for k in tqdm(mine, desc=f"{label} loss", unit="batch", disable=rank != 0, leave=False):
        host = loader.batch(k)
        count += trained_tokens(host)
        batch = to_device(lm_batch(host), device)
        with _autocast(ev, device):
            loss_sum, _ = model(batch["input_ids"], labels=batch["labels"], reduction="sum", **model_inputs(batch))
        total = total + loss_sum.double()
    total, count_f = all_sum_unread([total, count]).tolist()
    return total, int(count_f), len(tokenized_split(data, "val")) if packing_enabled(data) else loader.num_examples


# ---------------------------------------------------------------- generation
def _generation_rows(r: Mapping[str, Any], data: DataArgs, ev: EvalArgs) -> list[dict]:
    """The val rows generation is scored on (dpo: the chosen response as the reference), max_eval_samples first. An
    empty split's fix is the eval of `r` with val_size set, on the run's ranks (typed.run_after_build_for: the
    launch the user made; its python -m form builds first, as eval refuses data built with another val_size)."""
    from pipeline.data.load import load_split
    from pipeline.recipe.rules.data import VAL_SIZE

    rows = load_split(data, "val")
    if not rows:
        again = run_after_build_for("eval", r, val_size=VAL_SIZE)
        raise UserError(f"the val split is empty: nothing to evaluate; set val_size > 0, e.g. {again}, or name an "
                        "eval_dataset")
    if ev.stage == "dpo":  # generation is scored against the chosen response
        rows = [{**{k: v for k, v in row.items() if k not in ("chosen", "rejected")}, "output": row["chosen"]}
                for row in rows]
    if ev.stage == "kto":  # against the desirable responses only
        rows = [{k: v for k, v in row.items() if k != "kto_tag"} for row in rows if row["kto_tag"]]
    cap = ev.max_eval_samples
    return [{**row, "output": _answer(data, row["output"])} for row in (rows[:cap] if cap else rows)]


def _answer(data: DataArgs, text: str) -> str:
    """What is scored: the text without a reasoning template's thought (qwen3 trains every answer to open with
    "<think>\n\n</think>\n\n" when enable_thinking; scored as words, it cost a right answer its exact match)."""
    return data.chat_template().remove_thought(text)


def _prompt_text(data: DataArgs, row: Mapping[str, Any]) -> str:
    """The prompt as the model sees it (decoded from the ids, markup tokens included)."""
    from pipeline.data.model_tokenizer import recipe_tokenizer

    tokenizer = recipe_tokenizer(data)
    return tokenizer.decode(_prompt_ids(data, row, tokenizer))


def _prompt_ids(data: DataArgs, row: Mapping[str, Any], tokenizer: Any) -> list[int]:
    from pipeline.data.tokenize import encode_prompt

    return encode_prompt(data.chat_template(), row["instruction"], row.get("input") or "", row.get("system"),
                         row.get("history") or (), tokenizer=tokenizer, enable_thinking=data.enable_thinking,
                         tools=row.get("tools") or "", roles=row.get("roles") or ())


def decoding_settings(gen: GenerationArgs, ev: EvalArgs) -> dict[str, Any]:
    """The decoding keys the report records (the template's stop words are token ids: Template.stop_ids)."""
    return {**gen.settings(), "batch_size": ev.per_device_eval_batch_size}


def generate_predictions(model: torch.nn.Module, data: DataArgs, gen: GenerationArgs, ev: EvalArgs,
                         rows: Sequence[Mapping[str, Any]], *,
                         rank: int = 0, world: int = 1, label: str = "") -> list[str]:
    """One completion per row (all rows on rank 0 after gathering; other ranks get an empty list)."""
    from pipeline.data.templates import get_template
    from pipeline.data.model_tokenizer import recipe_tokenizer
    from pipeline.model.generate import cut_at_stop, generate

    tokenizer = recipe_tokenizer(data)
    stops = list(gen.stop_strings)
    stop_ids = get_template(data.template).stop_ids(tokenizer)
    mine = list(range(rank, len(rows), world))
    prompts = {i: _prompt_ids(data, rows[i], tokenizer) for i in mine}
    order = sorted(mine, key=lambda i: (len(prompts[i]), i))  # similar lengths together: less padding
    size = ev.per_device_eval_batch_size
    device = next(model.parameters()).device
    local: dict[int, str] = {}
    with tqdm(total=len(order), desc=f"{label} generate", unit="ex", disable=rank != 0, leave=False) as bar:
        for start in range(0, len(order), size):
            chunk = order[start:start + size]
            with _autocast(ev, device):
                kwargs = {**gen.generate_kwargs(), "seed": gen.seed + chunk[0]}
                new = generate(model, [prompts[i] for i in chunk], **kwargs, tokenizer=tokenizer, eos_id=None,
                               stop_ids=stop_ids, pad_id=tokenizer.pad_id)
            for i, ids in zip(chunk, new):
                local[i] = _answer(data, cut_at_stop(tokenizer.decode(ids, gen.skip_special_tokens), stops))
            bar.update(len(chunk))
    gathered = _gather(local, world)
    return [gathered[i] for i in range(len(rows))] if rank == 0 else []


# ---------------------------------------------------------------- ranks and devices
def _init_distributed() -> tuple[int, int]:
    """(rank, world size); torch.distributed is set up only when the launcher started several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as tdist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not tdist.is_initialized():
        from pipeline.runtime.dist import init

        init()
    return tdist.get_rank(), tdist.get_world_size()


def _gather(local: dict[int, str], world: int) -> dict[int, str]:
    if world <= 1:
        return local
    import torch.distributed as tdist

    parts: list[Any] = [None] * world
    tdist.all_gather_object(parts, local)
    return {i: text for part in parts for i, text in part.items()}


def _barrier() -> None:
    from pipeline.runtime.dist import barrier

    barrier()


# ---------------------------------------------------------------- text
def _data_description(data: DataArgs) -> str:
    if data.eval_dataset:
        return f"eval_dataset {', '.join(dataset_names(data, 'eval_dataset'))}"
    return f"val split of {', '.join(dataset_names(data, 'dataset'))}"


def _summary_line(results: Mapping[str, Mapping[str, Any]], target: Path, with_report: bool = True) -> str:
    parts = []
    for name in report.MODELS:
        if name in results:
            res = results[name]
            text = f"{name}: loss {res['loss']:.4f}" if res.get("loss") is not None else f"{name}:"
            if "pairwise_loss" in res:  # stage rm
                text += f" pairwise loss {res['pairwise_loss']:.4f}, accuracy {100 * res['accuracy']:.1f}%"
            if "f1" in res:  # exact match first: the demo's measure (README), which the line left out
                text += f", exact match {100 * res['exact_match']:.1f}%, " + ", ".join(
                    f"{report.SHORT[k]} {100 * res[k]:.1f}" for k in ("f1", "rouge_l", "bleu"))
            parts.append(text)
    return "eval: " + " | ".join(parts) + (f"; report: {target / 'report.md'}" if with_report else "")
