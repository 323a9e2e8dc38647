"""`python -m pipeline generate RECIPE [--prompt TEXT] [--model base|adapter|merged] [--raw]`.

stdout carries only completions (scriptable: `answer=$(python -m pipeline generate r.yaml --prompt ...)`);
every status line goes to stderr. Without --prompt: a chat reading one message per stdin line, with
the conversation so far passed to the template as history; an empty line or EOF ends it.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Mapping, Sequence

from pipeline.errors import UserError
from pipeline.model.build import FinetuneArgs
from pipeline.model.generate import generate_text
from pipeline.model.weights import note
from pipeline.recipe.args import GenerationArgs, data_args, recipe_args, value
from pipeline.recipe.typed import run_this_for
from pipeline.runtime.inference import load_weights
from pipeline.runtime.layout import RunLayout, Weights, current_weights, merged_weights, stale, trained_weights


def generation_kwargs(gen: GenerationArgs, stop_ids: Sequence[int] = ()) -> dict[str, Any]:
    """The recipe's generation keys as generate_text() arguments (plus the template's stop ids, when given)."""
    kwargs = {**gen.generate_kwargs(), "skip_special_tokens": gen.skip_special_tokens}  # generate_text's
    if stop_ids:
        kwargs["stop_ids"] = tuple(stop_ids)
    return kwargs


def chosen_weights(out: RunLayout, ft: FinetuneArgs, choice: str | None,
                   r: Mapping[str, Any] | None = None) -> Weights | None:
    """The weights `--model` asks for (None: the base model). Without --model: the current tuned weights as
    eval would take them (a stale merged/ is passed over), else the base model. `r`: the recipe chat runs, whose
    merge or train (with the overrides typed) the message for missing weights names (recipe.typed.run_this_for)."""
    if choice == "base":
        return None
    if choice == "merged":
        weights = merged_weights(out)
        if weights is None:
            raise UserError(f"--model merged: no merged model at {out.merged}; produce it with "
                            f"{run_this_for('merge', r or {})}, or use --model adapter")
        trained = trained_weights(out, ft.finetuning_type, ft.adapter_name_or_path)
        if stale(weights, trained):  # asked for by name, so used; but it is not what training produced last
            print(f"note: --model merged: {weights.path} is older than {trained.path} (trained again since the "
                  f"merge); {run_this_for('merge', r or {})} refreshes it", file=sys.stderr)
        return weights
    trained = trained_weights(out, ft.finetuning_type, ft.adapter_name_or_path)
    if choice == "adapter":
        if trained is None:
            raise UserError(f"--model adapter: nothing at {out.trained_dir(ft.finetuning_type)}; produce it with "
                            f"{run_this_for('train', r or {})}, or set adapter_name_or_path")
        return trained
    return current_weights(out, ft.finetuning_type, ft.adapter_name_or_path, run_this_for("merge", r or {}))


def run(r: Mapping[str, Any], args: argparse.Namespace) -> int:
    from pipeline.data.model_tokenizer import recipe_tokenizer

    if value(r, "stage") == "rm":
        where = r.origin("stage").where if hasattr(r, "origin") else "recipe key 'stage'"
        raise UserError(f"{where}: stage: rm trains a reward model: it scores a whole text (one number, the "
                        "transformers XForSequenceClassification output) and has no LM head to generate with, so "
                        "there is nothing to chat with; score texts with transformers' "
                        "AutoModelForSequenceClassification on the run's merged/ (docs/reward-models.md), or chat "
                        "with a recipe of stage sft, dpo or kto")
    raw = bool(getattr(args, "raw", False))
    prompt = getattr(args, "prompt", None)
    if prompt is not None and raw and not prompt:
        raise UserError("--prompt is empty and --raw sends it as is: there is no token to continue from. Give "
                        "some text to complete, or leave out --raw (the template then wraps the empty instruction)")
    template = None
    if not raw:
        template = data_args(r).chat_template()
    tokenizer = recipe_tokenizer(data_args(r))  # before the model: a preset without a vocabulary is refused at once
    out = RunLayout.of(r["output_dir"], value(r, "export_dir"))  # merge writes the merged model to export_dir when set
    weights = chosen_weights(out, recipe_args(r).finetune, getattr(args, "model", None), r)
    # pure_bf16: the bf16 weights (an adapter in fp32 on the bf16 base), as the run trained and eval computes
    model = load_weights(r, weights)
    kwargs = generation_kwargs(GenerationArgs.from_recipe(r), template.stop_ids(tokenizer) if template else tokenizer.stop_ids)

    def complete(text: str, history: list[tuple[str, str]]) -> str:
        if template is None:
            return generate_text(model, tokenizer, text, **kwargs)
        from pipeline.data.tokenize import encode_prompt

        ids = encode_prompt(template, text, history=history, tokenizer=tokenizer,  # exactly as in training
                            enable_thinking=bool(value(r, "enable_thinking")))
        return generate_text(model, tokenizer, ids, **kwargs)

    if prompt is not None:
        print(complete(prompt, []), flush=True)
        return 0
    note(f"chatting with the {weights.kind if weights else 'base'} model of {r['model_name_or_path']} (template: "
         f"{'none, --raw' if template is None else r['template']}); an empty line or Ctrl-D ends")
    history: list[tuple[str, str]] = []
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return 0
        reply = complete(line.rstrip("\n"), history)
        print(reply, flush=True)
        if template is not None:
            history.append((line.rstrip("\n"), reply))
