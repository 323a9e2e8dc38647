"""Stage rm in the trainer (in-process, the tiny preset): full fine-tuning under ZeRO-3 resumes exactly, the score
head included; LoRA with new_special_tokens trains and merges (the CLI path with LoRA and the exports:
tests/acceptance/test_rm_cli.py)."""
from __future__ import annotations

import pytest
from safetensors.torch import load_file

from pipeline.runtime.log import read_log
from pipeline.train.run import train
from tests.train.test_dpo import BASE_DPO, dpo_recipe  # noqa: F401 - the ranking data fixture

BASE_RM = {**{k: v for k, v in BASE_DPO.items() if k != "pref_beta"}, "stage": "rm", "finetuning_type": "full",
           "zero_stage": 3, "max_steps": 3, "dropout": 0.1, "eval_steps": 3}  # dropout: the restored RNG matters


def test_full_zero3_resume_continues_exactly(dpo_recipe, make_recipe):  # noqa: F811 - dpo_recipe writes the pairs
    from tests.train.test_checkpoint_resume import interrupt_after

    def rm_recipe(name: str, **keys):
        return make_recipe({**BASE_RM, **keys}, name=name)

    straight = train(rm_recipe("straight"))
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, 2)
        first = train(rm_recipe("resumed"))
    assert first.exit_code == 143 and first.state.global_step == 2
    resumed = train(rm_recipe("resumed", resume_from_checkpoint="latest"))
    a = read_log(straight.output_dir / "trainer_log.jsonl")
    b = read_log(resumed.output_dir / "trainer_log.jsonl")
    assert [rec["step"] for rec in b if "loss" in rec] == [1, 2, 3]
    for key in ("loss", "accuracy", "scores/chosen", "scores/rejected", "eval_loss", "eval_accuracy"):
        assert [rec.get(key) for rec in b] == [rec.get(key) for rec in a], key
    want, got = (load_file(run.output_dir / "model" / "model.safetensors") for run in (straight, resumed))
    assert "score.weight" in want and "lm_head.weight" not in want
    assert all(want[k].equal(got[k]) for k in want)


def test_lora_with_new_special_tokens_trains_and_merges(dpo_recipe, make_recipe, monkeypatch):  # noqa: F811
    """new_special_tokens under stage rm: the embedding grows (a reward model has no LM head to grow: the resize
    stopped on it), trains beside the score head, and merged/ is a GPT2ForSequenceClassification of the grown
    vocabulary whose tokenizer files give the new ids."""
    import transformers

    from pipeline import merge

    r = make_recipe({**BASE_RM, "finetuning_type": "lora", "lora_rank": 2, "zero_stage": 0, "max_steps": 1,
                     "warmup_steps": 0, "dropout": 0.0, "eval_steps": None, "new_special_tokens": "<think>,</think>"},
                    name="rm_tokens")
    result = train(r)
    saved = load_file(result.output_dir / "adapter" / "adapter_model.safetensors")
    assert saved["base_model.model.transformer.wte.weight"].shape == (50304, 64)  # 50,259 ids, a multiple of 64
    monkeypatch.chdir(result.output_dir.parent.parent)
    merge.run(r)
    merged = result.output_dir / "merged"
    model = transformers.AutoModelForSequenceClassification.from_pretrained(merged)
    assert model.config.architectures == ["GPT2ForSequenceClassification"] and model.config.vocab_size == 50304
    assert transformers.AutoTokenizer.from_pretrained(merged).convert_tokens_to_ids(["<think>", "</think>"]) == \
        [50257, 50258]
