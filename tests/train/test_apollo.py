"""use_apollo: LLaMA-Factory 0.9.5's APOLLO groups and apollo_torch 1.0.3's APOLLOAdamW step (pipeline.train.apollo).

Goldens: LLaMA-Factory's groups (`_create_apollo_optimizer`: GaLore's rule, tests/train/test_galore.py lf_groups, on
transformers' own model) and apollo_torch's update re-written below from its source (apollo_torch 1.0.3, apollo.py
and random_projector.py, line numbers quoted) as APOLLOReference, with GaLore's SVD projector (svd_projector.py is
galore_projector.py with type hints) from test_galore.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.model.weights import load_model
from pipeline.recipe.args import train_args
from pipeline.train.apollo import APOLLOAdamW
from pipeline.train.optim import describe, make_optimizer, train_groups
from tests.train.test_galore import (ProjectorReference, hf_names, lf_groups, reference_adam, reference_apply,
                                     resume_is_exact)

LR, DECAY, BETAS, EPS = 1e-2, 0.1, (0.9, 0.95), 1e-6


def stable_randn(shape, seed, device, dtype):  # random_projector.py:16-39
    generator = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def next_seed(seed, adv=0xF):  # random_projector.py:42-56
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, torch.iinfo(torch.int64).max, (adv,), generator=generator).tolist()[-1]


class RandomProjectorReference:
    """random_projector.py:59-174 (GradientProjector) for std, left and right."""

    def __init__(self, rank, update_proj_gap, scale, proj_type, seed):
        self.rank, self.update_proj_gap, self.scale, self.proj_type, self.seed = rank, update_proj_gap, scale, \
            proj_type, seed
        self.ortho_matrix = None

    def project(self, g, it):  # lines 97-137
        kind = ("right" if g.shape[0] >= g.shape[1] else "left") if self.proj_type == "std" else self.proj_type
        if self.ortho_matrix is None or it % self.update_proj_gap == 0:
            matrix = g.data.float()  # lines 152-170
            shape = (matrix.shape[0], self.rank) if kind == "left" else (self.rank, matrix.shape[1])
            self.ortho_matrix = (stable_randn(shape, self.seed, matrix.device, matrix.dtype)
                                 / math.sqrt(self.rank)).type(g.dtype)
            self.seed = next_seed(self.seed)  # line 95
        return torch.matmul(g, self.ortho_matrix.t()) if kind == "right" else torch.matmul(self.ortho_matrix.t(), g)


class APOLLOReference:
    """apollo.py:44-219 (AdamW: correct_bias, scale_front False, disable_nl False) over LLaMA-Factory's groups."""

    def __init__(self, groups, lr, betas, eps):
        self.groups = [{"lr": lr, "betas": betas, "eps": eps, **g} for g in groups]
        self.state = {}
        idx = 0
        for group in self.groups:  # lines 78-83: the seed is the 1-based position among all parameters
            for p in group["params"]:
                idx += 1
                self.state[id(p)] = {"seed": idx}

    @torch.no_grad()
    def step(self):
        for group in self.groups:
            for p in group["params"]:
                grad, state = p.grad, self.state[id(p)]
                if "step" not in state:
                    state["step"] = 0
                if "rank" in group:  # lines 131-135
                    norm_dim = 0 if grad.shape[0] < grad.shape[1] else 1
                    if "projector" not in state:
                        state["projector"] = (
                            RandomProjectorReference(group["rank"], group["update_proj_gap"], group["scale"],
                                                     group["proj_type"], state["seed"]) if group["proj"] == "random"
                            else ProjectorReference(group["rank"], group["update_proj_gap"], group["scale"],
                                                    group["proj_type"]))
                    grad = state["projector"].project(grad, state["step"])
                norm_grad, step_size = reference_adam(group, state, grad)
                if "rank" in group:  # lines 166-204
                    if group["scale_type"] == "channel":
                        factor = torch.norm(norm_grad, dim=norm_dim) / (torch.norm(grad, dim=norm_dim) + 1e-8)
                        if norm_dim == 1:
                            factor = factor.unsqueeze(1)
                    else:
                        factor = torch.norm(norm_grad) / (torch.norm(grad) + 1e-8)
                    scaled_grad = p.grad * factor
                    if "scaled_grad" in state:
                        scaled_grad_norm = torch.norm(scaled_grad)
                        limiter = max(scaled_grad_norm / (state["scaled_grad"] + 1e-8), 1.01) / 1.01
                        scaled_grad = scaled_grad / limiter
                        state["scaled_grad"] = scaled_grad_norm / limiter
                    else:
                        state["scaled_grad"] = torch.norm(scaled_grad)
                    norm_grad = scaled_grad
                    norm_grad *= np.sqrt(group["scale"])
                reference_apply(p, norm_grad, step_size, group)


def tensors(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6,), (9,), (12, 6), (5, 9), (7, 7)]  # no decay, decay, three APOLLO matrices (seeds 3, 4, 5)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]


@pytest.mark.parametrize("proj, scale_type", [("random", "channel"), ("random", "tensor"), ("svd", "channel")])
def test_three_steps_equal_apollo_torchs_bitwise(proj, scale_type):
    """Steps 1 and 3 take a new projection (apollo_update_interval 2; a random one from the advanced seed), step 2
    reuses it; the limiter acts from step 2 (gradients that grow 5x a step)."""
    ours, theirs = tensors(0), tensors(0)
    split = {"rank": 3, "proj": proj, "proj_type": "std", "update_proj_gap": 2, "scale": 32.0,
             "scale_type": scale_type}

    def groups(params, low_rank=False):
        marks = [{"low_rank": False}, {"low_rank": False}, {"low_rank": True}] if low_rank else [{}, {}, {}]
        return [{"params": params[:1], "weight_decay": 0.0, **marks[0]},
                {"params": params[1:2], "weight_decay": DECAY, **marks[1]},
                {"params": params[2:], "weight_decay": DECAY, **split, **marks[2]}]

    optimizer = APOLLOAdamW(groups(ours, True), lr=LR, betas=BETAS, eps=EPS)
    reference = APOLLOReference(groups(theirs), LR, BETAS, EPS)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen) * 1e-2 * 5 ** step
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
        for k, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), (proj, scale_type, step, k)
    if proj == "random":
        assert [optimizer.state[p]["seed"] for p in ours[2:]] == [next_seed(next_seed(s)) for s in (3, 4, 5)]


def test_layerwise_seeds_start_at_one_as_llamafactorys_per_parameter_optimizers():
    ours, theirs = tensors(0), tensors(0)
    split = {"rank": 3, "proj": "random", "proj_type": "std", "update_proj_gap": 2, "scale": 32.0,
             "scale_type": "channel"}
    optimizer = APOLLOAdamW([{"params": ours[2:], "weight_decay": 0.0, "low_rank": True, **split}], lr=LR,
                            betas=BETAS, eps=EPS, layerwise=True)
    references = [APOLLOReference([{"params": [p], "weight_decay": 0.0, **split}], LR, BETAS, EPS) for p in theirs[2:]]
    for a, b in zip(ours[2:], theirs[2:]):
        a.grad = torch.full(a.shape, 1e-2)
        b.grad = a.grad.clone()
    optimizer.step()
    for reference in references:
        reference.step()
    assert all(torch.equal(a, b) for a, b in zip(ours[2:], theirs[2:]))


def args(**keys):
    return train_args({"learning_rate": LR, "weight_decay": DECAY, "use_apollo": True, "adam_beta1": BETAS[0],
                       "adam_beta2": BETAS[1], "adam_epsilon": EPS, "apollo_rank": 4, **keys})


def test_groups_are_llamafactorys_and_the_optimizer_is_apollo_only_when_asked(checkpoints):
    path, hf = checkpoints["qwen2"]
    model = load_model(path)
    groups = train_groups(model, args())
    assert [sorted(hf_names(model, g)) for g in groups] == [sorted(n) for n in lf_groups(hf, DECAY) if n]
    assert describe(groups).endswith("6 tensors by AdamW at lr 0.01, weight decay 0.1 | 14 tensors by APOLLO (rank 4, "
                                     "random std, channel, every 200 steps) at lr 0.01, weight decay 0.1"), describe(groups)
    assert isinstance(make_optimizer(model, args()), APOLLOAdamW)
    assert isinstance(make_optimizer(model, args(use_apollo=False)), torch.optim.AdamW)


@pytest.mark.slow  # ~13 s: three runs of a tiny Llama (tests/train/test_checkpoint_resume.py covers the machinery)
def test_interrupted_and_resumed_apollo_run_equals_uninterrupted_bitwise(make_recipe, workdir):
    """A new random projection every 2 steps: the stop after step 3 (which drew one from the advanced seed) and
    step 4 reuses it; seeds, limiter norms and moments come back from the checkpoint."""
    resume_is_exact(make_recipe, workdir, use_apollo=True, apollo_rank=2, apollo_update_interval=2)


def test_apollo_beside_galore_and_channel_scaling_on_a_fixed_side_are_refused_where_the_recipe_says_so(tmp_path):
    """LLaMA-Factory refuses GaLore and APOLLO together, and stops mid-run on a shape mismatch where channel-wise
    scaling meets a left / right projection; apollo_scale_front, which it never reads, prints a notice."""
    from tests.acceptance.harness import write_data, write_recipe
    from tests.reliability.rel_helpers import run_main
    from tests.train.test_muon import refused

    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          finetuning_type="full", use_apollo=True, use_galore=True, apollo_proj_type="left")
    lines = recipe.read_text().splitlines()
    at = {key: f"r.yaml:{next(i for i, line in enumerate(lines, 1) if line.startswith(key + ':'))}:"
          for key in ("use_galore", "apollo_proj_type")}
    err = refused(["validate", str(recipe)], tmp_path)
    assert (f"{at['use_galore']}13: use_galore: given true with use_apollo: true: GaLore and APOLLO are two "
            "optimizers") in err, err
    assert (f"{at['apollo_proj_type']}19: apollo_proj_type: given 'left' with apollo_scale_type: channel") in err, err
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          finetuning_type="full", use_apollo=True, apollo_scale_front=True,
                          apollo_target="lm_head")  # the tiny GPT-2's one nn.Linear (its projections are Conv1D)
    err = run_main(["validate", str(recipe)], tmp_path).err
    assert "apollo_scale_front: accepted without effect: LLaMA-Factory passes it in APOLLO's parameter group" in err
