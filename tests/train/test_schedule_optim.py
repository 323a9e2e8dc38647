"""Schedules at hand-computed steps; AdamW groups: decay on matrices only."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch

from pipeline.recipe.args import train_args
from pipeline.train.optim import make_optimizer, param_groups
from pipeline.train.schedule import lr_factor, make_scheduler


@pytest.mark.parametrize("kind, total, warmup, floor, expected", [
    # warmup rises linearly from 0: step k of w uses k / w
    ("constant", 10, 4, 0.0, {0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75, 4: 1.0, 9: 1.0}),
    # linear: 1 - (step - warmup) / (total - warmup) after warmup
    ("linear", 10, 2, 0.0, {1: 0.5, 2: 1.0, 4: 0.75, 6: 0.5, 8: 0.25, 10: 0.0, 12: 0.0}),
    # the floor rescales the decay into [0.2, 1]: 0.2 + 0.8 * 0.5 = 0.6 halfway
    ("linear", 10, 2, 0.2, {2: 1.0, 6: 0.6, 10: 0.2}),
    # cosine: (1 + cos(pi t)) / 2; t = 1/4 -> (1 + 0.70710678) / 2 = 0.85355339; with floor 0.1: 0.1 + 0.9 * that
    ("cosine", 4, 0, 0.1, {0: 1.0, 1: 0.86819805, 2: 0.55, 3: 0.23180195, 4: 0.1}),
    ("cosine", 12, 2, 0.0, {0: 0.0, 1: 0.5, 2: 1.0, 7: 0.5, 12: 0.0}),
])
def test_lr_factor_at_known_steps(kind, total, warmup, floor, expected):
    for step, value in expected.items():
        assert lr_factor(step, kind=kind, total_steps=total, warmup_steps=warmup, min_lr_ratio=floor) == \
            pytest.approx(value, abs=1e-8), (kind, step)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown lr_scheduler_type 'poly'"):
        lr_factor(0, kind="poly", total_steps=10)


def recipe(**keys):
    base = dict(learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6,
                lr_scheduler_type="cosine", total_steps=6, num_warmup_steps=2, min_lr_ratio=0.0)
    return train_args({**base, **keys})


def test_scheduler_drives_the_optimizer_lr_step_by_step():
    model = torch.nn.Linear(3, 2)
    r = recipe()
    optimizer = make_optimizer(model, r)
    scheduler = make_scheduler(optimizer, r)
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warmup 0, 0.5 then cosine over 4 steps: 1, (1 + cos(pi/4)) / 2, 0.5, (1 - cos(pi/4)) / 2
    c = math.cos(math.pi / 4)
    assert seen == pytest.approx([0.0, 5e-4, 1e-3, 1e-3 * (1 + c) / 2, 5e-4, 1e-3 * (1 - c) / 2])


def test_adamw_decays_matrices_only_and_skips_frozen_weights():
    # named as in our models (transformers' rule is by name: pipeline.train.decay.NO_DECAY)
    model = torch.nn.Sequential(OrderedDict(embed=torch.nn.Embedding(5, 4), up=torch.nn.Linear(4, 4),
                                            norm=torch.nn.LayerNorm(4), head=torch.nn.Linear(4, 2)))
    model.head.requires_grad_(False)
    groups = param_groups(model.named_parameters(), 0.1)
    assert [len(g["params"]) for g in groups] == [2, 3]  # embedding + linear weight | linear bias, norm gain, bias
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in groups[0]["params"]) and all(p.dim() == 1 for p in groups[1]["params"])
    optimizer = make_optimizer(model, recipe())
    assert optimizer.defaults["betas"] == (0.8, 0.95) and optimizer.defaults["eps"] == 1e-6
    assert sum(len(g["params"]) for g in optimizer.param_groups) == 5


def test_adamw_is_fused_on_cpu_and_steps_as_the_per_tensor_loop():
    """One fused op for all tensors (torch's per-tensor default opens ~10 small parallel ops per tensor per step);
    the update equals torch's per-tensor AdamW to float rounding."""
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 4)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = make_optimizer(models[0], recipe())
    assert all(g["fused"] for g in fused.param_groups)
    loop = torch.optim.AdamW(param_groups(models[1].named_parameters(), 0.1), lr=1e-3, betas=(0.8, 0.95), eps=1e-6,
                             foreach=False)
    x = torch.randn(5, 8)
    for _ in range(3):
        for model, opt in zip(models, (fused, loop)):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("precision", [{"bf16": True}, {"bf16": False}])
def test_adamw_counts_the_runs_updates_only_under_deepspeeds_zero0_wrapper(make_recipe, precision):
    """DeepSpeed's bf16 / fp16 wrapper at ZeRO 0 steps the client optimizer once with zero gradients as it starts
    (FP16_UnfusedOptimizer.initialize_optimizer_states): AdamW would count it, its bias correction one step behind
    for the whole run (the first update ~0.74x AdamW's), and every weight decayed once before training
    (pipeline.train.optim.no_startup_step). By hand: two updates, AdamW's step 2, and under bf16 the fp32 masters
    start equal to the bf16 weights the model was built with."""
    from pipeline.train.run import train

    done = train(make_recipe(name="startup", zero_stage=0, max_steps=2, weight_decay=0.1, **precision))
    assert done.exit_code == 0
    adamw = getattr(done.engine.optimizer, "optimizer", done.engine.optimizer)  # the wrapper's client optimizer
    assert isinstance(adamw, torch.optim.AdamW) and adamw.state
    assert {float(s["step"]) for s in adamw.state.values()} == {2.0}
