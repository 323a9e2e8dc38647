"""Stage kto in the trainer, through dpo's machinery: step one is 0.5 with a frozen-copy reference (policy = reference:
log-ratios and KL 0), and an interrupted run resumes exactly, also on a log line whose window spans the stop (the
per-side rewards are sums over counts kept in the checkpoint's window)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from pipeline.runtime.log import read_log
from pipeline.train.run import train
from tests.train.helpers import BASE_SFT, WORDS

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")
BASE_KTO = {**BASE_SFT, "stage": "kto", "dataset": "tiny_kto", "max_steps": 3, "val_size": 0.2,
            "per_device_train_batch_size": 3, "gradient_accumulation_steps": 1, "pref_beta": 0.5,
            "warmup_steps": 0}


@pytest.fixture
def kto_recipe(workdir: Path, make_recipe):
    """make_recipe over a registry that also holds an alpaca KTO dataset (LLaMA-Factory's kto_tag entry form)."""
    rng = random.Random(1)
    rows = []
    for i in range(30):
        a, b, c = rng.sample(WORDS, 3)
        rows.append({"instruction": f"Repeat: {a} {b}", "output": f"{a} {b}" if i % 3 else f"{c} ({i})",
                     "tag": bool(i % 3)})
    data = workdir / "data"
    (data / "raw" / "kto.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    registry = json.loads((data / "dataset_info.json").read_text())
    registry["tiny_kto"] = {"file_name": "raw/kto.jsonl", "columns": {"prompt": "instruction", "response": "output",
                                                                      "kto_tag": "tag"}}
    (data / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")

    def make(name: str = "kto", **keys):
        return make_recipe({**BASE_KTO, **keys}, name=name)

    return make


def test_first_step_is_one_half_with_a_frozen_copy_under_zero3(kto_recipe):
    """Full fine-tuning under ZeRO-3: the reference is a frozen copy in a DeepSpeed engine of its own (LoRA's
    adapters-off reference: tests/acceptance/test_kto_cli.py)."""
    result = train(kto_recipe(name="full3", finetuning_type="full", lora_rank=None, lora_target=None, zero_stage=3,
                              max_steps=2, eval_steps=2))
    log = read_log(result.output_dir / "trainer_log.jsonl")
    assert log[0]["loss"] == pytest.approx(0.5, abs=1e-7) and log[0]["kl"] == 0.0
    assert log[0]["rewards/chosen"] == log[0]["rewards/rejected"] == 0.0
    assert log[1]["loss"] < 0.5 and "eval_kl" in log[-1] and "eval_rewards/chosen" in log[-1]


def test_resume_continues_exactly_across_a_log_window(kto_recipe):
    from tests.train.test_checkpoint_resume import straight_and_resumed

    a, b = straight_and_resumed(kto_recipe, max_steps=4, logging_steps=3)
    assert [rec["step"] for rec in b if "loss" in rec] == [3, 4]
    for key in ("loss", *METRICS):
        assert [rec.get(key) for rec in b] == [rec.get(key) for rec in a], key


def test_a_kto_recipe_extending_a_reference_free_dpo_one_keeps_its_reference(tmp_path, monkeypatch):
    """pref_loss is dpo's key: set in a kto recipe it is refused, inherited through extends (a kto variant of an orpo
    recipe) it is ignored, as LLaMA-Factory's KTO trainer ignores it. It was not: build_reference saw a reference-free
    loss and gave KTO no reference (the first step called None), plan counted none and train's ZeRO-3 preflight
    let a LoRA run through that cannot keep its starting embedding."""
    from pipeline.errors import UserError
    from pipeline.model.build import build_model
    from pipeline.recipe import resolve
    from pipeline.recipe.args import preference_args, recipe_args
    from pipeline.recipe.plan import reference_params
    from pipeline.train.preference import AdapterReference, build_reference
    from pipeline.train.run import preflight

    monkeypatch.chdir(tmp_path)
    (tmp_path / "orpo.yaml").write_text("model_name_or_path: tiny\ndataset: x\nmax_steps: 1\nstage: dpo\n"
                                        "pref_loss: orpo\nlora_rank: 2\n", encoding="utf-8")
    (tmp_path / "kto.yaml").write_text("extends: orpo.yaml\nstage: kto\n", encoding="utf-8")
    r = resolve("kto.yaml", [])
    policy = build_model(*recipe_args(r))

    class Engine:
        module = policy

    assert isinstance(build_reference(preference_args(r), recipe_args(r), Engine()), AdapterReference)
    full = resolve("kto.yaml", ["finetuning_type=full"])
    assert reference_params(full, 1000, []) == 1000  # a frozen copy of the policy
    with pytest.raises(UserError, match="kto reference"):
        preflight(resolve("kto.yaml", ["zero_stage=3", "resize_vocab=true"]))
