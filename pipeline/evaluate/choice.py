"""`python -m pipeline eval RECIPE` with `task`: LLaMA-Factory's multiple-choice benchmarks (MMLU, C-Eval, CMMLU).

Scored as LLaMA-Factory 0.9.5's Evaluator scores them (llamafactory/eval/evaluator.py): per subject of mapping.json,
for each row of the split, the shots drawn from the dev split (pipeline.data.choice_tasks.ShotDraws), the
messages of the eval template (en / zh), the prompt encoded by the recipe's chat template as encode_oneturn encodes it
(the prompt ids without the answer: pipeline.data.tokenize.encode_prompt with the shots as history), the logits at
the prompt's last position over the ids of "A".."D" (`tokenizer.encode(ch, add_special_tokens=False)[-1]`), the
argmax. Batches of batch_size are padded right, as LLaMA-Factory pads them: under causal attention a row's last real
position never sees its pads, so the prediction does not depend on the batch (no mask is needed either).

The model is the one eval and chat use (pipeline.runtime.layout.current_weights: merged/ when up to date, else the
trained adapter, output_dir/model or adapter_name_or_path), else the base, in the run's precision. Output:
LLaMA-Factory's score table on stdout and, with save_dir (refused when it exists, as LLaMA-Factory refuses it), its
results.json and results.log with our report.md, scores.json and accuracy.png beside them, written as a whole.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.data.choice_tasks import CATEGORIES, CHOICES, EVAL_TEMPLATES, ShotDraws, Subject, Task
from pipeline.recipe.benchmark import key_where, read_benchmark
from pipeline.recipe.args import BenchmarkArgs, benchmark_args, data_args, eval_args, recipe_args
from pipeline.recipe.typed import run_this_for


def check_start(r: Mapping[str, Any]) -> None:
    """The benchmark's refusals that need no model and no data (several ranks, an existing save_dir), asked by run
    and, before overwrite_cache's build, by pipeline.evaluate.run.check_start."""
    bench = benchmark_args(r)
    if r["world_size"] > 1:
        raise UserError(f"{key_where(r, 'task')}: the benchmark runs in one process (LLaMA-Factory's eval runs one "
                        f"too, its model spread over the GPUs); run {run_this_for('eval', r, ranks=1)}, without NPROC / the "
                        "launcher")
    if bench.save_dir is not None and Path(bench.save_dir).exists():
        raise UserError(f"{key_where(r, 'save_dir')}: {bench.save_dir} already exists; LLaMA-Factory refuses an "
                        "existing save_dir too (\"`save_dir` already exists, use another one.\"): name a new folder, or remove "
                        "this one")


def run(r: Mapping[str, Any], args: Any = None) -> int:
    from pipeline.data.model_tokenizer import recipe_tokenizer
    from pipeline.evaluate.devices import autocast
    from pipeline.model.weights import note

    bench = benchmark_args(r)
    check_start(r)  # before anything is read or loaded
    task = read_benchmark(r)
    data = data_args(r)
    tokenizer = recipe_tokenizer(data)
    prompts = encode_task(task, bench, data, tokenizer)
    choice_ids = [tokenizer.encode(ch)[-1] for ch in CHOICES]  # evaluator.py:69

    model, described = _model(r)
    for subject in task.subjects:
        _check_context(prompts[subject.key], model.cfg, subject, bench.n_shot)
    predictions: dict[str, list[str]] = {}
    device = next(model.parameters()).device
    with tqdm(total=sum(map(len, prompts.values())), desc=f"{task.name} {task.split}", unit="question") as bar, \
            autocast(eval_args(r), device):
        for subject in task.subjects:
            bar.set_postfix_str(subject.name)
            predictions[subject.key] = predict(model, prompts[subject.key], choice_ids, bench.batch_size,
                                               tokenizer.pad_id, on_batch=bar.update)
    scores = score(task, predictions)
    table = score_table(scores)
    print(table, flush=True)
    if bench.save_dir is not None:
        info = {"task": bench.task, "task_dir": bench.task_dir, "n_shot": bench.n_shot, "lang": bench.lang,
                "seed": bench.seed, "batch_size": bench.batch_size, "template": r["template"], "model": described,
                "recipe": str(getattr(r, "recipe_path", "")) or None}
        write(Path(bench.save_dir), task, predictions, scores, table, info)
        note(f"eval {bench.task}: results in {bench.save_dir}")
    return 0


def _model(r: Mapping[str, Any]) -> tuple[torch.nn.Module, str]:
    """The model eval and chat take (pipeline.runtime.layout.current_weights: an up-to-date merged/, else the trained
    adapter or model/, else adapter_name_or_path), else the base; in the run's precision. With how reports name it."""
    from pipeline.evaluate.devices import device
    from pipeline.runtime.inference import load_weights
    from pipeline.runtime.layout import RunLayout, current_weights, describe

    ft = recipe_args(r).finetune
    weights = current_weights(RunLayout.of(r["output_dir"], r["export_dir"]), ft.finetuning_type,
                              ft.adapter_name_or_path)
    model = load_weights(r, weights, device())
    named = (describe(weights, r["model_name_or_path"], ft.finetuning_type) if weights
             else f"{r['model_name_or_path']} (base model)")
    return model, named


def encode_task(task: Task, bench: BenchmarkArgs, data: Any, tokenizer: Any) -> dict[str, list[list[int]]]:
    """Every question's prompt ids, subject by subject in mapping.json's order: the shots of each question are drawn
    in LLaMA-Factory's order (one shuffle per question, subjects one after another)."""
    from pipeline.data.tokenize import encode_prompt

    template = data.chat_template()
    eval_template = EVAL_TEMPLATES[bench.lang]
    draws = ShotDraws(bench.seed)
    out: dict[str, list[list[int]]] = {}
    for subject in task.subjects:
        out[subject.key] = []
        for row in subject.rows:
            turns = eval_template.messages(row, draws.shots(subject.dev, bench.n_shot), subject.name)
            *history, (question, _) = turns
            out[subject.key].append(encode_prompt(template, question, "", None, history, tokenizer=tokenizer,
                                                  enable_thinking=data.enable_thinking))
    return out


def _check_context(prompts: Sequence[Sequence[int]], cfg: Any, subject: Subject, n_shot: int) -> None:
    """A prompt longer than the model's context (the model's forward refuses it; dynamic RoPE scaling stretches it:
    config.length_limit, the one rule)."""
    from pipeline.model.config import length_limit

    limit = length_limit(cfg)
    if limit is None or not prompts:
        return
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if len(prompts[longest]) > limit:
        shots = f" with its {n_shot} shots" if n_shot else ""
        raise UserError(f"{subject.where}: row {longest}: its prompt is {len(prompts[longest])} tokens{shots}, longer "
                        f"than the model's context of {limit}{'; lower n_shot' if n_shot else ''}")


@torch.inference_mode()
def predict(model: torch.nn.Module, prompts: Sequence[Sequence[int]], choice_ids: Sequence[int], batch_size: int,
            pad_id: int | None, on_batch: Any = None) -> list[str]:
    """The letter of each prompt: argmax of the softmax over the choices' logits at its last position
    (evaluator.py:72-77), batch_size prompts at a time, padded right; the output head runs at those positions only."""
    device = next(model.parameters()).device
    pad = 0 if pad_id is None else pad_id
    letters: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
            labels[i, len(p) - 1] = 0  # marks the position whose logits are read (reduction="logits": row order)
        logits = model(ids.to(device), labels=labels.to(device), reduction="logits")
        probs = torch.softmax(logits[:, list(choice_ids)].float(), dim=-1)
        letters += [CHOICES[k] for k in probs.argmax(dim=-1).tolist()]
        if on_batch is not None:
            on_batch(len(chunk))
    return letters


def score(task: Task, predictions: Mapping[str, Sequence[str]]) -> dict[str, Any]:
    """Per subject and per category: correct and total (categories in LLaMA-Factory's SUBJECTS order)."""
    subjects = {}
    categories = {name: [0, 0] for name in CATEGORIES}
    for subject in task.subjects:
        correct = sum(p == row["answer"] for p, row in zip(predictions[subject.key], subject.rows, strict=True))
        subjects[subject.key] = {"name": subject.name, "category": subject.category, "correct": correct,
                                 "total": len(subject.rows)}
        for name in ("Average", subject.category):
            categories[name][0] += correct
            categories[name][1] += len(subject.rows)
    return {"categories": {k: {"correct": c, "total": n} for k, (c, n) in categories.items() if n},
            "subjects": subjects}


def accuracy(entry: Mapping[str, int]) -> float:
    return 100 * entry["correct"] / entry["total"]


def score_table(scores: Mapping[str, Any]) -> str:
    """LLaMA-Factory's printed table and results.log (evaluator.py:140-146): `{name:>15}: {100 * mean:.2f}` per
    category with questions, Average first."""
    return "\n".join(f"{name:>15}: {accuracy(entry):.2f}" for name, entry in scores["categories"].items())


def write(save_dir: Path, task: Task, predictions: Mapping[str, Sequence[str]], scores: Mapping[str, Any],
          table: str, info: Mapping[str, Any]) -> None:
    """save_dir as a whole (pipeline.io.atomic_dir): LLaMA-Factory's results.json ({subject: {row index: letter}},
    json.dump indent 2) and results.log (the table, no final newline), then ours."""
    from pipeline.io import atomic_dir

    results = {key: {str(i): letter for i, letter in enumerate(letters)} for key, letters in predictions.items()}
    with atomic_dir(save_dir) as tmp:
        with open(tmp / "results.json", "w", encoding="utf-8", newline="\n") as handle:
            json.dump(results, handle, indent=2)
        with open(tmp / "results.log", "w", encoding="utf-8", newline="\n") as handle:
            handle.write(table)
        (tmp / "scores.json").write_text(json.dumps({**info, "split": task.split, **scores}, indent=2,
                                                    ensure_ascii=False) + "\n", encoding="utf-8")
        plotted = plot_accuracy(scores, tmp / "accuracy.png")
        (tmp / "report.md").write_text(report(task, scores, info, plotted), encoding="utf-8")


def report(task: Task, scores: Mapping[str, Any], info: Mapping[str, Any], plotted: bool) -> str:
    """report.md: what was evaluated, accuracy per category and per subject."""
    lines = [f"# {task.layout.name} ({info['task']}): multiple-choice accuracy", "",
             f"- model: {info['model']}", f"- template: {info['template']}, eval template {info['lang']}",
             f"- {info['n_shot']}-shot, shots drawn from seed {info['seed']} (LLaMA-Factory's draws)",
             f"- task folder: {task.folder}, split {task.split}", "",
             "| category | accuracy (%) | correct / questions |", "|---|---|---|"]
    lines += [f"| {name} | {accuracy(e):.2f} | {e['correct']} / {e['total']} |"
              for name, e in scores["categories"].items()]
    lines += ["", "| subject | category | accuracy (%) | correct / questions |", "|---|---|---|---|"]
    lines += [f"| {e['name']} (`{key}`) | {e['category']} | {accuracy(e):.2f} | {e['correct']} / {e['total']} |"
              for key, e in scores["subjects"].items()]
    if plotted:
        lines += ["", "![accuracy per category and subject](accuracy.png)"]
    return "\n".join(lines) + "\n"


def plot_accuracy(scores: Mapping[str, Any], path: Path) -> bool:
    """Horizontal bars: the categories, then each subject (coloured by its category)."""
    from pipeline.evaluate.report import _figure

    names = [*scores["categories"], *(e["name"] for e in scores["subjects"].values())]
    values = [accuracy(e) for e in (*scores["categories"].values(), *scores["subjects"].values())]
    colours = dict(zip(CATEGORIES, ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd")))
    colour = [colours[n] for n in scores["categories"]] + [colours[e["category"]]
                                                             for e in scores["subjects"].values()]
    fig = _figure(7.0, max(2.5, 0.3 * len(names) + 1))
    ax = fig.add_subplot()
    bars = ax.barh(range(len(names)), values, color=colour)
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 105)
    ax.set_xlabel("accuracy (%)")
    ax.set_title("Accuracy per category, then per subject")
    with warnings.catch_warnings():  # C-Eval's and CMMLU's subject names: a font without CJK glyphs draws boxes
        warnings.filterwarnings("ignore", message="Glyph .* missing")
        fig.tight_layout()
        fig.savefig(path)
    return True
