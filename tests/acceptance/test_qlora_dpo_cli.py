"""QLoRA for the preference and reward stages as a user brings it: LLaMA-Factory's
examples/train_lora/qwen3_lora_dpo.yaml (then qwen3_lora_reward.yaml and llama3_lora_ppo.yaml at 8 bits) with its keys
as written plus `quantization_bit`, LLaMA-Factory's pairwise data (dataset_info.json "ranking": true, alpaca and
sharegpt forms), a save_pretrained tiny Llama; `python -m pipeline build / train / merge` as typed.

Golden values are transformers' and PEFT's: PeftModel.from_pretrained on our adapter/ over transformers'
BitsAndBytesConfig model of the same checkpoint (4-bit nf4 with double quantization for dpo; load_in_8bit for rm,
AutoModelForSequenceClassification), and PEFT on the unquantized checkpoint for merged/; step one's loss is ln 2 by
hand (the reference is the policy with its adapter off: the same quantized model at step one), and so is ppo's first
KL, 0. Train's "trainable params" line is PEFT's get_nb_trainable_parameters on those models.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.acceptance.harness import pipeline, trained_model, write_data, write_hf_checkpoint, write_ranking_data

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tests.acceptance.test_qlora_cli import assert_outputs_are_peft_on_the_4bit_base  # noqa: E402


def llamafactory_recipe(model: str, stage: str, quantization: str, output_dir: str) -> str:
    """examples/train_lora/qwen3_lora_dpo.yaml (stage rm: qwen3_lora_reward.yaml, no pref_ keys; stage ppo:
    llama3_lora_ppo.yaml, its reward_model the rm run, sft data, its generate keys) as LLaMA-Factory ships it, QLoRA's
    two lines added, sized for a test (model, data, steps, batch, new tokens, ppo_epochs); bf16 left out on a CPU."""
    method = {"dpo": "pref_beta: 0.1\npref_loss: sigmoid  # choices: [sigmoid (dpo), orpo, simpo]\n",
              "ppo": "ppo_epochs: 1\n"}.get(stage, "")
    reward = "reward_model: saves/qlora-rm\n" if stage == "ppo" else ""
    dataset = "tiny_sft" if stage == "ppo" else "prefs_alpaca,prefs_sharegpt"
    cache = "overwrite_cache: true\n" if stage == "ppo" else ""  # the ppo example's: train builds its data itself
    generate = "\n### generate\nmax_new_tokens: 2\ntop_k: 0\ntop_p: 0.9\n" if stage == "ppo" else ""
    return f"""### model
model_name_or_path: {model}
{reward}trust_remote_code: true
{quantization}
### method
stage: {stage}
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
{method}
### dataset
dataset: {dataset}
template: llama3
cutoff_len: 64
max_samples: 1000
{cache}preprocessing_num_workers: 16
dataloader_num_workers: 4

### output
output_dir: {output_dir}
logging_steps: 1
save_steps: 500
plot_loss: false
overwrite_output_dir: true
save_only_model: false
report_to: none  # choices: [none, wandb, tensorboard, swanlab, mlflow]

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 5.0e-2
max_steps: {2 if stage == "dpo" else 1}
lr_scheduler_type: cosine
warmup_ratio: 0.1
ddp_timeout: 180000000
resume_from_checkpoint: null
deepspeed: ds_z2_config.json
{generate}"""


# examples/deepspeed/ds_z2_config.json as LLaMA-Factory ships it
ZERO2 = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
         "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                  "hysteresis": 2, "min_loss_scale": 1},
         "bf16": {"enabled": "auto"},
         "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8,
                               "overlap_comm": False, "reduce_scatter": True, "reduce_bucket_size": 5e8,
                               "contiguous_gradients": True, "round_robin_gradients": True}}


def test_llamafactory_qlora_dpo_rm_ppo_recipes_train_merge_and_load_in_peft_on_the_quantized_base(tmp_path):
    write_ranking_data(write_data(tmp_path / "data"))
    write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True)
    (tmp_path / "ds_z2_config.json").write_text(json.dumps(ZERO2), encoding="utf-8")
    four = "quantization_bit: 4\nquantization_method: bnb\n"
    (tmp_path / "dpo.yaml").write_text(llamafactory_recipe(str(tmp_path / "llama"), "dpo", four, "saves/qlora-dpo"),
                                       encoding="utf-8")
    pipeline("build", "dpo.yaml", cwd=tmp_path)
    trained = pipeline("train", "dpo.yaml", cwd=tmp_path)
    assert "quantized to 4-bit nf4 with double quantization" in trained.stderr
    assert "reference: the starting model (the policy with its adapters switched off)" in trained.stderr
    pipeline("merge", "dpo.yaml", cwd=tmp_path)

    out = tmp_path / "saves/qlora-dpo"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference (adapter off) at step one
    assert_outputs_are_peft_on_the_4bit_base("dpo.yaml", tmp_path, tmp_path / "llama", out, trained.stderr,
                                             changed=1e-3)

    # 8 bits (LLM.int8), stage rm: LLaMA-Factory's reward example on the same data, the score head trained beside it
    eight = "quantization_bit: 8\nquantization_method: bnb\n"
    (tmp_path / "rm.yaml").write_text(llamafactory_recipe(str(tmp_path / "llama"), "rm", eight, "saves/qlora-rm"),
                                      encoding="utf-8")
    trained = pipeline("train", "rm.yaml", cwd=tmp_path)
    assert "quantized to 8-bit (LLM.int8)" in trained.stderr
    out = tmp_path / "saves/qlora-rm"
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["modules_to_save"] == ["score"]
    x = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = trained_model("rm.yaml", tmp_path)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "llama", num_labels=1, dtype=torch.float32, device_map="cpu",
        quantization_config=transformers.BitsAndBytesConfig(load_in_8bit=True)).eval()
    scorer = peft.PeftModel.from_pretrained(base, out / "adapter", is_trainable=True).eval()
    # the 8-bit base counted as PEFT counts it, by its values (Int8Params: one int8 each); PEFT's total also holds the
    # frozen original of each modules_to_save module beside its trained copy (score here), a copy ours has not
    trainable, total = scorer.get_nb_trainable_parameters()
    total -= sum(p.numel() for name, p in scorer.named_parameters() if ".original_module." in name)
    assert f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}" \
           in trained.stderr.splitlines()
    with torch.no_grad():  # one row a call: without a pad id transformers scores a lone row at its last token
        golden = torch.cat([scorer(row[None]).logits[:, 0] for row in x])
        torch.testing.assert_close(ours(x)[:, -1, 0], golden, rtol=1e-5, atol=1e-5)

    # 8 bits, stage ppo: LLaMA-Factory's llama3_lora_ppo.yaml scoring with that reward adapter, beside the 8-bit base
    (tmp_path / "ppo.yaml").write_text(llamafactory_recipe(str(tmp_path / "llama"), "ppo", eight, "saves/qlora-ppo"),
                                       encoding="utf-8")
    trained = pipeline("train", "ppo.yaml", cwd=tmp_path)
    assert "reference: the starting model (the policy with its adapters switched off)" in trained.stderr
    out = tmp_path / "saves/qlora-ppo"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    assert log[0]["kl"] == 0.0  # the rollout's policy is the reference (the 8-bit base, adapter off) before an update
    assert (out / "adapter" / "value_head.safetensors").is_file()
