"""The eval folder holds what is promised: metrics.json keys, one predictions row per example, a readable report."""
from __future__ import annotations

import json
import math

import pytest

from pipeline.evaluate import report as R

PROMPTS = ["Q: capital of France?", "Q: 2+2?", "Q: colour of the sky?", "Q: say ```code```"]
REFS = ["Paris", "4", "blue", "ok"]
BASE = ["London", "4", "", "no"]
TUNED = ["Paris", "five", "blue sky", "ok"]


def _metrics(with_base: bool = True) -> dict:
    results = {"tuned": R.model_summary(2.0 * 10, 10, TUNED, REFS)}
    if with_base:
        results["base"] = R.model_summary(3.0 * 10, 10, BASE, REFS)
    return {
        "run_name": "demo_sft",
        "recipe": "recipes/demo_sft.yaml",
        "stage": "sft",
        "base_model": "tiny",
        "tuned_model": "saves/demo_sft/merged",
        "data": "val split of [demo]",
        "n_examples": len(REFS),
        "decoding": {"do_sample": False, "max_new_tokens": 16},
        "results": results,
    }


def test_model_summary_values():
    s = R.model_summary(6.0, 3, ["a b", "x"], ["a b", "y"])
    assert s["loss"] == pytest.approx(2.0)  # 6 nats over 3 tokens
    assert s["perplexity"] == pytest.approx(math.exp(2.0))
    assert s["loss_tokens"] == 3
    assert s["exact_match"] == pytest.approx(0.5) and s["f1"] == pytest.approx(0.5) and s["n"] == 2
    assert R.model_summary(0.0, 0, None, None)["loss"] is None  # no tokens: no loss, not a division error
    assert R.perplexity(1e6) is None  # overflow is not written as infinity (JSON has none)


def test_write_sft_report(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "trainer_log.jsonl").write_text(
        "\n".join(json.dumps({"step": s, "loss": 4.0 - s / 10, **({"eval_loss": 3.9} if s == 5 else {})})
                  for s in range(1, 11)) + "\n{torn line"
    )
    (out / "all_results.json").write_text(json.dumps({"global_step": 10, "epoch": 2.5, "num_train_examples": 16,
                                                      "train_loss": 3.0, "eval_loss": 3.9, "train_runtime_s": 12.4}))
    metrics = {**_metrics(), "training": R.read_training_results(out)}
    rows = R.prediction_rows(PROMPTS, REFS, {"base": BASE, "tuned": TUNED})
    R.write(out / "eval", metrics, rows, output_dir=out)

    files = {p.name for p in (out / "eval").iterdir()}
    assert files == {"metrics.json", "predictions.jsonl", "report.md", "metrics.png", "loss_curves.png"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp folder left behind

    saved = json.loads((out / "eval" / "metrics.json").read_text())
    for model in ("base", "tuned"):
        assert set(saved["results"][model]) >= {"loss", "perplexity", "exact_match", "f1", "rouge_l", "bleu", "n"}
        assert saved["results"][model]["n"] == 4
    # tuned: Paris exact, "five" vs "4" nothing, "blue sky" vs "blue" partly, "ok" exact -> EM 2/4
    assert saved["results"]["tuned"]["exact_match"] == pytest.approx(0.5)
    # base: only "4" exact -> 1/4; delta = 0.25; losses 3 and 2 -> delta loss -1
    assert saved["results"]["base"]["exact_match"] == pytest.approx(0.25)
    assert saved["delta"]["exact_match"] == pytest.approx(0.25)
    assert saved["delta"]["loss"] == pytest.approx(-1.0)
    assert saved["delta"]["perplexity"] == pytest.approx(math.exp(2) - math.exp(3))
    assert saved["decoding"] == {"do_sample": False, "max_new_tokens": 16} and saved["schema_version"] == 1

    lines = (out / "eval" / "predictions.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4
    first = json.loads(lines[0])
    assert first["prompt"] == PROMPTS[0] and first["reference"] == "Paris"
    assert first["base_prediction"] == "London" and first["tuned_prediction"] == "Paris"
    assert first["tuned_scores"]["exact_match"] == 1.0 and first["base_scores"]["f1"] == 0.0
    # "blue sky" vs "blue": F1 = 2 * (1/2 * 1) / (3/2) = 2/3
    assert json.loads(lines[2])["tuned_scores"]["f1"] == pytest.approx(2 / 3)

    md = (out / "eval" / "report.md").read_text(encoding="utf-8")
    assert "| exact match (%) | 25.0 | 50.0 | +25.0 ▲ |" in md
    assert "| loss (nats/token) | 3.0000 | 2.0000 | -1.0000 ▲ |" in md  # lower loss is an improvement
    assert "![metrics base vs tuned](metrics.png)" in md and "![training loss](loss_curves.png)" in md
    assert "### Best (highest tuned F1)" in md and "### Worst (lowest tuned F1)" in md
    assert "### Changed most from base to tuned" in md
    assert "````text\nQ: say ```code```\n````" in md  # a fence longer than any backtick run inside
    assert "- tuned model: saves/demo_sft/merged" in md and "greedy" in md
    assert ("Trained 10 optimizer steps on 16 examples (2.50 epochs), 12 s, mean train loss 3.0000,"
            " last eval loss during training 3.9000.") in md


def test_a_label_smoothed_runs_training_losses_say_so():
    """label_smoothing_factor: training's loss and eval_loss are the smoothed objective (all_results.json records the
    factor), the table's loss the plain cross-entropy; the report said "last eval loss during training" beside it
    as if they were one quantity."""
    training = {"global_step": 2, "train_loss": 3.5, "eval_loss": 3.9, "label_smoothing_factor": 0.1}
    md = R.render_markdown({**_metrics(), "training": training}, None, {})
    assert ("last eval loss during training 3.9000 (both label-smoothed, label_smoothing_factor 0.1: the training "
            "objective, not the plain cross-entropy of the table above).") in md


def test_a_moe_runs_training_losses_with_the_router_term_say_so():
    """moe_aux_loss_coef on a sparse MoE model: training's loss and eval_loss carry the router's aux term as
    transformers' Trainer logs them (all_results.json records the coefficient), eval's table stays the cross-entropy."""
    training = {"global_step": 2, "train_loss": 3.5, "eval_loss": 3.9, "moe_aux_loss_coef": 0.01}
    md = R.render_markdown({**_metrics(), "training": training}, None, {})
    assert ("last eval loss during training 3.9000 (both add moe_aux_loss_coef 0.01 x the router's load-balancing "
            "loss, as transformers' Trainer logs it: not the plain cross-entropy of the table above).") in md


@pytest.mark.parametrize("keys, words", [
    ({"use_dft_loss": True}, "both DFT-weighted, use_dft_loss"),
    ({"use_eaft_loss": True, "eaft_alpha": 0.5}, "both EAFT-weighted, use_eaft_loss, eaft_alpha 0.5")])
def test_a_dft_or_eaft_runs_training_losses_say_so(keys, words):
    """use_dft_loss / use_eaft_loss: training's loss and eval_loss are LLaMA-Factory's weighted loss (all_results.json
    records the keys), the table's loss the plain cross-entropy."""
    training = {"global_step": 2, "train_loss": 3.5, "eval_loss": 3.9, **keys}
    md = R.render_markdown({**_metrics(), "training": training}, None, {})
    assert (f"last eval loss during training 3.9000 ({words}: the training objective, not the plain cross-entropy "
            "of the table above).") in md


def test_a_loss_changed_on_resume_is_said_with_its_step():
    """A resume that changed the token loss (all_results.json's token_loss_changes, train.checkpoint): the training
    line says after which step and from what to what, also when the run ended on the plain loss; it named the last
    settings alone, as if every step had trained them."""
    eaft = {"use_eaft_loss": True, "eaft_alpha": 0.5}
    changes = [{"step": 4, "from": {}, "to": eaft}, {"step": 6, "from": eaft, "to": {"label_smoothing_factor": 0.1}}]
    training = {"global_step": 8, "train_loss": 3.5, "label_smoothing_factor": 0.1, "token_loss_changes": changes}
    md = R.render_markdown({**_metrics(), "training": training}, None, {})
    assert ("mean train loss 3.5000 (both label-smoothed, label_smoothing_factor 0.1: the training objective, not the "
            "plain cross-entropy of the table above; the loss changed after step 4 (a resume) from the plain "
            "cross-entropy to EAFT-weighted cross-entropy (use_eaft_loss, eaft_alpha 0.5); then after step 6 (a "
            "resume) from EAFT-weighted cross-entropy (use_eaft_loss, eaft_alpha 0.5) to label-smoothed "
            "cross-entropy (label_smoothing_factor 0.1)).") in md
    training = {"global_step": 8, "train_loss": 3.5, "token_loss_changes": [{"step": 4, "from": eaft, "to": {}}]}
    md = R.render_markdown({**_metrics(), "training": training}, None, {})
    assert ("mean train loss 3.5000 (the loss changed after step 4 (a resume) from EAFT-weighted cross-entropy "
            "(use_eaft_loss, eaft_alpha 0.5) to the plain cross-entropy).") in md


def test_the_loss_curves_name_each_stretch_s_loss_after_a_resume_changed_it(tmp_path):
    """Resumes that changed the loss after steps 2 and 4 (all_results.json's token_loss_changes): loss_curves.png
    draws each stretch of the train and eval curves under the loss it trained, with a marker at each change; its
    legend named the final loss alone for every step. Read back from the PNG's Description (the legend as text).
    Golden: the steps of each stretch by hand (a step trained after "after step N" is N + 1 on)."""
    from PIL import Image

    eaft = {"use_eaft_loss": True, "eaft_alpha": 0.5}
    changes = [{"step": 2, "from": {}, "to": eaft}, {"step": 4, "from": eaft, "to": {"use_dft_loss": True}}]
    training = {"global_step": 6, "train_loss": 3.0, "use_dft_loss": True, "token_loss_changes": changes}
    out = tmp_path / "run"
    out.mkdir()
    (out / "trainer_log.jsonl").write_text("".join(
        json.dumps({"step": s, "loss": 4.0 - s / 10, **({"eval_loss": 3.9} if s % 2 == 0 else {})}) + "\n"
        for s in range(1, 7)))
    R.write(out / "eval", {**_metrics(), "training": training}, None, output_dir=out)
    legend = Image.open(out / "eval" / "loss_curves.png").text["Description"].split("; ")
    plain, weighted = "the plain cross-entropy", "EAFT-weighted cross-entropy (use_eaft_loss, eaft_alpha 0.5)"
    dft = "DFT-weighted cross-entropy (use_dft_loss)"
    assert legend == [f"train, to step 2: {plain}", f"eval (during training), to step 2: {plain}",
                      f"train, steps 3–4: {weighted}", f"eval (during training), steps 3–4: {weighted}",
                      f"train, from step 5: {dft}", f"eval (during training), from step 5: {dft}",
                      "resumed after step 2: the loss changed", "resumed after step 4: the loss changed",
                      "base model, this evaluation (3.000)", "tuned model, this evaluation (2.000)"]
    series = R.loss_series([json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()],
                           R.loss_stretches(training))
    assert [xs for xs, _ in series.values()] == [[1, 2], [2], [3, 4], [4], [5, 6], [6]]
    unchanged = R.loss_stretches({"use_dft_loss": True})  # no resume changed it: one curve each, as before
    assert list(R.loss_series([{"step": 1, "loss": 2.0, "eval_loss": 2.5}], unchanged)) == [
        "train (DFT-weighted)", "eval (during training) (DFT-weighted)"]


def test_a_kto_report_shows_the_numbers_its_text_names():
    """Stage kto's paragraph explains reward_chosen, reward_rejected, kl and kto_loss (metrics.json's keys, from
    evaluate.preference.kto_summary), but the table showed none of them: no label, so no row. And the training line's
    eval loss is that KTO loss, not the table's loss (the desirable responses' NLL)."""
    kto = {"kto_loss": 0.5, "reward_chosen": 0.0, "reward_rejected": 0.0, "reward_margin": 0.0, "kl": 0.0}
    tuned = {"kto_loss": 0.25, "reward_chosen": 0.75, "reward_rejected": -0.5, "reward_margin": 1.25, "kl": 0.125}
    results = {"base": {**R.model_summary(30.0, 10, BASE, REFS), **kto},
               "tuned": {**R.model_summary(20.0, 10, TUNED, REFS), **tuned}}
    training = {"global_step": 2, "eval_loss": 0.25}
    md = R.render_markdown({**_metrics(), "stage": "kto", "results": results, "delta": R.deltas(results),
                            "training": training}, None, {})
    assert ("last eval loss during training 0.2500 (stage kto's objective: the table's KTO loss, the split as one "
            "batch, not its loss).") in md
    assert "| KTO loss, the split as one batch | 0.5000 | 0.2500 | -0.2500 ▲ |" in md
    assert "| mean reward of the desirable responses | 0.0000 | 0.7500 | +0.7500 ▲ |" in md
    assert "| mean reward of the undesirable responses | 0.0000 | -0.5000 | -0.5000 ▲ |" in md  # lower is better
    assert "| KL estimate | 0.0000 | 0.1250 | +0.1250 |" in md  # neither way is better


@pytest.mark.parametrize("terms, words", [
    ({}, "stage dpo's objective: the table's preference loss, not its loss"),
    ({"ld_alpha": 0.0}, "stage dpo's objective with ld_alpha 0, which the table's preference loss leaves out"),
    ({"ld_alpha": 0.5, "pref_bco_weight": 0.25},
     "stage dpo's objective with ld_alpha 0.5 and pref_bco_weight 0.25, which the table's preference loss leaves out"),
])
def test_a_dpo_runs_training_loss_with_ld_alpha_or_bco_is_not_called_the_tables_preference_loss(terms, words):
    """Eval's preference loss is the plain one (pipeline.evaluate.preference: no LD weighting, no BCO term); training's
    loss has both, so the training line names them instead of pointing at the table's row (ld_alpha 0 is a weighting:
    the verbose tail not counted)."""
    line = R._training_line({"global_step": 3, "eval_loss": 2.5, **terms}, "dpo")
    assert line == f"Trained 3 optimizer steps, last eval loss during training 2.5000 ({words})."


def test_png_files_are_images(tmp_path):
    R.write(tmp_path / "eval", _metrics(), R.prediction_rows(PROMPTS, REFS, {"base": BASE, "tuned": TUNED}))
    assert (tmp_path / "eval" / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tuned_only_and_training_loss_png_fallback(tmp_path):
    (tmp_path / "training_loss.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # no trainer_log.jsonl
    rows = R.prediction_rows(PROMPTS, REFS, {"tuned": TUNED})
    R.write(tmp_path / "eval", _metrics(with_base=False), rows, output_dir=tmp_path)
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(saved["results"]) == {"tuned"} and saved["delta"] == {}
    row = json.loads((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()[0])
    assert "base_prediction" not in row and row["tuned_prediction"] == "Paris"
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "![training loss](../training_loss.png)" in md and "Δ" not in md
    assert R.read_training_results(tmp_path) == {}  # no all_results.json: nothing, not an error
    assert "Changed most" not in md


def test_pt_stage_has_loss_only(tmp_path):
    results = {"base": R.model_summary(50.0, 10, None, None), "tuned": R.model_summary(40.0, 10, None, None)}
    metrics = {"run_name": "demo_pt", "stage": "pt", "results": results}
    R.write(tmp_path / "eval", metrics, None, output_dir=tmp_path)
    assert {p.name for p in (tmp_path / "eval").iterdir()} == {"metrics.json", "report.md"}
    saved = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert saved["results"]["tuned"]["perplexity"] == pytest.approx(math.exp(4.0))
    assert "f1" not in saved["results"]["tuned"]
    md = (tmp_path / "eval" / "report.md").read_text()
    assert "| perplexity | 148.41 | 54.60 | -93.8" in md  # e^5 = 148.413, e^4 = 54.598
    assert "loss and perplexity only" in md


def test_rewrite_replaces_previous_eval(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "stale.txt").write_text("old")
    R.write(tmp_path / "eval", _metrics(), R.prediction_rows(PROMPTS, REFS, {"base": BASE, "tuned": TUNED}))
    assert not (tmp_path / "eval" / "stale.txt").exists()


def test_select_examples_order():
    rows = R.prediction_rows(PROMPTS, REFS, {"base": BASE, "tuned": TUNED})
    sections = R.select_examples(rows, k=2)
    # tuned F1: [1, 0, 2/3, 1]; base F1: [0, 1, 0, 0]
    assert [r["index"] for r in sections["Best (highest tuned F1)"]] == [0, 3]  # ties by index
    assert [r["index"] for r in sections["Worst (lowest tuned F1)"]] == [1, 2]
    # |change|: 1, 1, 2/3, 1 -> 0, 1 (ties by index)
    assert [r["index"] for r in sections["Changed most from base to tuned"]] == [0, 1]
    assert R.select_examples([]) == {}
