"""LoRA+ and NEFTune through the CLI, as a LLaMA-Factory user brings them: a recipe in LLaMA-Factory's example
layout with `loraplus_lr_ratio` and `neftune_noise_alpha`, trained from a save_pretrained GPT-2 with
`python -m pipeline train` (loraplus_lr_embedding, for LoRA on embedding layers, which lora_target never selects
here, gets a notice); the adapter loads in PEFT and computes our model's logits. finetuning_type full with
loraplus_lr_ratio is one clear message, as LLaMA-Factory refuses it."""
from __future__ import annotations

import json

import pytest
import torch

from tests.acceptance.harness import assert_close, pipeline, trained_model, write_data, write_hf_checkpoint

RECIPE = """\
### model
model_name_or_path: gpt2

### method
stage: sft
do_train: true
finetuning_type: {finetuning_type}
lora_rank: 4
lora_target: all
additional_target: ln_f
loraplus_lr_ratio: 16.0
loraplus_lr_embedding: 1.0e-6
neftune_noise_alpha: 5

### dataset
dataset: tiny_sft
dataset_dir: data
template: alpaca
cutoff_len: 48

### output
output_dir: saves/plus
logging_steps: 1
plot_loss: false

### train
per_device_train_batch_size: 2
learning_rate: 5.0e-3
max_steps: 2
lr_scheduler_type: constant
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """data/ (the harness's tiny registry) and gpt2/ (save_pretrained), shared by this module's tests."""
    root = tmp_path_factory.mktemp("plus")
    write_data(root / "data")
    write_hf_checkpoint(root / "gpt2", "gpt2")
    return root


def test_a_lora_plus_neftune_recipe_trains_and_its_adapter_loads_in_peft(workdir):
    import peft
    import transformers

    tmp_path = workdir
    (tmp_path / "plus.yaml").write_text(RECIPE.format(finetuning_type="lora"), encoding="utf-8")
    pipeline("build", "plus.yaml", cwd=tmp_path)
    err = pipeline("train", "plus.yaml", cwd=tmp_path).stderr
    # A of 4 Linears x 2 blocks at learning_rate; their B at 16x; ln_f's gain and bias at 16x, not decayed
    assert ("optimizer: LoRA+ (loraplus_lr_ratio 16): 8 tensors at lr 0.005, weight decay 0 | 8 tensors at lr 0.08, "
            "weight decay 0 | 2 tensors at lr 0.08, weight decay 0") in err, err
    assert "neftune: uniform noise of alpha 5" in err
    assert "plus.yaml:12:24: loraplus_lr_embedding: accepted without effect: it is LoRA+'s learning rate" in err, err
    log = [json.loads(line) for line in (tmp_path / "saves/plus/trainer_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if "loss" in e] == [1, 2] and all(e["lr"] == 5e-3 for e in log if "lr" in e)

    ours = trained_model(tmp_path / "plus.yaml", tmp_path)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "saves/plus/adapter").eval()
    x = torch.tensor([list(range(5, 60, 3))])
    with torch.no_grad():
        assert_close(tuned(x).logits, ours(x))


def test_loraplus_without_lora_is_refused_with_one_message(workdir):
    tmp_path = workdir
    (tmp_path / "full.yaml").write_text(RECIPE.format(finetuning_type="full").replace("lora_rank: 4\n", "")
                                        .replace("lora_target: all\n", "").replace("additional_target: ln_f\n", ""),
                                        encoding="utf-8")
    err = pipeline("validate", "full.yaml", cwd=tmp_path, expect=2).stderr
    assert "full.yaml:8:" in err and "loraplus_lr_ratio" in err and "set finetuning_type: lora" in err, err
    assert "Traceback" not in err and err.count("loraplus_lr_ratio") == 1, err
