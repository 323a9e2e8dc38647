"""What each fine-tuning type trains, clipping, and ZeRO 0/2/3 adapters that are complete and usable."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from pipeline.model.build import build_model
from pipeline.recipe.args import recipe_args
from pipeline.model.lora import ADAPTER_WEIGHTS, load_adapter, lora_modules
from pipeline.model.weights import load_model
from pipeline.train import optim
from pipeline.runtime.log import read_log
from pipeline.train.run import train


def changed(result, r) -> dict[str, bool]:
    """name -> whether training moved the parameter away from a fresh build of the same recipe."""
    fresh = dict(build_model(*recipe_args(r)).named_parameters())
    return {name: not torch.equal(p.detach().float(), fresh[name].detach().float())
            for name, p in result.engine.module.named_parameters()}


def test_lora_trains_only_the_adapters(make_recipe):
    r = make_recipe(max_steps=2, warmup_steps=0)
    moved = changed(train(r), r)
    lora = {n for n in moved if ".lora." in n}
    assert len(lora) == 16  # tiny: 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj) x (A, B)
    assert all(moved[n] for n in lora)
    assert not any(moved[n] for n in moved if n not in lora)


def test_freeze_trains_only_the_last_blocks_and_saves_a_usable_model(make_recipe):
    r = make_recipe(finetuning_type="freeze", freeze_trainable_layers=1, max_steps=3, warmup_steps=0)
    result = train(r)
    moved = changed(result, r)
    trained = {n for n, m in moved.items() if m}
    assert trained == {n for n in moved if n.startswith(("layers.1.", "norm."))}
    assert any(n.startswith("layers.0.") for n in moved) and "embed_tokens.weight" in moved
    # output_dir/model is a model directory the next recipe can start from (model_name_or_path)
    saved = dict(load_model(result.output_dir / "model").named_parameters())
    for name, p in result.engine.module.named_parameters():
        assert torch.equal(saved[name], p.detach()), name


@pytest.mark.parametrize("keys", [dict(), dict(zero_stage=2, bf16=True)], ids=["fp32-zero0", "bf16-zero2"])
def test_clipped_gradient_never_exceeds_max_grad_norm(make_recipe, monkeypatch, keys):
    """The norm of what AdamW actually receives (after DeepSpeed's clipping) stays within max_grad_norm."""
    seen: list[float] = []
    make = optim.make_optimizer

    def recording(model, r):
        opt = make(model, r)

        def before_step(optimizer, args, kwargs):
            grads = [p.grad.float() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            seen.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

        opt.register_step_pre_hook(before_step)
        return opt

    monkeypatch.setattr(optim, "make_optimizer", recording)
    r = make_recipe(max_steps=3, warmup_steps=0, max_grad_norm=0.05, **keys)
    result = train(r)
    pre_clip = [rec["grad_norm"] for rec in read_log(result.output_dir / "trainer_log.jsonl")]
    assert len(seen) == 3 and len(pre_clip) == 3
    assert min(pre_clip) > 0.5  # clipping was active at every step: the check below is not vacuous
    assert all(norm <= 0.05 * (1 + 1e-4) for norm in seen), seen
    assert all(norm > 0.04 for norm in seen)  # clipped to the limit, not to zero


def read_adapter(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def test_zero_stages_0_2_3_save_complete_and_equal_adapters(make_recipe, capsys):
    adapters = {}
    for stage in (0, 2, 3):
        r = make_recipe(name=f"z{stage}", zero_stage=stage, max_steps=2, warmup_steps=0, save_steps=2)
        result = train(r)
        # one rank: ZeRO 3 says what it costs there, the others say nothing of it
        assert ("zero_stage 3 on one rank" in capsys.readouterr().err) == (stage == 3)
        for where in (result.output_dir / "adapter", result.output_dir / "checkpoint-2" / "adapter"):
            tensors = read_adapter(where)
            assert len(tensors) == 16
            assert all(t.numel() > 0 for t in tensors.values())  # not the empty ZeRO-3 shards
            assert tensors["base_model.model.transformer.h.1.mlp.c_fc.lora_A.weight"].shape == (4, 64)
            assert tensors["base_model.model.transformer.h.1.mlp.c_fc.lora_B.weight"].shape == (256, 4)
            assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained (B starts at 0)
        # usable: loads into a fresh base and changes its output
        model = load_model("tiny", seed=r["seed"]).eval()
        ids = torch.tensor([[464, 3290, 318, 257]])
        before = model(ids)
        load_adapter(model, result.output_dir / "adapter")
        assert len(lora_modules(model)) == 8
        assert not torch.allclose(model(ids), before)
        adapters[stage] = read_adapter(result.output_dir / "adapter")
    # ZeRO only partitions the work: the three runs trained the same adapter (fp32)
    for stage in (2, 3):
        for key, value in adapters[0].items():
            assert torch.allclose(adapters[stage][key], value, rtol=1e-4, atol=1e-6), (stage, key)


def test_bf16_adapter_is_saved_from_fp32_master_weights(make_recipe):
    r = make_recipe(bf16=True, zero_stage=2, max_steps=2, warmup_steps=0)
    result = train(r)
    tensors = read_adapter(result.output_dir / "adapter")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    # the fp32 masters carry bits a bf16 copy cannot hold
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in tensors.values())
