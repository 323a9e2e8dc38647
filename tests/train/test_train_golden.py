"""The DeepSpeed path reproduces an independent plain-PyTorch loop: losses step by step and final weights."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.runtime.log import read_log
from pipeline.train.run import train
from tests.train.helpers import BASE_PT, BASE_SFT
from tests.train import reference


def trained_params(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().float() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("base, keys", [
    (BASE_PT, dict(finetuning_type="full", gradient_accumulation_steps=1, max_grad_norm=1.0, weight_decay=0.01)),
    (BASE_SFT, dict(finetuning_type="lora", gradient_accumulation_steps=2, max_grad_norm=0.0, l1_lambda=1e-4,
                    lr_scheduler_type="linear", min_lr_ratio=0.1)),
    # answers of 1-12 words: the update's loss is over its tokens, not a mean of the micro-batches' means
    (BASE_SFT, dict(finetuning_type="lora", dataset="varied_sft", per_device_train_batch_size=2,
                    gradient_accumulation_steps=3, max_grad_norm=0.0)),
], ids=["pt-full", "sft-lora-l1", "sft-varied-lengths"])
def test_fp32_matches_plain_pytorch(make_recipe, base, keys):
    r = make_recipe(base, max_steps=5, warmup_steps=2, **keys)
    result = train(r)
    assert result.exit_code == 0
    log = read_log(result.output_dir / "trainer_log.jsonl")
    losses, l1s, ref_model = reference.train(r, 5)
    assert [rec["step"] for rec in log] == [1, 2, 3, 4, 5]
    written = json.loads((result.output_dir / "ds_config.json").read_text())  # what DeepSpeed was given
    assert (written["train_micro_batch_size_per_gpu"], written["gradient_accumulation_steps"],
            written["gradient_clipping"]) == (r["per_device_train_batch_size"], keys["gradient_accumulation_steps"],
                                              keys["max_grad_norm"])
    assert "learning_rate: 0.001  #" in (result.output_dir / "resolved.yaml").read_text()
    assert [rec["loss"] for rec in log] == pytest.approx(losses, rel=1e-5)
    if r["l1_lambda"]:
        assert [rec["l1"] for rec in log] == pytest.approx(l1s, rel=1e-5)
    # the run moved the loss, so matching is not vacuous
    assert abs(losses[-1] - losses[0]) > 1e-3
    ours = trained_params(result.engine)
    for name, p in ref_model.named_parameters():
        assert torch.allclose(ours[name], p.detach(), rtol=1e-4, atol=1e-6), name


def test_moe_aux_loss_matches_plain_pytorch(make_recipe, workdir):
    """moe_aux_loss_coef on a Qwen3MoeForCausalLM (save_pretrained, 2 sparse blocks, 4 experts, top-2): each micro-
    batch adds coef x transformers' load_balancing_loss_func over its real tokens (padded rows masked), in full as
    transformers' Trainer adds it; the 2 updates equal the plain loop's (2 micro-batches of rows of different
    lengths), aux_loss is logged, and full fine-tuning moves the router."""
    from tests.acceptance.test_qwen3_moe_cli import save_pretrained_moe

    save_pretrained_moe(workdir / "moe")
    r = make_recipe(BASE_SFT, model_name_or_path=str(workdir / "moe"), finetuning_type="full", dataset="varied_sft",
                    per_device_train_batch_size=2, max_steps=2, warmup_steps=0, learning_rate=1e-2,
                    moe_aux_loss_coef=0.5, cutoff_len=256)
    result = train(r)
    log = read_log(result.output_dir / "trainer_log.jsonl")
    losses, _, ref_model = reference.train(r, 2)
    assert [rec["loss"] for rec in log] == pytest.approx(losses, rel=1e-5)
    assert all(1.0 <= rec["aux_loss"] < 4.0 for rec in log)  # n_experts x sum f_e P_e: 1 when balanced
    ours = trained_params(result.engine)
    start = dict(reference.train(r, 0)[2].named_parameters())
    for name, p in ref_model.named_parameters():
        assert torch.allclose(ours[name], p.detach(), rtol=1e-4, atol=1e-6), name
    assert not torch.equal(ours["layers.0.mlp.gate.weight"], start["layers.0.mlp.gate.weight"])
    without = reference.train({**r, "moe_aux_loss_coef": None}, 2)[2]  # and the aux loss changed the update
    assert not torch.allclose(dict(without.named_parameters())["layers.0.mlp.gate.weight"],
                              ours["layers.0.mlp.gate.weight"], atol=1e-5)


def test_bf16_tracks_fp32_reference(make_recipe):
    r = make_recipe(BASE_SFT, max_steps=4, warmup_steps=0, bf16=True, learning_rate=3e-3)
    result = train(r)
    log = read_log(result.output_dir / "trainer_log.jsonl")
    losses, _, _ = reference.train(r, 4)
    # bf16 compute with fp32 master weights stays within bf16 rounding of the fp32 curve
    assert [rec["loss"] for rec in log] == pytest.approx(losses, rel=2e-2)
    assert all(p.dtype == torch.bfloat16 for p in result.engine.module.parameters())
