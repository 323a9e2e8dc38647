"""eval after a pure_bf16 dpo run whose recipe names its reference, as LLaMA-Factory users often write it: `ref_model`
set to the model_name_or_path checkpoint (a save_pretrained Llama), LoRA, `pure_bf16: true`; `train`, then `eval`.

eval scores the models as the run trained them, in bf16 (pipeline.recipe.precision.weights_dtype), and the reference
must be scored so too, as training's was (cast to the policy's dtype). The golden is a definition, not our code: the
base model is the reference here, so its reward margin (beta x its log-ratio against the reference, chosen minus
rejected) is exactly 0 and no pair's margin is > 0. With the reference in fp32 beside the bf16 base the margin was
the two precisions' difference (5e-3 on this model) and half the pairs counted as won.
"""
from __future__ import annotations

import json

from tests.acceptance.harness import pipeline, write_data, write_hf_checkpoint, write_ranking_data

RECIPE = """\
model_name_or_path: llama
ref_model: llama
stage: dpo
do_train: true
finetuning_type: lora
lora_rank: 4
lora_target: all
pref_beta: 0.5
pure_bf16: true
dataset: prefs_alpaca
dataset_dir: data
template: alpaca
cutoff_len: 256
val_size: 4
output_dir: saves/dpo
per_device_train_batch_size: 4
learning_rate: 5.0e-2
max_steps: 1
plot_loss: false
max_new_tokens: 1
max_eval_samples: 1
"""


def test_eval_of_a_pure_bf16_dpo_run_scores_its_reference_in_bf16(tmp_path):
    write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True)
    write_ranking_data(write_data(tmp_path / "data"), n=8)
    (tmp_path / "dpo.yaml").write_text(RECIPE, "utf-8")
    for command in ("build", "train", "eval"):
        pipeline(command, "dpo.yaml", cwd=tmp_path)
    metrics = json.loads((tmp_path / "saves/dpo/eval/metrics.json").read_text("utf-8"))
    assert metrics["precision"].startswith("bf16 weights")
    base, tuned = metrics["results"]["base"], metrics["results"]["tuned"]
    assert (base["reward_margin"], base["reward_accuracy"]) == (0.0, 0.0)
    assert tuned["reward_margin"] != 0.0  # the trained adapter moved away from its reference
