"""compute_accuracy on the user's path: LLaMA-Factory's LoRA sft example with its eval section switched on and
compute_accuracy: true, through `python -m pipeline build / train` on a transformers-written Qwen3.

Golden: LLaMA-Factory's ComputeAccuracy (tests/train/test_compute_accuracy.py carries its lines) over
transformers' + PEFT's logits of every held-out example, with the adapter each evaluation saw (checkpoint-1's,
then the final one). The checkpoint answers <|im_end|> at every position (harness.always_answer): each example
ends its answer with it, so each scores 1 / its labelled tokens, and the mean over examples differs from the mean
over tokens.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.acceptance.harness import always_answer, pipeline, write_hf_checkpoint
from tests.compat.test_lf_recipes import lf_checkout, template_override
from tests.train.test_compute_accuracy import llamafactory_accuracy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

EVAL_SECTION = """### eval
val_size: 0.25
per_device_eval_batch_size: 2
eval_strategy: steps
eval_steps: 1
compute_accuracy: true
"""
RECIPE = "examples/train_lora/qwen3_lora_sft.yaml"


def held_out(work, args: list[str]) -> list:
    """The val split's examples as the recipe builds them (input_ids and LLaMA-Factory-style unshifted labels)."""
    from pipeline.data.tokenize import tokenized_split
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    here = os.getcwd()
    os.chdir(work)
    try:
        val = tokenized_split(data_args(resolve(RECIPE, args, command="eval")), "val")
        return [val.example(i) for i in range(len(val))]
    finally:
        os.chdir(here)


def golden(base_dir, adapter, examples) -> tuple[float, float]:
    """(LLaMA-Factory's accuracy, the mean over all tokens) of PEFT's model on the examples, one row each."""
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), adapter).eval()
    hits, scored, per_example = 0, 0, []
    for ex in examples:
        with torch.no_grad():
            preds = model(torch.tensor([ex.input_ids])).logits.argmax(dim=-1).numpy()
        labels = np.array([ex.labels])
        per_example.append(llamafactory_accuracy(preds, labels))
        mask = labels[:, 1:] != -100
        hits += int((preds[:, :-1] == labels[:, 1:])[mask].sum())
        scored += int(mask.sum())
    return float(np.mean(per_example)), hits / scored


def test_eval_accuracy_of_a_llamafactory_recipe_is_its_formula_on_peft_logits(tmp_path):
    base = tmp_path / "ckpt"
    model = write_hf_checkpoint(base, "qwen3", small_vocab=True, tie_word_embeddings=False)
    always_answer(model, model.config.eos_token_id).save_pretrained(base, safe_serialization=True)
    work = lf_checkout(tmp_path / "lf", str(base))
    recipe = work / RECIPE
    recipe.write_text(recipe.read_text("utf-8").split("### eval")[0] + EVAL_SECTION, "utf-8")
    args = [*template_override(), "cutoff_len=128", "max_steps=2",
            "gradient_accumulation_steps=1", "dataloader_num_workers=0", "logging_steps=1", "save_steps=1",
            "bf16=false"]
    pipeline("build", RECIPE, *args, cwd=work)
    trained = pipeline("train", RECIPE, *args, cwd=work)
    assert "compute_accuracy" not in trained.stderr  # no notice, no refusal
    run = work / "saves/qwen3-4b/lora/sft"
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text("utf-8").splitlines()]
    evals = {r["step"]: r for r in log if "eval_loss" in r}
    assert sorted(evals) == [1, 2] and all("eval_accuracy" in r for r in evals.values())
    examples = held_out(work, args)
    assert len(examples) >= 5
    for step, adapter in ((1, run / "checkpoint-1" / "adapter"), (2, run / "adapter")):
        accuracy, token_mean = golden(base, adapter, examples)
        assert 0 < accuracy < 1 and accuracy != pytest.approx(token_mean, abs=1e-6)  # per example, not token
        assert evals[step]["eval_accuracy"] == pytest.approx(accuracy, abs=1e-9), step
    results = json.loads((run / "all_results.json").read_text("utf-8"))
    assert results["eval_accuracy"] == evals[2]["eval_accuracy"]
    assert (run / "training_eval_accuracy.png").is_file()  # plot_loss: true, as LLaMA-Factory plots it


@pytest.mark.parametrize("stage, dataset, words", [
    ("pt", "c4_demo", "pt's evaluation reports eval_loss and eval_perplexity"),
    ("dpo", "dpo_en_demo", "dpo's evaluation reports eval_rewards/accuracies")])
def test_compute_accuracy_outside_sft_is_one_message(lf_workdir, stage, dataset, words):
    (lf_workdir / "r.yaml").write_text(f"model_name_or_path: tiny\nstage: {stage}\ndataset: {dataset}\nmax_steps: 1\n"
                                       "compute_accuracy: true\n", "utf-8")
    failed = pipeline("validate", "r.yaml", cwd=lf_workdir, expect=2)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert errors[0].startswith("error: r.yaml:5") and "compute_accuracy: given true" in errors[0], errors
    assert f"stage: {stage}" in errors[0] and "sft only, as in LLaMA-Factory" in errors[0] and words in errors[0]
