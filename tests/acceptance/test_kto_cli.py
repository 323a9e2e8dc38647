"""Stage kto as a user drives it: LLaMA-Factory KTO data (alpaca and sharegpt forms with a kto_tag column), a
save_pretrained tiny Llama and an LLaMA-Factory-style recipe -> `python -m pipeline build / train / merge / eval`;
the adapter loads in PEFT and gives the merged model's logits."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tests.acceptance import harness
from tests.acceptance.harness import SFT, WORDS

# LLaMA-Factory's dataset_info.json entries for KTO data (its data/README.md: "columns": {"kto_tag": ...})
KTO_ENTRIES = {
    "kto_alpaca": {"file_name": "raw/kto_alpaca.json", "columns": {"prompt": "instruction", "query": "input",
                                                                  "response": "output", "kto_tag": "tag"}},
    "kto_sharegpt": {"file_name": "raw/kto_sharegpt.json", "formatting": "sharegpt",
                     "columns": {"messages": "messages", "kto_tag": "label"},
                     "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                              "assistant_tag": "assistant"}},
}
KTO = {**SFT, "stage": "kto", "dataset": "kto_alpaca,kto_sharegpt", "template": "llama3", "val_size": 0.25,
       "pref_beta": 0.1, "learning_rate": 2e-2, "max_steps": 3, "per_device_train_batch_size": 4, "eval_steps": 3,
       "max_new_tokens": 2, "max_eval_samples": 2}


def write_kto_data(data: Path, n: int = 12) -> None:
    """Rows tagged desirable (the words repeated) or not (a wrong word), in both of LLaMA-Factory's forms."""
    rng = random.Random(5)
    alpaca, sharegpt = [], []
    for i in range(n):
        a, b, c = rng.sample(WORDS, 3)
        good = i % 3 != 0
        alpaca.append({"instruction": f"Repeat: {a} {b}", "input": "", "output": f"{a} {b}" if good else f"{c} ({i})",
                       "tag": good})
        sharegpt.append({"messages": [{"role": "user", "content": f"Say {c} twice"},
                                      {"role": "assistant", "content": f"{c} {c}" if good else f"{a} ({i})"}],
                         "label": good})
    (data / "raw" / "kto_alpaca.json").write_text(json.dumps(alpaca, indent=1), encoding="utf-8")
    (data / "raw" / "kto_sharegpt.json").write_text(json.dumps(sharegpt, indent=1), encoding="utf-8")
    registry = json.loads((data / "dataset_info.json").read_text())
    (data / "dataset_info.json").write_text(json.dumps({**registry, **KTO_ENTRIES}, indent=2), encoding="utf-8")


def test_kto_lora_train_merge_eval_from_llamafactory_kto_data(workdir, hf_checkpoint):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    write_kto_data(workdir / "data")
    base_dir = hf_checkpoint("llama", small_vocab=True)
    harness.write_recipe(workdir / "kto.yaml", KTO, model_name_or_path=str(base_dir), output_dir="saves/kto",
                         plot_loss=True)
    for command in ("build", "train", "merge", "eval"):
        harness.pipeline(command, "kto.yaml", cwd=workdir)
    out = workdir / "saves" / "kto"
    log = [json.loads(line) for line in (out / "trainer_log.jsonl").read_text().splitlines()]
    # step one: policy = reference (adapters off), so every log-ratio and the KL estimate are 0 and each example's
    # loss is 1 - sigmoid(0) = 0.5 (weights 1, pref_ftx 0)
    assert log[0]["loss"] == pytest.approx(0.5, abs=1e-6)
    assert log[0]["kl"] == 0.0 and log[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    # TRL's names, the window's sums turned into means per side (every batch of 4 here holds both kinds)
    assert all({"rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "kl"} <= r.keys() for r in log)
    assert not any(key.endswith("_sum") or key.startswith("count/") for r in log for key in r)
    assert log[-1]["rewards/chosen"] > log[-1]["rewards/rejected"]  # desirable up, undesirable down
    evals = [r for r in log if "eval_loss" in r]
    assert evals and {"eval_rewards/chosen", "eval_kl"} <= evals[-1].keys()
    assert (out / "training_loss.png").is_file() and (out / "training_rewards_chosen.png").is_file()
    tuned = json.loads((out / "eval" / "metrics.json").read_text())["results"]["tuned"]
    # the 6 val rows fit one eval batch, so eval's loss on the split as one batch is training's eval_loss
    assert tuned["kto_loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert tuned["reward_chosen"] > tuned["reward_rejected"]

    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out / "adapter").eval()
    ids = torch.tensor([[3, 17, 42, 99, 120, 7, 200]])
    with torch.no_grad():
        a, b = merged(ids).logits, peft(ids).logits
        base_logits = AutoModelForCausalLM.from_pretrained(base_dir)(ids).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, base_logits, atol=1e-3)  # KTO changed the model
