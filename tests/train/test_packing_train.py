"""Packing and gradient checkpointing in real (in-process, DeepSpeed CPU) training runs."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.recipe.args import data_args
from pipeline.data.loaders import count_examples
from pipeline.errors import UserError
from pipeline.train import checkpoint
from pipeline.runtime.log import read_log
from pipeline.train.run import enable_features, train
from tests.train.helpers import BASE_PT, BASE_SFT
from tests.train.test_checkpoint_resume import interrupt_after, tensors

PACKED = dict(BASE_SFT, cutoff_len=128, neat_packing=True, packing=True)


def find_resume(r):
    """The checkpoint a resolved recipe resumes from, as train finds it."""
    return checkpoint.find_resume(r["resume_from_checkpoint"], r["output_dir"],
                                  checkpoint.where(r, "resume_from_checkpoint"))


def _params(result) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in result.engine.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("accumulation", [1, 2])
def test_one_full_batch_step_packed_equals_unpacked(make_recipe, accumulation):
    """All training examples in one optimizer step: the step's loss (mean over trained tokens) and so the
    update are the same whether the examples come padded one per row or neat-packed several per row, and
    whether the packs come in one micro-batch or in two accumulated ones (their trained tokens differ: a mean per
    micro-batch would weigh them differently)."""
    keys = dict(dataset="varied_sft", cutoff_len=128, max_steps=1, warmup_steps=0)  # answers of 1-12 words
    unpacked_r = make_recipe(BASE_SFT, name="unpacked", gradient_accumulation_steps=1, **keys)
    packed_r = make_recipe(PACKED, name="packed", gradient_accumulation_steps=1, **keys)
    n_examples = count_examples(data_args(unpacked_r))["train"]
    n_packs = count_examples(data_args(packed_r))["train"]
    assert n_packs <= n_examples / 2 and n_packs % accumulation == 0
    unpacked = train(make_recipe(BASE_SFT, name="unpacked", gradient_accumulation_steps=1,
                                 per_device_train_batch_size=n_examples, **keys))
    packed = train(make_recipe(PACKED, name="packed", gradient_accumulation_steps=accumulation,
                               per_device_train_batch_size=n_packs // accumulation, **keys))
    log_u = read_log(unpacked.output_dir / "trainer_log.jsonl")[0]
    log_p = read_log(packed.output_dir / "trainer_log.jsonl")[0]
    assert log_p["loss"] == pytest.approx(log_u["loss"], rel=1e-6)
    assert log_p["trained_tokens_seen"] == log_u["trained_tokens_seen"]
    assert log_p["tokens_seen"] == log_u["tokens_seen"]  # real tokens only; padding is not counted
    a, b = _params(unpacked), _params(packed)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-6), name
    results = json.loads((packed.output_dir / "all_results.json").read_text())
    assert results["num_train_examples"] == n_packs


def test_gradient_checkpointing_changes_nothing_and_resume_is_exact(make_recipe, monkeypatch):
    """Packed, dropout on, checkpointing on: equal to the run without checkpointing, and an interrupted
    and resumed run equals the uninterrupted one bitwise (the saved data position is a pack index)."""
    keys = dict(max_steps=4, warmup_steps=1, gradient_accumulation_steps=1, per_device_train_batch_size=2,
                dropout=0.1, lora_dropout=0.1)
    plain = train(make_recipe(PACKED, name="plain", disable_gradient_checkpointing=True, **keys))
    straight = train(make_recipe(PACKED, name="straight", disable_gradient_checkpointing=False, **keys))
    assert straight.engine.module.gradient_checkpointing and not plain.engine.module.gradient_checkpointing
    a, b = _params(plain), _params(straight)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-7), name

    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, 2)
        first = train(make_recipe(PACKED, name="resumed", disable_gradient_checkpointing=False, **keys))
    assert first.exit_code == 143 and first.state.global_step == 2
    state = json.loads((first.output_dir / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["batch_in_epoch"] == 2  # pack batches consumed
    second = train(make_recipe(PACKED, name="resumed", resume_from_checkpoint="latest",
                               disable_gradient_checkpointing=True, **keys))  # checkpointing is no resume key
    assert second.exit_code == 0
    final = "adapter/adapter_model.safetensors"
    x, y = tensors(straight.output_dir / final), tensors(second.output_dir / final)
    assert x.keys() == y.keys() and all(torch.allclose(x[k], y[k], rtol=0, atol=1e-7) for k in x)


def test_resume_refuses_a_changed_packing(make_recipe, monkeypatch):
    keys = dict(max_steps=3, warmup_steps=0, gradient_accumulation_steps=1, per_device_train_batch_size=2)
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, 1)
        train(make_recipe(PACKED, name="r", **keys))
    r = make_recipe(BASE_SFT, name="r", cutoff_len=128, resume_from_checkpoint="latest", **keys)
    with pytest.raises(UserError, match="packing is false but .* was trained with true"):
        checkpoint.check_compatible(r, find_resume(r))


def test_neat_packing_needs_a_model_that_keeps_examples_apart(make_recipe):
    class NoSegments(torch.nn.Module):
        def forward(self, input_ids, *, attention_mask=None, labels=None):
            return input_ids

    with pytest.raises(UserError, match="neat_packing needs an attention path that keeps packed examples apart"):
        enable_features(NoSegments(), make_recipe(PACKED, name="x"))
    enable_features(NoSegments(), make_recipe(dict(PACKED, neat_packing=False), name="y"))  # plain packing: fine


def test_pt_packs_documents_and_refuses_neat_packing(make_recipe):
    r = make_recipe(BASE_PT, name="pt", packing=True)
    assert count_examples(data_args(r)) == count_examples(data_args(make_recipe(BASE_PT, name="pt2")))  # pt always concatenates
    with pytest.raises(UserError, match="neat_packing: given true, but it has no meaning for stage: pt"):
        make_recipe(BASE_PT, name="pt3", neat_packing=True)
