"""The DeepSpeed path reproduces an independent plain-PyTorch loop: losses step by step and final weights."""
from __future__ import annotations

import json
import math

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


def test_moe_router_logits_are_released_after_each_backward(make_recipe, workdir):
    """Under activation checkpointing the backward recomputes each sparse block's forward, which stores its router
    logits again with a graph holding the block's input (tokens x hidden per block): the loop drops them after each
    backward instead of holding them until the next forward. No evaluation here: its forward would consume them and
    hide the difference (failed before: both blocks still held the recompute's logits)."""
    from pipeline.model.moe import sparse_blocks
    from tests.acceptance.test_qwen3_moe_cli import save_pretrained_moe

    save_pretrained_moe(workdir / "moe")
    r = make_recipe(BASE_SFT, model_name_or_path=str(workdir / "moe"), finetuning_type="full", dataset="varied_sft",
                    per_device_train_batch_size=2, max_steps=1, val_size=0, moe_aux_loss_coef=0.5, cutoff_len=256,
                    disable_gradient_checkpointing=False)
    result = train(r)
    assert [b.router_logits for b in sparse_blocks(result.engine.module)] == [None, None]


def test_moe_aux_loss_matches_plain_pytorch(make_recipe, workdir):
    """moe_aux_loss_coef on a Qwen3MoeForCausalLM (save_pretrained, 2 sparse blocks, 4 experts, top-2): each micro-
    batch adds coef x transformers' load_balancing_loss_func over its real tokens (padded rows masked), in full as
    transformers' Trainer adds it; the 2 updates equal the plain loop's (2 micro-batches of rows of different
    lengths), aux_loss is logged, and full fine-tuning moves the router.

    `loss` is what transformers' Trainer logs for a Qwen3MoeForCausalLM with router_aux_loss_coef: each micro-batch's
    model loss under num_items_in_batch (the update's labelled tokens), cross-entropy + coef x aux_loss
    (modeling_qwen3_moe.py's forward), summed over the update (trainer.py:1931 `self._tr_loss += tr_loss_step`,
    training_step leaves the loss undivided under num_items_in_batch, trainer.py:2116-2119) and divided by the
    steps (trainer.py:2262): step 1's, on the saved weights, is taken from transformers' model itself. eval_loss is
    the val split's cross-entropy + coef x its batches' aux losses averaged by rows, as transformers' evaluation
    averages each batch's model loss."""
    from pipeline.data.loaders import make_loader
    from pipeline.recipe.args import data_args
    from transformers import Qwen3MoeForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

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
    theirs = Qwen3MoeForCausalLM.from_pretrained(workdir / "moe", output_router_logits=True,
                                                 router_aux_loss_coef=0.5).eval()
    first = [b for b, _ in zip(reference.batches(r), range(r["gradient_accumulation_steps"]))]
    # our labels are shifted already: transformers' shift_labels (ForCausalLMLoss uses them as given; the Trainer
    # counts num_items_in_batch over them, trainer.py's _get_num_items_in_batch)
    labelled = sum(int((b["labels"] != -100).sum()) for b in first)
    with torch.no_grad():
        logged = sum(float(theirs(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                                  shift_labels=b["labels"], num_items_in_batch=labelled).loss) for b in first)
    assert log[0]["loss"] == pytest.approx(logged, rel=1e-5)
    cross_entropy = rows = aux = 0.0  # eval_loss on the trained weights (the plain loop's): as evaluate documents
    labels = 0
    with torch.no_grad():
        for b in make_loader(data_args(r), "val", rank=0, world_size=1, shuffle=False):
            loss_sum, _ = ref_model.eval()(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                                           reduction="sum")
            cross_entropy += float(loss_sum)
            labels += int((b["labels"] != -100).sum())
            blocks = [m for m in ref_model.modules() if getattr(m, "router_logits", None) is not None]
            aux += len(b["input_ids"]) * float(load_balancing_loss_func(
                tuple(m.router_logits for m in blocks), 4, blocks[0].top_k, b["attention_mask"]))
            rows += len(b["input_ids"])
    assert log[-1]["eval_aux_loss"] == pytest.approx(aux / rows, rel=1e-5)
    assert log[-1]["eval_loss"] == pytest.approx(cross_entropy / labels + 0.5 * aux / rows, rel=1e-5)
    assert log[-1]["eval_perplexity"] == pytest.approx(math.exp(cross_entropy / labels), rel=1e-5)
    ref_model.train()
    ours = trained_params(result.engine)
    start = dict(reference.train(r, 0)[2].named_parameters())
    for name, p in ref_model.named_parameters():
        assert torch.allclose(ours[name], p.detach(), rtol=1e-4, atol=1e-6), name
    assert not torch.equal(ours["layers.0.mlp.gate.weight"], start["layers.0.mlp.gate.weight"])
    plain, _, without = reference.train({**r, "moe_aux_loss_coef": None}, 2)  # and the aux loss changed the update
    assert log[0]["loss"] > plain[0] + 2 * 0.5  # coef x aux (>= 1) per micro-batch: in the logged loss
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
