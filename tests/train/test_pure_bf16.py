"""pure_bf16 in the engine: what DeepSpeed is handed and keeps, and an exact resume; a LoRA / OFT adapter in fp32.

LLaMA-Factory 0.9.5 under pure_bf16 loads the model in bf16, skips the fp32 upcast of the trainable parameters
(model/adapter.py: "Pure bf16 / BAdam detected, remaining trainable params in half precision"), and transformers'
Trainer steps torch's AdamW on them: its exp_avg / exp_avg_sq are zeros_like(param), bf16. Here that must hold
inside DeepSpeed: no bf16 section (it would keep fp32 masters), the engine's optimizer the client's own AdamW.

A LoRA / OFT adapter is the exception: LLaMA-Factory calls get_peft_model without autocast_adapter_dtype, so PEFT
(0.18+, its default True) upcasts the new adapter's weights to fp32 (tuners_utils.cast_adapter_dtype: the LoRA / OFT
layers' own ModuleDicts and ParameterDicts, not modules_to_save), and its forward casts the bf16 input to them and the
sum back. So the adapter trains in fp32 with fp32 Adam states on the frozen bf16 base; additional_target modules stay
bf16. Golden: PEFT itself (get_peft_model on bf16 layers and on transformers' Llama loaded in bf16,
PeftModel.from_pretrained of our adapter/).
"""
from __future__ import annotations

import copy
import json
from typing import Any

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


def test_lora_adapters_train_in_fp32_on_the_bf16_base_and_additional_targets_in_bf16(make_recipe, workdir):
    """One step at ZeRO 2: LoRA's A and B are fp32 (PEFT's upcast), the base and the additional_target norm bf16;
    DeepSpeed's bf16 section is off (it would cast the adapter to bf16), so its partition copy and the AdamW
    moments are fp32, as LLaMA-Factory's DeepSpeed (bf16 off there too) keeps them. adapter/ holds A and B in fp32,
    with values no bf16 holds (they trained in fp32), and the norm in bf16, as PEFT's save_pretrained writes its
    modules_to_save (ZeRO 0: test_adapter_layers_compute_and_step_as_peft_on_a_bf16_base and
    tests/acceptance/test_pure_bf16_outputs_cli.py)."""
    from safetensors.torch import load_file

    from pipeline.train.run import train

    write_hf_checkpoint(workdir / "llama", "llama", small_vocab=True)
    done = train(make_recipe(name="lora", model_name_or_path=str(workdir / "llama"), finetuning_type="lora",
                             pure_bf16=True, zero_stage=2, max_steps=1, cutoff_len=256, additional_target="norm",
                             warmup_steps=0, val_size=0))
    assert done.exit_code == 0
    engine = done.engine
    assert not engine.bfloat16_enabled() and not engine.fp16_enabled()
    trained = {n: p.dtype for n, p in engine.module.named_parameters() if p.requires_grad}
    assert {d for n, d in trained.items() if ".lora." in n} == {torch.float32}
    assert {d for n, d in trained.items() if ".lora." not in n} == {torch.bfloat16} and "norm.weight" in trained
    assert {p.dtype for n, p in engine.module.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {t.dtype for t in engine.optimizer.single_partition_of_fp32_groups} == {torch.float32}
    states = list(engine.optimizer.optimizer.state.values())
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)
    written = load_file(str(workdir / "saves/lora/adapter/adapter_model.safetensors"))
    lora = {k: v for k, v in written.items() if ".lora_" in k}
    assert lora and {v.dtype for v in lora.values()} == {torch.float32}
    assert any(not torch.equal(v, v.bfloat16().float()) for v in lora.values())  # not bf16 values
    assert {v.dtype for k, v in written.items() if ".lora_" not in k} == {torch.bfloat16}


def peft_pair(kind: str, **settings: Any) -> tuple[Any, Any, list[Any], list[Any]]:
    """(ours, PEFT's, our adapter tensors, PEFT's in the same order and layout): one bf16 nn.Linear wrapped by our
    LoRA / DoRA / OFT (pipeline.model.lora / oft, as apply_lora wraps) and by PEFT's get_peft_model with the same
    settings (autocast_adapter_dtype left at its default, as LLaMA-Factory calls it), PEFT's adapter set to our
    starting values, B / the rotation drawn first (a fresh one changes nothing). PiSSA (init_lora_weights "pissa"):
    each side starts from its own SVD, and the starts must agree bit for bit, the residual base too."""
    import peft
    from torch import nn

    from pipeline.model.lora import PISSA_EXACT, init_pissa, replace_linear_with_lora
    from pipeline.model.oft import replace_linear_with_oft

    torch.manual_seed(0)
    base = nn.Linear(32, 24, bias=False).to(torch.bfloat16)
    ours, theirs = nn.Sequential(copy.deepcopy(base)), nn.Sequential(copy.deepcopy(base))
    if kind == "oft":
        replace_linear_with_oft(ours, block_size=8)
        theirs = peft.get_peft_model(theirs, peft.OFTConfig(target_modules=["0"], r=0, oft_block_size=8))
        mine, layer = [ours[0].oft.weight], theirs.base_model.model[0]
        gold = [layer.oft_R["default"].weight]
    else:
        replace_linear_with_lora(ours, 4, settings.get("alpha", 8.0), use_dora=settings.get("use_dora", False),
                                 use_rslora=settings.get("use_rslora", False))
        config = peft.LoraConfig(target_modules=["0"], r=4, lora_alpha=settings.get("alpha", 8.0), **{
            k: v for k, v in settings.items() if k != "alpha"})
        theirs = peft.get_peft_model(theirs, config)
        wrapper, layer = ours[0], theirs.base_model.model[0]
        # PEFT's layout: A^T (r x in), B^T (out x r)
        mine = [wrapper.lora.A.t(), wrapper.lora.B.t()] + ([wrapper.magnitude] if settings.get("use_dora") else [])
        gold = [layer.lora_A["default"].weight, layer.lora_B["default"].weight] + (
            [layer.lora_magnitude_vector["default"].weight] if settings.get("use_dora") else [])
        if settings.get("init_lora_weights") == "pissa":
            init_pissa(ours, PISSA_EXACT)
            assert torch.equal(wrapper.linear.weight, layer.base_layer.weight)
            assert all(torch.equal(value, target) for value, target in zip(mine, gold))
            return ours, theirs, mine, gold
    with torch.no_grad():
        drawn = mine[0 if kind == "oft" else 1]  # the rotation, or B
        drawn.copy_(torch.randn(drawn.shape) * 0.05)
        for value, target in zip(mine, gold):
            target.copy_(value)
    return ours, theirs, mine, gold


@pytest.mark.parametrize("kind, settings", [("lora", {}), ("lora", {"use_dora": True}),
                                            ("lora", {"use_rslora": True, "alpha": 5.0}),
                                            ("lora", {"init_lora_weights": "pissa"}), ("oft", {})])
def test_adapter_layers_compute_and_step_as_peft_on_a_bf16_base(kind, settings):
    """On a bf16 Linear, our adapter holds fp32 weights as PEFT's get_peft_model does, computes PEFT's bf16 output
    bit for bit (the input cast to fp32, the sum cast back), and one torch AdamW step on the same loss gives PEFT's
    fp32 weights: bit for bit for OFT and DoRA's magnitude, within fp32 rounding for A and B (we scale B before the
    product, PEFT after it: its gradients differ in the last bits; a bf16 adapter would be ~1e-3 off). PiSSA's start
    (the pair rounded through bf16, then upcast; the residual from the fp32 pair) is PEFT's bit for bit."""
    ours, theirs, mine, gold = peft_pair(kind, **settings)
    assert {p.dtype for p in mine} == {p.dtype for p in gold} == {torch.float32}
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(1)).bfloat16()
    out, golden = ours(x), theirs(x)
    assert out.dtype == golden.dtype == torch.bfloat16 and torch.equal(out, golden)
    steps = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (ours, theirs)]
    for result, step in zip((out, golden), steps):
        (result.float() ** 2).mean().backward()
        step.step()
    for value, target in zip(mine, gold):
        torch.testing.assert_close(value, target, rtol=1e-6, atol=5e-8)


def test_peft_loads_the_adapter_of_our_bf16_llama_as_we_hold_it(make_recipe, workdir):
    """The model train builds for a pure_bf16 LoRA recipe (a transformers Llama checkpoint): bf16 base, fp32 A and B
    drawn as PEFT draws them (rounded through the base's bf16, then upcast). transformers' Llama loaded in bf16 with
    PEFT's get_peft_model and our weights gives our logits within the bf16 forward's rounding (the layers are bit
    for bit: the test above), and PeftModel.from_pretrained of our saved adapter holds our fp32 tensors exactly and
    gives that model's logits bit for bit."""
    import peft
    import transformers

    from pipeline.model.build import build_model
    from pipeline.model.lora import lora_modules, lora_state_dict, save_adapter
    from pipeline.recipe.args import recipe_args

    write_hf_checkpoint(workdir / "llama", "llama", small_vocab=True)
    r = make_recipe(name="lora", model_name_or_path=str(workdir / "llama"), finetuning_type="lora", pure_bf16=True,
                    lora_rank=4, lora_alpha=8, lora_target="all")
    ours = build_model(*recipe_args(r), dtype=torch.bfloat16).eval()
    adapter = {id(p) for m in lora_modules(ours).values() for p in (m.lora.A, m.lora.B)}
    assert all((p.dtype == torch.float32) == (id(p) in adapter) for p in ours.parameters())
    assert all(torch.equal(m.lora.A, m.lora.A.bfloat16().float()) for m in lora_modules(ours).values())
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora.B.copy_(torch.randn(m.lora.B.shape, generator=torch.Generator().manual_seed(2)) * 0.05)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(
        workdir / "llama", dtype=torch.bfloat16), config).eval()
    assert not peft.set_peft_model_state_dict(theirs, lora_state_dict(ours)).unexpected_keys
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, golden = ours(ids), theirs(input_ids=ids).logits
    assert logits.dtype == golden.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), golden.float(), rtol=0, atol=0.1)  # 3 bf16 steps of |logit| < 8

    save_adapter(ours, workdir / "adapter")
    loaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        workdir / "llama", dtype=torch.bfloat16), workdir / "adapter").eval()
    held = peft.get_peft_model_state_dict(loaded)
    assert held.keys() == lora_state_dict(ours).keys()
    assert all(held[k].dtype == torch.float32 and torch.equal(held[k], v) for k, v in lora_state_dict(ours).items())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, golden)


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


@pytest.mark.slow  # ~25 s: three runs of a tiny Llama, as above
def test_interrupted_and_resumed_pure_bf16_lora_run_equals_uninterrupted_bitwise(make_recipe, workdir):
    """LoRA with an additional_target norm at ZeRO 0: the fp32 adapter, the bf16 norm and their moments come back
    from the checkpoint exactly (measured at ZeRO 2 too)."""
    resumed = resume_is_exact(make_recipe, workdir, pure_bf16=True, finetuning_type="lora", lora_target="all",
                              additional_target="norm").engine
    assert {p.dtype for n, p in resumed.module.named_parameters() if ".lora." in n} == {torch.float32}
    assert resumed.module.get_parameter("norm.weight").dtype == torch.bfloat16


def test_a_deepspeed_json_that_would_keep_fp32_masters_is_refused_at_train_with_the_reason(tmp_path):
    """A deepspeed JSON's stage is only known to train: ZeRO 3 exits 2 there, before output_dir is made, naming the
    JSON; at ZeRO 2 an explicit bf16 section that turns DeepSpeed's fp32 masters back on is refused at its line, and
    for LoRA one that turns DeepSpeed's bf16 on (it would cast the fp32 adapter to bf16)."""
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
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    recipe.write_text(recipe.read_text().replace("finetuning_type: \"full\"", "finetuning_type: \"lora\""))
    err = refused(["train", str(recipe)], tmp_path)
    assert ("ds.json:1:46: bf16.enabled: given true, but pure_bf16: true at ZeRO 2 needs false there (the bf16 "
            'section {"enabled": false}: the adapter trains in fp32 on the bf16 base, as PEFT holds it, and '
            "DeepSpeed's bf16 would cast it); set it to \"auto\" or remove the bf16 section") in err, err


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
