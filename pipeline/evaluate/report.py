"""The evaluation's files: metrics.json (numbers), predictions.jsonl (every example), report.md (for people).

The eval folder is written as a whole (pipeline.io.atomic_dir): it appears complete or not at all.
Scores are fractions in [0, 1] in the JSON files and percentages in report.md.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.evaluate import metrics as M
from pipeline.io import atomic_dir, atomic_write, write_json, write_text
from pipeline.names import token_loss_history, token_loss_label, token_loss_words
from pipeline.runtime.layout import RunLayout
from pipeline.runtime.log import read_log

SCHEMA_VERSION = 1
MODELS = ("base", "tuned")
GEN_METRICS = ("exact_match", "f1", "rouge_l", "bleu")
LABELS = {
    "loss": "loss (nats/token)",
    "perplexity": "perplexity",
    "exact_match": "exact match (%)",
    "f1": "token F1 (%)",
    "rouge_l": "ROUGE-L (%)",
    "bleu": "BLEU-4, corpus (%)",
    "sentence_bleu": "BLEU-4, mean sentence (%)",
    "preference_accuracy": "preference accuracy (%)",
    "logp_margin": "mean log-prob margin, chosen − rejected",
    "reward_margin": "mean reward margin",
    "reward_accuracy": "reward accuracy (%)",
    "pref_loss": "preference loss",
    "kto_loss": "KTO loss, the split as one batch",
    "reward_chosen": "mean reward of the desirable responses",
    "reward_rejected": "mean reward of the undesirable responses",
    "kl": "KL estimate",
    "pairwise_loss": "pairwise loss, −log σ(score chosen − score rejected)",
    "accuracy": "reward-model accuracy (%)",
    "score_margin": "mean score margin, chosen − rejected",
}
SHORT = {"exact_match": "EM", "f1": "F1", "rouge_l": "ROUGE-L", "bleu": "BLEU-4"}
LOWER_IS_BETTER = {"loss", "perplexity", "pref_loss", "pairwise_loss", "kto_loss", "reward_rejected"}
NEITHER_BETTER = {"kl"}  # kto's KL estimate: a baseline of the loss, not a goal (its change gets no arrow)
PERCENT = {"exact_match", "f1", "rouge_l", "bleu", "sentence_bleu", "preference_accuracy", "reward_accuracy", "accuracy"}
FOUR_DIGITS = {"loss", "reward_margin", "pref_loss", "pairwise_loss", "score_margin", "kto_loss", "reward_chosen",
               "reward_rejected", "kl"}
PRIMARY = "f1"  # per-example score that ranks the examples shown in report.md
EXAMPLES_PER_SECTION = 3
MAX_SHOWN_CHARS = 800


def perplexity(loss: float | None) -> float | None:
    """exp(loss); None where it overflows a float (JSON has no infinity)."""
    if loss is None:
        return None
    try:
        return math.exp(loss)
    except OverflowError:
        return None


def model_summary(
    loss_sum: float, n_tokens: int, predictions: Sequence[str] | None, references: Sequence[str] | None
) -> dict[str, Any]:
    """One model's block of metrics.json: token-weighted loss, perplexity and (sft) generation metrics."""
    loss = loss_sum / n_tokens if n_tokens else None
    out: dict[str, Any] = {"loss": loss, "perplexity": perplexity(loss), "loss_tokens": n_tokens}
    if predictions is not None and references is not None:
        agg = M.aggregate(list(predictions), list(references))
        out.update({k: agg[k] for k in (*GEN_METRICS, "sentence_bleu")})
        out["n"] = agg["n"]
    return out


def deltas(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """tuned - base for every metric both have."""
    if "base" not in results or "tuned" not in results:
        return {}
    base, tuned = results["base"], results["tuned"]
    return {
        k: tuned[k] - base[k]
        for k in LABELS
        if isinstance(base.get(k), (int, float)) and isinstance(tuned.get(k), (int, float))
    }


def prediction_rows(
    prompts: Sequence[str], references: Sequence[str], predictions: Mapping[str, Sequence[str]]
) -> list[dict[str, Any]]:
    """One predictions.jsonl row per example: prompt, reference, each model's prediction and scores."""
    rows = []
    for i, (prompt, ref) in enumerate(zip(prompts, references, strict=True)):
        row: dict[str, Any] = {"index": i, "prompt": prompt, "reference": ref}
        for name in MODELS:
            if name in predictions:
                pred = predictions[name][i]
                row[f"{name}_prediction"] = pred
                row[f"{name}_scores"] = M.score_example(pred, ref)
        rows.append(row)
    return rows


def write(
    eval_dir: str | Path,
    metrics: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]] | None,
    *,
    output_dir: str | Path | None = None,
) -> Path:
    """Write metrics.json, predictions.jsonl (sft), metrics.png, loss_curves.png (when a log exists), report.md.

    `metrics` holds the run information plus "results": {"base"?: {...}, "tuned": {...}} as made by
    model_summary; `output_dir` is where trainer_log.jsonl / training_loss.png are looked for.
    """
    eval_dir = Path(eval_dir)
    run = RunLayout(Path(output_dir) if output_dir is not None else eval_dir.parent)
    metrics = {"schema_version": SCHEMA_VERSION, **metrics}
    metrics["delta"] = deltas(metrics["results"])
    with atomic_dir(eval_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        if rows is not None:
            with atomic_write(tmp / "predictions.jsonl") as handle:
                for row in rows:
                    handle.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        figures = {}
        if plot_metrics(metrics["results"], tmp / "metrics.png"):
            figures["metrics"] = "metrics.png"
        if plot_loss_curves(run.trainer_log, metrics["results"], tmp / "loss_curves.png",
                            stretches=loss_stretches(metrics.get("training") or {})):
            figures["loss"] = "loss_curves.png"
        elif run.loss_plot.is_file():
            figures["loss"] = _relative(run.loss_plot, eval_dir)
        write_text(tmp / "report.md", render_markdown(metrics, rows, figures))
    return eval_dir


def _relative(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


# ---------------------------------------------------------------- plots
def _figure(width: float = 7.0, height: float = 4.0):
    """A pyplot-free Figure (Agg canvas): no global state, no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def plot_metrics(results: Mapping[str, Mapping[str, Any]], path: Path) -> bool:
    """Grouped bars, base vs tuned, of the generation metrics in percent; False when there are none."""
    names = [k for k in GEN_METRICS if any(k in results.get(m, {}) for m in MODELS)]
    if not names:
        return False
    fig = _figure()
    ax = fig.add_subplot()
    present = [m for m in MODELS if m in results]
    width = 0.8 / len(present)
    for j, model in enumerate(present):
        values = [100 * results[model].get(k, 0.0) for k in names]
        xs = [i + (j - (len(present) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, values, width, label=model, color=("#9e9e9e" if model == "base" else "#1f77b4"))
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(names)), [LABELS[k].replace(" (%)", "") for k in names])
    ax.set_ylabel("score (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Generation metrics on the evaluation set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


@dataclass(frozen=True)
class LossStretch:
    """The steps of training that trained one loss: up to `last` (inclusive; None: to the end), named `name` in the
    legend ("" for the plain cross-entropy of a run that never changed it: its curves' labels say nothing)."""

    last: int | None
    name: str


def loss_stretches(training: Mapping[str, Any]) -> list[LossStretch]:
    """Which loss training's curves are, step by step (all_results.json: the final settings, and token_loss_changes:
    after which step a resume changed the loss, from what to what). Why: the final settings alone would label every
    step with the last loss, where the steps before a change trained another."""
    changes = [c for c in training.get("token_loss_changes") or () if isinstance(c, dict)
               and isinstance(c.get("step"), int) and isinstance(c.get("from"), dict) and isinstance(c.get("to"), dict)]
    if not changes:
        label = token_loss_label(training)
        return [LossStretch(None, label[0] if label else "")]
    return [*(LossStretch(c["step"], token_loss_words(c["from"])) for c in changes),
            LossStretch(None, token_loss_words(changes[-1]["to"]))]


def _stretch_label(curve: str, stretches: Sequence[LossStretch], i: int) -> str:
    """A curve's legend label within stretch i: "train (DFT-weighted)"; with several stretches their steps too,
    "train, steps 3–4: the plain cross-entropy"."""
    if len(stretches) == 1:
        return f"{curve} ({stretches[0].name})" if stretches[0].name else curve
    first = (stretches[i - 1].last or 0) + 1 if i else None  # every stretch but the last has a last step
    last = stretches[i].last
    steps = (f"to step {last}" if first is None else f"from step {first}" if last is None
             else f"steps {first}–{last}")
    return f"{curve}, {steps}: {stretches[i].name}"


def loss_series(records: Sequence[Mapping[str, Any]], stretches: Sequence[LossStretch]
                ) -> dict[str, tuple[list[float], list[float]]]:
    """legend label -> (steps, losses) of trainer_log.jsonl's train and eval losses, one series per curve and
    stretch of one loss (loss_stretches)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for rec in records:
        step = rec.get("step", rec.get("global_step"))
        if not isinstance(step, (int, float)):
            continue
        i = next(k for k, s in enumerate(stretches) if s.last is None or step <= s.last)
        for key, curve in (("loss", "train"), ("train_loss", "train"), ("eval_loss", "eval (during training)")):
            value = rec.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                xs, ys = series.setdefault(_stretch_label(curve, stretches, i), ([], []))
                xs.append(step)
                ys.append(value)
    return series


def plot_loss_curves(log: Path, results: Mapping[str, Mapping[str, Any]], path: Path,
                     stretches: Sequence[LossStretch] = (LossStretch(None, ""),)) -> list[str]:
    """Train (and eval) loss against the step from trainer_log.jsonl, with this evaluation's losses as lines; returns
    the legend's labels, also written as the PNG's Description ([] when the log has no loss: nothing is drawn).
    `stretches` (loss_stretches): which loss training's losses are, when not the plain cross-entropy
    (label-smoothed, DFT- or EAFT-weighted), which their legend says; where a resume changed it, each stretch is a
    curve of its own, named by its loss, and a dotted vertical line marks the step after which it changed."""
    series = loss_series([rec for rec in read_log(log) if isinstance(rec, dict)], stretches)
    if not series:
        return []
    fig = _figure()
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, label=label, marker="." if len(xs) < 30 else None)
    for before in stretches[:-1]:
        ax.axvline(before.last, linestyle=":", color="tab:red",
                   label=f"resumed after step {before.last}: the loss changed")
    for model, style in (("base", ":"), ("tuned", "--")):
        loss = results.get(model, {}).get("loss")
        if isinstance(loss, (int, float)):
            ax.axhline(loss, linestyle=style, color="gray" if model == "base" else "black",
                       label=f"{model} model, this evaluation ({loss:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Training loss")
    labels = [text.get_text() for text in ax.legend(fontsize="small" if len(stretches) > 1 else None).get_texts()]
    fig.tight_layout()
    fig.savefig(path, metadata={"Description": "; ".join(labels)})  # the legend as text, for readers and checks
    return labels


# ---------------------------------------------------------------- markdown
def _fmt(key: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    if key in PERCENT:
        return f"{100 * value:.1f}"
    return f"{value:.4f}" if key in FOUR_DIGITS else f"{value:.2f}"


def _fmt_delta(key: str, value: float) -> str:
    text = f"{100 * value:+.1f}" if key in PERCENT else f"{value:+.4f}" if key in FOUR_DIGITS else f"{value:+.2f}"
    if abs(value) < 1e-12 or key in NEITHER_BETTER:
        return text
    better = (value < 0) == (key in LOWER_IS_BETTER)
    return f"{text} {'▲' if better else '▼'}"


def metrics_table(metrics: Mapping[str, Any]) -> str:
    results, delta = metrics["results"], metrics.get("delta", {})
    present = [m for m in MODELS if m in results]
    header = "| metric | " + " | ".join(present) + (" | Δ tuned − base |" if len(present) == 2 else " |")
    sep = "|---|" + "---:|" * len(present) + ("---:|" if len(present) == 2 else "")
    lines = [header, sep]
    for key, label in LABELS.items():
        if not any(key in results[m] for m in present):
            continue
        cells = [_fmt(key, results[m].get(key)) for m in present]
        if len(present) == 2:
            cells.append(_fmt_delta(key, delta[key]) if key in delta else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# training's loss and eval_loss of a preference stage are its objective: the table's row of that name, not its "loss"
OBJECTIVE_ROW = {"dpo": "pref_loss", "kto": "kto_loss"}


def _objective_words(training: Mapping[str, Any], stage: str) -> str:
    """Which quantity a preference stage's training losses are. Stage dpo's ld_alpha and BCO term (all_results.json
    records them) are in training's loss but not in the table's preference loss (pipeline.evaluate.preference)."""
    row = LABELS[OBJECTIVE_ROW[stage]]
    terms = [f"{key} {training[key]:g}" for key in ("ld_alpha", "pref_bco_weight")
             if isinstance(training.get(key), (int, float))]
    if terms:
        return f"stage {stage}'s objective with {' and '.join(terms)}, which the table's {row} leaves out"
    return f"stage {stage}'s objective: the table's {row}, not its loss"


def _training_line(training: Mapping[str, Any], stage: str | None = None) -> str:
    """One sentence from all_results.json: how long training ran and where its losses ended (which quantity they
    are where the table's loss is another: a preference stage's objective, a label-smoothed or weighted loss, and
    after which step a resume changed that loss)."""
    parts = []
    if training.get("global_step") is not None:
        steps = f"{training['global_step']} optimizer steps"
        if training.get("num_train_examples") is not None:
            steps += f" on {training['num_train_examples']} {training.get('train_items', 'examples')}"
        if isinstance(training.get("epoch"), (int, float)):
            steps += f" ({training['epoch']:.2f} epochs)"
        parts.append(steps)
    if isinstance(training.get("train_runtime_s"), (int, float)):
        parts.append(f"{training['train_runtime_s']:.0f} s")
    for key, label in (("train_loss", "mean train loss"), ("eval_loss", "last eval loss during training")):
        if isinstance(training.get(key), (int, float)):
            parts.append(f"{label} {training[key]:.4f}")
    losses = any(isinstance(training.get(key), (int, float)) for key in ("train_loss", "eval_loss"))
    if stage in OBJECTIVE_ROW and losses:
        parts[-1] += f" ({_objective_words(training, stage)})"
    objective = token_loss_label(training)  # the objective trained, not the table's cross-entropy
    said = [f"both {objective[0]}, {objective[1]}: the training objective, not the plain cross-entropy of the table "
            "above"] if objective else []
    if training.get("moe_aux_loss_coef"):  # transformers' Trainer logs a MoE model's loss with the router's term
        said.append(f"both add moe_aux_loss_coef {training['moe_aux_loss_coef']:g} x the router's load-balancing "
                    "loss, as transformers' Trainer logs it: not the plain cross-entropy of the table above")
    history = token_loss_history(training.get("token_loss_changes"))
    said += [history] if history else []
    if said and losses:
        parts[-1] += f" ({'; '.join(said)})"
    return ("Trained " + ", ".join(parts) + ".") if parts else ""


def read_training_results(output_dir: str | Path) -> dict[str, Any]:
    """output_dir/all_results.json as train wrote it; {} when absent or unreadable (the report is still useful)."""
    try:
        data = json.loads(RunLayout(Path(output_dir)).all_results.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _block(text: str) -> str:
    """A fenced block that no backtick run inside `text` can close; long texts are cut."""
    if len(text) > MAX_SHOWN_CHARS:
        text = text[:MAX_SHOWN_CHARS] + f"… [{len(text) - MAX_SHOWN_CHARS} more characters]"
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def select_examples(rows: Sequence[Mapping[str, Any]], k: int = EXAMPLES_PER_SECTION) -> dict[str, list[Mapping]]:
    """Best and worst by the tuned model's F1, and the ones whose F1 changed most from base to tuned.

    Sections may share an example (a small eval set has few to show). Ties go to the lower index.
    """
    scored = [row for row in rows if "tuned_scores" in row]

    def tuned(row: Mapping) -> float:
        return row["tuned_scores"][PRIMARY]

    sections = {
        "Best (highest tuned F1)": sorted(scored, key=lambda row: (-tuned(row), row["index"]))[:k],
        "Worst (lowest tuned F1)": sorted(scored, key=lambda row: (tuned(row), row["index"]))[:k],
    }
    if scored and all("base_scores" in row for row in scored):
        def change(row: Mapping) -> float:
            return tuned(row) - row["base_scores"][PRIMARY]

        changed = [row for row in scored if change(row) != 0 or row["tuned_prediction"] != row["base_prediction"]]
        sections["Changed most from base to tuned"] = sorted(changed, key=lambda row: (-abs(change(row)), row["index"]))[:k]
    return {title: chosen for title, chosen in sections.items() if chosen}


def _example_md(row: Mapping[str, Any]) -> str:
    parts = [f"**Example {row['index']}**", "", "Prompt:", _block(row["prompt"]), "", "Reference:",
             _block(row["reference"])]
    for model in MODELS:
        if f"{model}_prediction" in row:
            scores = row[f"{model}_scores"]
            summary = ", ".join(f"{SHORT[k]} {100 * scores[k]:.1f}" for k in GEN_METRICS)
            parts += ["", f"{model.capitalize()} ({summary}):", _block(row[f"{model}_prediction"])]
    return "\n".join(parts)


def render_markdown(
    metrics: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] | None, figures: Mapping[str, str]
) -> str:
    info = metrics
    dec = info.get("decoding") or {}
    out = [f"# Evaluation report: {info.get('run_name', 'run')}", ""]
    out += [f"Written {info.get('written_at', _dt.datetime.now().isoformat(timespec='seconds'))}.", ""]
    out += ["## What was evaluated", ""]
    tokens = next((res.get("loss_tokens") for res in info.get("results", {}).values()), None)
    loss_on = (f"{info['loss_examples']} examples, {tokens} trained tokens"
               if info.get("loss_examples") is not None and tokens is not None else None)
    facts = [
        ("recipe", info.get("recipe")),
        ("stage", info.get("stage")),
        ("base model", info.get("base_model") if not info.get("base_without_adapter") else
         f"{info['base_model']} alone (adapter_name_or_path {info['base_without_adapter']} is in the tuned model "
         "only)"),
        ("tuned model", info.get("tuned_model")),
        ("data", info.get("data")),
        ("loss and perplexity over", loss_on),
        ("generation on", f"{info['n_examples']} examples" if info.get("n_examples") is not None else None),
        ("ranks", info.get("world_size")),
        ("precision", info.get("precision")),
    ]
    out += [f"- {name}: {value}" for name, value in facts if value is not None]
    if dec:
        mode = "sampling" if dec.get("do_sample") else "beam search" if dec.get("num_beams", 1) > 1 else "greedy"
        settings = ", ".join(f"{k}={v}" for k, v in dec.items() if k != "do_sample")
        out.append(f"- decoding: {mode} ({settings})")
    out += ["", "## Metrics", "", metrics_table(metrics), ""]
    out += [] if info.get("stage") == "rm" else [
        "Loss is the mean cross-entropy per trained token (the masks of training: for sft the response",
        "tokens and EOS) and perplexity is exp(loss); lower is better. Generation metrics compare each",
        "completion with the reference: exact match (whitespace-normalised, case-sensitive), token F1",
        "(bag of words, case and punctuation ignored), ROUGE-L (longest common subsequence of the words)",
        "and BLEU-4 (word and punctuation n-grams, smoothed as NLTK's method1; corpus-level, and the mean",
        "of sentence scores); higher is better. ▲ marks an improvement of tuned over base. Definitions:",
        "pipeline/evaluate/metrics.py.",
        "",
    ]
    if info.get("stage") == "dpo":
        out += [
            "Stage dpo: on the held-out preference pairs, the loss is over the chosen responses and the",
            "generations are scored against them. Preference accuracy is the fraction of pairs where",
            "log π(chosen) − log π(rejected) > 0; the reward margin is the mean of β((log π − log ref)(chosen)",
            "− (log π − log ref)(rejected)) with training's reference (0 for the base model when it is the",
            "reference); reward accuracy the fraction of pairs where that margin is > 0. Definitions:",
            "pipeline/evaluate/preference.py.",
            "",
        ]
    if info.get("stage") == "kto":
        out += [
            "Stage kto: on the held-out rows (a response tagged desirable or not), the loss is over the",
            "desirable responses and the generations are scored against them. The rewards are the means of",
            "β(log π − log ref) over the desirable (reward_chosen) and the undesirable (reward_rejected)",
            "responses with training's reference, kl the KL estimate of the split and kto_loss the training",
            "loss on the split as one batch. Definitions: pipeline/evaluate/preference.py.",
            "",
        ]
    if info.get("stage") == "rm":
        out += [
            "Stage rm: a reward model scores each held-out sequence at its last non-padding token (as",
            "transformers' XForSequenceClassification pools). Accuracy is the fraction of pairs where the chosen",
            "response out-scores the rejected one; the pairwise loss is the mean of −log σ(chosen − rejected).",
            "The base is the starting model with the new, untrained score head. Definitions: pipeline/model/reward.py.",
            "",
        ]
    if "metrics" in figures:
        out += [f"![metrics base vs tuned]({figures['metrics']})", ""]
    training = info.get("training") or {}
    if training or "loss" in figures:
        out += ["## Training", ""]
        line = _training_line(training, info.get("stage"))
        if line:
            out += [line, ""]
        if "loss" in figures:
            out += [f"![training loss]({figures['loss']})", ""]
    if rows is None:
        if info.get("stage") != "rm":  # rm's own paragraph above says what it measures
            out += ["Stage pt: loss and perplexity only (no generation).", ""]
    else:
        out += ["## Examples", "", f"All {len(rows)} examples with their scores are in `predictions.jsonl`.", ""]
        for title, chosen in select_examples(rows).items():
            out += [f"### {title}", ""]
            for row in chosen:
                out += [_example_md(row), ""]
    return "\n".join(out).rstrip() + "\n"
