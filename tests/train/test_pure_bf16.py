"""pure_bf16 in the engine: what DeepSpeed is handed and keeps, and an exact resume.

LLaMA-Factory 0.9.5 under pure_bf16 loads the model in bf16, skips the fp32 upcast of the trainable parameters
(model/adapter.py: "Pure bf16 / BAdam detected, remaining trainable params in half precision"), and transformers'
Trainer steps torch's AdamW on them: its exp_avg / exp_avg_sq are zeros_like(param), bf16. Here that must hold
inside DeepSpeed: no bf16 section (it would keep fp32 masters), the engine's optimizer the client's own AdamW.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.acceptance.harness import write_hf_checkpoint
from tests.train.test_galore import resume_is_exact


def assert_pure(engine) -> None:
    """Every parameter bf16, the engine's optimizer torch's AdamW itself (no DeepSpeed wrapper with fp32 copies),
    and each of its moments bf16, as torch makes them for bf16 parameters."""
    assert not engine.bfloat16_enabled() and not engine.fp16_enabled()
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    assert isinstance(engine.optimizer, torch.optim.AdamW), type(engine.optimizer)
    states = [s for p in engine.module.parameters() if p.requires_grad for s in [engine.optimizer.state[p]]]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)


def test_lora_adapters_train_in_bf16_with_bf16_adam_states(make_recipe, workdir):
    """LoRA's A and B stay bf16 too (LLaMA-Factory does not upcast them under pure_bf16); one step at ZeRO 2, whose
    partition copy is bf16 too (ZeRO 0: the tests below and tests/compat/test_low_rank_examples.py)."""
    from pipeline.train.run import train

    write_hf_checkpoint(workdir / "llama", "llama", small_vocab=True)
    done = train(make_recipe(name="lora", model_name_or_path=str(workdir / "llama"), finetuning_type="lora",
                             pure_bf16=True, zero_stage=2, max_steps=1, cutoff_len=256))
    assert done.exit_code == 0
    assert_pure_zero(done.engine)
    assert any("lora" in n for n, p in done.engine.module.named_parameters() if p.requires_grad)


def assert_pure_zero(engine) -> None:
    """ZeRO 1-2: DeepSpeed's partition copy of the parameters is bf16 (no fp32 master) and the client AdamW's
    moments over it bf16."""
    assert engine.bfloat16_enabled() and engine.bf16_master_weights_and_gradients()
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    assert {t.dtype for t in engine.optimizer.single_partition_of_fp32_groups} == {torch.bfloat16}
    states = list(engine.optimizer.optimizer.state.values())
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.bfloat16 for s in states)


@pytest.mark.slow  # ~15 s a stage: three runs of a tiny Llama, as test_galore.py's resume test
@pytest.mark.parametrize("zero_stage, pure", [(0, assert_pure), (2, assert_pure_zero)])
def test_interrupted_and_resumed_pure_bf16_run_equals_uninterrupted_bitwise(make_recipe, workdir, zero_stage, pure):
    """Full fine-tuning in pure bf16, stopped after step 3 and resumed: the bf16 weights and moments come back from
    the checkpoint exactly (the bf16 weights saved as they are), so steps 4-6 equal the straight run's."""
    pure(resume_is_exact(make_recipe, workdir, pure_bf16=True, zero_stage=zero_stage).engine)


def test_a_deepspeed_json_that_would_keep_fp32_masters_is_refused_at_train_with_the_reason(tmp_path):
    """A deepspeed JSON's stage is only known to train: ZeRO 3 exits 2 there, before output_dir is made, naming the
    JSON; at ZeRO 2 an explicit bf16 section that turns DeepSpeed's fp32 masters back on is refused at its line."""
    from tests.acceptance.harness import write_data, write_recipe
    from tests.train.test_muon import refused

    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          finetuning_type="full", pure_bf16=True, deepspeed="ds.json")
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}}))
    err = refused(["train", str(recipe)], tmp_path)
    assert err.startswith("error: ds.json: zero_optimization.stage is 3 with pure_bf16: true: pure_bf16 does not "
                          "run under ZeRO 3: LLaMA-Factory refuses the two"), err
    assert "set zero_optimization.stage to 2 (or lower) there" in err and not (tmp_path / "saves/r").exists()
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": False}}))
    err = refused(["train", str(recipe)], tmp_path)
    assert ("ds.json:1:46: bf16.enabled: given false, but pure_bf16: true at ZeRO 2 needs true there (the bf16 "
            'section {"enabled": true, "bf16_master_weights_and_grads": true, "bf16_optimizer_states": true}: no '
            'fp32 master copy); set it to "auto" or remove the bf16 section') in err, err


def test_a_gpu_without_bf16_is_refused_with_the_reason_and_a_cpu_is_not(monkeypatch):
    """LLaMA-Factory: "This device does not support `pure_bf16`" (is_torch_bf16_gpu_available); a CPU runs bf16."""
    from pipeline.errors import UserError
    from pipeline.train.run import pure_bf16_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pure_bf16_device()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla V100")
    with pytest.raises(UserError, match=r"pure_bf16: true trains the weights in bfloat16, which this GPU \(Tesla "
                                        r"V100\) does not support \(Ampere or newer has it\); set pure_bf16: false"):
        pure_bf16_device()
