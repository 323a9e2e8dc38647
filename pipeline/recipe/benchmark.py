"""A benchmark recipe (eval with `task`: LLaMA-Factory's MMLU / C-Eval / CMMLU) read without running it.

The task folder is read once, as eval reads it (pipeline.data.choice_tasks.read_task, a missing folder, mapping.json or
subject file named in one message at the recipe's task line or the file), for three callers: eval itself
(pipeline.evaluate.choice), validate (the recipe and the folder, before anything loads) and plan (how eval will run:
the model, the task, split, shots, subjects and question counts, the template). No model is loaded and torch is not
imported here.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

from pipeline.data.choice_tasks import Task, read_task
from pipeline.recipe import Resolved
from pipeline.recipe.text import format_table

# the keys eval with task reads, in plan's table (the model, the prompt, the task, the output)
KEYS = ("model_name_or_path", "adapter_name_or_path", "finetuning_type", "output_dir", "template", "task", "task_dir",
        "n_shot", "lang", "seed", "batch_size", "save_dir")


def key_where(r: Mapping[str, Any], key: str) -> str:
    """`file:line:col: key` of a recipe key the user set (in the recipe, a file it extends or on the command line), for
    messages; `recipe: key` for a default or a plain mapping."""
    origin = r.origin(key) if hasattr(r, "origin") else None
    return f"{origin.where}: {key}" if origin is not None and origin.kind in ("file", "cli") else f"recipe: {key}"


def read_benchmark(r: Mapping[str, Any]) -> Task:
    """The recipe's task folder with every subject's rows and dev rows (a UserError for what is missing or malformed).
    The rules have refused a task name parse_task does not read."""
    return read_task(str(r["task"]), r["task_dir"], int(r["n_shot"]), key_where(r, "task"))


def summary(task: Task, n_shot: int) -> str:
    """One line: where the task is, its layout and split, how many subjects, questions and shots."""
    questions, dev = sum(len(s.rows) for s in task.subjects), sum(len(s.dev) for s in task.subjects)
    shots = (f"{n_shot} shots per question, drawn from the subjects' dev rows ({dev} in all)" if n_shot else
             "0-shot (no solved examples before a question)")
    return (f"{task.folder} ({task.layout.name} layout), split {task.split}: {len(task.subjects)} subjects, "
            f"{questions} questions; {shots}")


def subject_table(task: Task) -> str:
    rows = [(s.key, s.name, s.category, str(len(s.rows)), str(len(s.dev))) for s in task.subjects]
    return format_table(rows, header=("subject", "name", "category", "questions", "dev rows"))


def render(r: Resolved) -> str:
    """plan of a benchmark recipe: what runs it, the keys eval reads with their provenance, the model it takes, the
    task folder's subjects and question counts. (A recipe that trains gets the training plan instead.)"""
    from pipeline.recipe.typed import run_this_for
    from pipeline.recipe.deps import upstreams
    from pipeline.recipe.precision import eval_precision
    from pipeline.recipe.rules import core

    task = read_benchmark(r)
    recipe = r.recipe_path
    out = [f"recipe: {recipe}" + (f" (extends {', '.join(r.files[1:])})" if len(r.files) > 1 else ""),
           f"benchmark: LLaMA-Factory's multiple-choice eval, run by {run_this_for('eval', r)}; it trains nothing, "
           "and the model is loaded only then"]
    found = upstreams(r)
    if found:
        out.append(f"made first by make eval: {', '.join(f'{name} ({goal})' for name, goal in found)}")
    out.append("\n[benchmark]")
    out.append(format_table([(k, json.dumps(r[k], ensure_ascii=False), r.source(k)) for k in KEYS],
                            header=("key", "value", "source")))
    adapter = f" + adapter {r['adapter_name_or_path']}" if r["adapter_name_or_path"] else ""
    out += ["\n[run]",
            f"model: {r['model_name_or_path']}{adapter}, unless output_dir {r['output_dir']} holds tuned weights "
            "(an up-to-date merged model, else the trained adapter or model/), which eval takes first",
            f"precision: {eval_precision(r, cuda=core.cuda_available())}",
            f"prompt: template {r['template']} (the shots as earlier turns), eval template {r['lang']}; the logits "
            "of A-D at the prompt's last position, the largest is the answer",
            f"batches: {r['batch_size']} questions, padded right",
            f"output: {r['save_dir']} (results.json, results.log, scores.json, report.md, accuracy.png)"
            if r["save_dir"] else "output: the score table on stdout only (save_dir not set)",
            "\n[task]", f"{r['task']}: {summary(task, int(r['n_shot']))}", subject_table(task)]
    return "\n".join(out)
