"""The keys of LLaMA-Factory's multiple-choice benchmarks (task, task_dir, n_shot, lang, batch_size, save_dir): only
`eval` with `task` reads them (pipeline.evaluate.choice), so set elsewhere they would be ignored without a word."""
from __future__ import annotations

from pipeline.data.choice_tasks import parse_task
from pipeline.recipe.rules.core import Context, rule

BENCHMARK_KEYS = ("task_dir", "n_shot", "lang", "batch_size", "save_dir")  # besides task itself


def _given(ctx: Context, key: str) -> bool:
    return ctx.origins[key].kind in ("file", "cli")


@rule("task", *BENCHMARK_KEYS)
def benchmark_keys_need_task(ctx: Context) -> list[tuple[str, str]]:
    """task_dir, n_shot, lang, batch_size, save_dir without task: the held-out evaluation runs and ignores them."""
    if ctx.values["task"] is not None:
        return []
    return [(key, f"set to {ctx.values[key]!r}, but only eval with task reads it (LLaMA-Factory's multiple-choice "
                  "benchmarks; eval without task evaluates the val split, batched by per_device_eval_batch_size); "
                  f"add task: mmlu_test (or ceval_validation, cmmlu_test) or remove {key}")
            for key in BENCHMARK_KEYS if _given(ctx, key)]


# the commands that read task (train refuses the key: task_is_for_eval); deps names the task folder's files for make
TASK_READERS = ("eval", "validate", "plan", "deps", None)


@rule("task", commands=TASK_READERS)
def task_names_a_split(ctx: Context) -> list[tuple[str, str]]:
    """task is <folder>_<split> by parse_task, the one rule eval's reading of the folder and deps' listing of its files
    both take: a name they would read otherwise (high_school_test, mmlu_dev) is one message at the task line from
    every command, before make names any file or eval reads any."""
    if ctx.values["task"] is None:
        return []
    try:
        parse_task(ctx.values["task"])
    except ValueError as err:
        return [("task", str(err))]
    return []


@rule("task", commands=("train",))
def task_is_for_eval(ctx: Context) -> list[tuple[str, str]]:
    """LLaMA-Factory's train refuses an eval recipe's key too (its argument parser knows no `task` there)."""
    if ctx.values["task"] is None:
        return []
    return [("task", f"set to {ctx.values['task']!r}: a benchmark is run by {ctx.run_this('eval')} (LLaMA-Factory's "
                     "`llamafactory-cli eval`), not by train; remove task from the training recipe and put it in an "
                     "eval recipe (which may `extends` this one)")]


@rule("template", "task")
def fewshot_is_for_benchmarks(ctx: Context) -> list[tuple[str, str]]:
    """template fewshot outside a benchmark: LLaMA-Factory trains on it with one EOS after the whole conversation
    (efficient_eos), which no template here writes; it exists for its eval example's prompts."""
    if ctx.values["template"] != "fewshot" or ctx.values["task"] is not None:
        return []
    return [("template", "set to 'fewshot': LLaMA-Factory's prompt for its multiple-choice benchmarks (eval with "
                         "task: mmlu_test, ...); to train, evaluate or chat choose the model's own template (qwen, "
                         "llama3, ...) or default / empty")]
