"""Shared values of the training tests: tiny datasets and base recipes."""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

WORDS = ("red green blue apple river stone cloud seven little happy bright night morning garden "
         "window paper music light water small large quick slow north south").split()


def sft_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.sample(WORDS, 3)
        rows.append({"instruction": f"Repeat the words: {' '.join(words)}", "input": "",
                     "output": " ".join(words) + f" ({i})"})
    return rows


def varied_sft_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Answers of 1 to 12 words: micro-batches carry very different numbers of trained tokens, which is where
    a mean per micro-batch and a mean over the update's tokens part."""
    rng = random.Random(seed)
    return [{"instruction": f"Say {k} words.", "input": "", "output": " ".join(rng.choice(WORDS) for _ in range(k))}
            for k in (rng.randint(1, 12) for _ in range(n))]


def corpus(n_paragraphs: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(40)) + "." for _ in range(n_paragraphs))


BASE_SFT = {
    "model_name_or_path": "tiny",
    "stage": "sft",
    "dataset": "tiny_sft",
    "dataset_dir": "data",
    "template": "alpaca",
    "cutoff_len": 64,
    "val_size": 0.1,
    "finetuning_type": "lora",
    "lora_rank": 4,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 2,
    "learning_rate": 1e-3,
    "max_steps": 4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 1,
    "logging_steps": 1,
    "save_steps": 1000,
    "plot_loss": False,
    "group_by_length": False,
    "seed": 7,
}
BASE_PT = {**BASE_SFT, "stage": "pt", "dataset": "tiny_pt", "cutoff_len": 32, "finetuning_type": "full"}
BASE_PT.pop("template")
# sft recipe keys of the golden runs against transformers + PEFT (write_hf_checkpoint(workdir / "gpt2")): LoRA on
# every layer PEFT targets the same way, no dropout anywhere (transformers' forward is compared in train mode), 2
# micro-batches of 2 rows per update with answers of 1-12 words (their trained-token counts differ a lot)
GOLDEN_GPT2 = dict(model_name_or_path="gpt2", dataset="varied_sft", warmup_steps=0, learning_rate=5e-2,
                   per_device_train_batch_size=2, gradient_accumulation_steps=2, lora_target=["c_attn", "c_proj", "c_fc"],
                   lora_alpha=16, lora_dropout=0.0, dropout=0.0)


def check_two_ranks_follow_one_rank(one: Path, two: Path, output: str, keys: dict[str, Any]) -> None:
    """A two-rank run's output_dir `two` (its launch's stderr `output`) against the one-rank run `one` of the same
    global batch and recipe `keys` (max_steps, zero_stage, compute_accuracy; full fine-tuning): the same losses, eval losses,
    accuracies and final weights to rounding, tokens counted over both ranks, one writer, a checkpoint holding both
    ranks' state."""
    from pipeline.runtime.log import read_log

    # no rank aborted at exit (gloo's threads asking for the GIL while the interpreter finalized: dist.end_process)
    assert "terminate called" not in output
    assert output.count("trainable params:") == 1  # only rank 0 prints
    log_one, log_two = read_log(one / "trainer_log.jsonl"), read_log(two / "trainer_log.jsonl")
    steps = keys["max_steps"]
    assert [r["step"] for r in log_two] == list(range(1, steps + 1))  # one writer: no duplicated lines
    assert [r["loss"] for r in log_two] == pytest.approx([r["loss"] for r in log_one], rel=1e-4)
    assert [r["eval_loss"] for r in log_two if "eval_loss" in r] == \
        pytest.approx([r["eval_loss"] for r in log_one if "eval_loss" in r], rel=1e-4)
    accuracies = [r.get("eval_accuracy") for r in log_one if "eval_loss" in r]
    assert accuracies and (all(accuracies) if keys.get("compute_accuracy") else set(accuracies) == {None})
    assert [r.get("eval_accuracy") for r in log_two if "eval_loss" in r] == pytest.approx(accuracies, abs=1e-9)
    assert [r["tokens_seen"] for r in log_two] == [r["tokens_seen"] for r in log_one]  # counted over both ranks
    ckpt = two / f"checkpoint-{steps}"
    assert (ckpt / "rng" / "rank-0.safetensors").is_file() and (ckpt / "rng" / "rank-1.safetensors").is_file()
    if keys["zero_stage"]:  # ZeRO 0 keeps the optimizer's state in rank 0's model-states file
        assert {p.name for p in (ckpt / "deepspeed").glob("*optim_states.pt")} == \
            {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"}  # shards
    assert json.loads((ckpt / "trainer_state.json").read_text())["recipe"]["world_size"] == 2
    # AdamW moves a weight by about the learning rate a step: 2e-3 of the steps' rates is rounding (a gradient element
    # near zero, summed in another order, changes its normalised step; 4e-4 seen at most), a wrong update is not.
    # Except where the moments start afresh: there the step is lr x g / (|g| + eps), and a gradient element within a
    # few eps of zero moves it by lr x d / eps for a rounding d of g (the ranks' sums round differently). AdamW
    # starts once, at step 1, whose learning rate warmup makes 0 here; BAdam starts every block afresh at its switch
    # (BAdam alone at adam_epsilon 1e-8: a down_proj element with g ~2e-8 at layer 1's first step, d ~3e-10, moved
    # 4.9e-6 against the 4e-6 allowed, every loss equal to 4e-8), so BAdam is compared at adam_epsilon 1e-6 (the
    # same element 4.9e-7)
    assert not keys.get("use_badam") or keys.get("adam_epsilon", 1e-8) >= 1e-6, \
        "BAdam's fresh moments at each switch need adam_epsilon >= 1e-6 here (see the comment above)"
    assert_same_weights(one / "model" / "model.safetensors", two / "model" / "model.safetensors",
                        atol=2e-3 * sum(r["lr"] for r in log_one))


def check_resumed_run_is_the_uninterrupted_one(uninterrupted: Path, resumed: Path, weights: str,
                                               atol: float = 1e-6, metrics: tuple[str, ...] = ()) -> float:
    """Steps 3-4 of `resumed` (from checkpoint-2, on another rank count) log what `uninterrupted` logged (the loss,
    and the objective's `metrics`), and the final weights agree to fp32 rounding (`atol`: the ranks' sums are added
    in another order). Returns the largest weight difference."""
    from safetensors.torch import load_file

    from pipeline.runtime.log import read_log

    got = [r for r in read_log(resumed / "trainer_log.jsonl")]
    want = [r for r in read_log(uninterrupted / "trainer_log.jsonl") if r["step"] > 2]
    assert want and [r["step"] for r in got] == [r["step"] for r in want]
    for name in ("loss", "eval_loss", *metrics):
        assert [name in r for r in got] == [name in r for r in want], name
        assert [r[name] for r in got if name in r] == \
            pytest.approx([r[name] for r in want if name in r], rel=1e-5, abs=0), name
    for name in ("lr", "tokens_seen", "trained_tokens_seen"):
        assert [r.get(name) for r in got] == [r.get(name) for r in want], name
    a, b = load_file(uninterrupted / weights), load_file(resumed / weights)
    assert a.keys() == b.keys()
    # AdamW moves a weight by about the learning rate (1e-3 here) a step: a lost or misplaced moment is ~1e-4,
    # rounding ~1e-7 (measured: 3e-8 LoRA, 1e-7 full)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < atol, diff
    return diff


def assert_same_weights(one: Path, two: Path, atol: float) -> None:
    """Two safetensors files hold the same tensors, each element within `atol`."""
    import torch
    from safetensors.torch import load_file

    want, got = load_file(one), load_file(two)
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")
