"""A user's session after training, through the CLI: resume after a crash, merge, eval, generate.

Starts from a GPT-2 written by transformers' save_pretrained; every golden value comes from transformers
or PEFT (greedy generation token for token) or from the uninterrupted run (resume, bitwise).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.acceptance.harness import (assert_same_run, crash_copy, log_losses, pipeline, write_data,
                                      write_hf_checkpoint, write_recipe)

PROMPT = "Repeat the words: red river"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    """A workdir with data/, a save_pretrained GPT-2 at gpt2/, and one LoRA run trained and merged."""
    root = tmp_path_factory.mktemp("session")
    write_data(root / "data")
    write_hf_checkpoint(root / "gpt2", "gpt2")
    recipe = write_recipe(root / "lora.yaml", model_name_or_path=str(root / "gpt2"), dataset_dir="data",
                          output_dir="saves/lora", max_new_tokens=NEW_TOKENS, learning_rate=0.05)
    pipeline("build", recipe, cwd=root)
    pipeline("train", recipe, cwd=root)
    pipeline("merge", recipe, cwd=root)
    return root


# A full ZeRO-3 bf16 run with dropout resumes bitwise in test_family_matrix.py (Qwen3, on 2 ranks: the same code
# for every family); tests/train/test_checkpoint_resume.py resumes LoRA ZeRO-3 bf16 and full fp32 in-process.
@pytest.mark.parametrize("keys, final", [
    (dict(finetuning_type="lora", lora_dropout=0.1, zero_stage=2), "adapter/adapter_model.safetensors"),
], ids=["lora-zero2-fp32"])
def test_resume_after_a_crash_equals_the_uninterrupted_run_bitwise(session, keys, final):
    """A run killed after its step-2 checkpoint (what `kill -9` or a lost node leaves), resumed with 'latest'.

    logging_steps 3: the resumed run's line at step 3 must average steps 1-3 as the uninterrupted run's does (it
    averaged step 3 alone: the weights were bitwise equal, the curve was not)."""
    common = dict(model_name_or_path=str(session / "gpt2"), dataset_dir="data", max_steps=4, save_steps=2,
                  logging_steps=3, lr_scheduler_type="cosine", warmup_steps=1, **keys)
    name = keys["finetuning_type"]
    straight = write_recipe(session / f"straight_{name}.yaml", output_dir=f"saves/straight_{name}", **common)
    pipeline("train", straight, cwd=session)
    a = session / f"saves/straight_{name}"

    b = crash_copy(a, session / f"saves/crashed_{name}", 2)
    crashed = write_recipe(session / f"crashed_{name}.yaml", output_dir=str(b), **common)
    resumed = pipeline("train", crashed, "resume_from_checkpoint=latest", cwd=session)
    assert "resuming from" in resumed.stderr and "at step 2" in resumed.stderr

    assert sorted(log_losses(b)) == [3, 4]
    assert_same_run(a, b, final)  # the weights bitwise, and the logged losses
    assert json.loads((b / "all_results.json").read_text())["global_step"] == 4


def greedy(model, tokenizer) -> str:
    """transformers' greedy generation of NEW_TOKENS after PROMPT, decoded by transformers' tokenizer."""
    x = torch.tensor([tokenizer.encode(PROMPT)])
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=50256)
    return tokenizer.decode(out[0, x.shape[1]:])


@pytest.mark.parametrize("which", ["base", "adapter", "merged"])
def test_generate_agrees_with_transformers_and_peft_token_for_token(session, which):
    import peft
    import transformers

    out = session / "saves/lora"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "merged")  # the files merge wrote
    if which == "merged":
        reference = transformers.AutoModelForCausalLM.from_pretrained(out / "merged")
    else:
        reference = transformers.GPT2LMHeadModel.from_pretrained(session / "gpt2")
        if which == "adapter":
            reference = peft.PeftModel.from_pretrained(reference, out / "adapter")
    expected = greedy(reference.eval(), tokenizer)
    # base as typed; adapter and merged in-process (the same command line, no interpreter start; generate keeps no
    # process state: its sampling generator is private, and no torch.distributed)
    done = pipeline("generate", session / "lora.yaml", "--model", which, "--raw", "--prompt", PROMPT, cwd=session,
                    as_typed=which == "base")
    assert done.stdout == expected + "\n"


def test_the_tuned_model_generates_otherwise_than_the_base(session):
    """The adapter is not a no-op (learning rate 0.05: two steps change the greedy continuation)."""
    import transformers

    out = session / "saves/lora"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out / "merged")
    base = transformers.GPT2LMHeadModel.from_pretrained(session / "gpt2").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    assert greedy(base, tokenizer) != greedy(merged, tokenizer)


def test_eval_reports_base_and_tuned(session):
    done = pipeline("eval", session / "lora.yaml", cwd=session)
    eval_dir = session / "saves/lora/eval"
    metrics = json.loads((eval_dir / "metrics.json").read_text(encoding="utf-8"))
    base, tuned = metrics["results"]["base"], metrics["results"]["tuned"]
    # the terminal's summary line gives exact match, README's measure of the demo (it gave F1, ROUGE-L, BLEU-4 only)
    (line,) = [x for x in (done.stdout + done.stderr).splitlines() if x.startswith("eval: base: ")]
    assert f"exact match {100 * base['exact_match']:.1f}%" in line.split(" | ")[0], line
    assert f"exact match {100 * tuned['exact_match']:.1f}%" in line.split(" | ")[1], line
    assert base["n"] == tuned["n"] == metrics["n_examples"] > 0
    assert base["loss_tokens"] == tuned["loss_tokens"] > 0
    assert tuned["loss"] != base["loss"]
    assert len((eval_dir / "predictions.jsonl").read_text(encoding="utf-8").splitlines()) == metrics["n_examples"]
    assert (eval_dir / "report.md").is_file()


def test_generate_and_chat_need_no_dataset(session):
    """A chat needs a model, not data: a recipe of two lines, the HF checkpoint and the trained adapter."""
    recipe = session / "chat.yaml"
    recipe.write_text(f"model_name_or_path: {session / 'gpt2'}\nadapter_name_or_path: saves/lora/adapter\n"
                      f"max_new_tokens: {NEW_TOKENS}\n", encoding="utf-8")
    import peft
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(session / "saves/lora/merged")
    reference = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(session / "gpt2"),
                                               session / "saves/lora/adapter")
    one = pipeline("generate", recipe, "--model", "adapter", "--raw", "--prompt", PROMPT, cwd=session)
    assert one.stdout == greedy(reference.eval(), tokenizer) + "\n"
    chat = pipeline("generate", recipe, "--raw", cwd=session, input=f"{PROMPT}\n\n")
    assert chat.stdout == one.stdout
