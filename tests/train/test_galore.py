"""use_galore: LLaMA-Factory 0.9.5's GaLore groups and galore_torch 1.0's GaLoreAdamW step (pipeline.train.galore).

Goldens: LLaMA-Factory's parameter rule (`_create_galore_optimizer` and `find_all_linear_modules`, train/
trainer_utils.py and model/model_utils/misc.py; decay by its `_get_decay_parameter_names`, i.e. transformers'
get_parameter_names over ALL_LAYERNORM_LAYERS without "bias") applied to transformers' own model of the same
checkpoint, and galore_torch's update re-written below from its source (galore_torch 1.0, adamw.py and
galore_projector.py, line numbers quoted) as GaLoreReference, with its GaLoreProjector as ProjectorReference.
"""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from pipeline.model.lora import family_of_model
from pipeline.model.weights import load_model
from pipeline.recipe.args import train_args
from pipeline.train.galore import GaLoreAdamW
from pipeline.train.optim import describe, make_optimizer, train_groups
from tests.acceptance.harness import write_hf_checkpoint
from tests.train.test_muon import refused, refused_with_a_deepspeed_json

LR, DECAY, BETAS, EPS = 1e-2, 0.1, (0.9, 0.95), 1e-6


class ProjectorReference:
    """galore_torch/galore_projector.py:3-107 (GaLoreProjector), verbatim in its branches and its call order."""

    def __init__(self, rank, update_proj_gap=200, scale=1.0, proj_type="std"):
        self.rank, self.update_proj_gap, self.scale, self.proj_type = rank, update_proj_gap, scale, proj_type
        self.ortho_matrix = None

    def _due(self, it):
        return self.ortho_matrix is None or it % self.update_proj_gap == 0  # lines 16, 20, 25, 29, 33, 37, 41

    def project(self, g, it):  # lines 12-45
        tall = g.shape[0] >= g.shape[1]
        kind = {"std": "right" if tall else "left", "reverse_std": "left" if tall else "right"}.get(self.proj_type,
                                                                                                   self.proj_type)
        if self._due(it):
            self.ortho_matrix = self.get_orthogonal_matrix(g, self.rank, kind)
        if kind == "right":
            return torch.matmul(g, self.ortho_matrix.t())
        if kind == "left":
            return torch.matmul(self.ortho_matrix.t(), g)
        return torch.matmul(self.ortho_matrix[0].t(), g) @ self.ortho_matrix[1].t()

    def project_back(self, low):  # lines 47-67: std and reverse_std decide by the low-rank shape
        if self.proj_type == "std":
            full = (torch.matmul(low, self.ortho_matrix) if low.shape[0] >= low.shape[1]
                    else torch.matmul(self.ortho_matrix, low))
        elif self.proj_type == "reverse_std":
            full = (torch.matmul(self.ortho_matrix, low) if low.shape[0] <= low.shape[1]
                    else torch.matmul(low, self.ortho_matrix))
        elif self.proj_type == "right":
            full = torch.matmul(low, self.ortho_matrix)
        elif self.proj_type == "left":
            full = torch.matmul(self.ortho_matrix, low)
        else:
            full = torch.matmul(self.ortho_matrix[0], low) @ self.ortho_matrix[1]
        return full * self.scale

    @staticmethod
    def get_orthogonal_matrix(weights, rank, kind):  # lines 71-107
        dtype = weights.data.dtype
        matrix = weights.data.float() if dtype != torch.float else weights.data
        U, s, Vh = torch.linalg.svd(matrix, full_matrices=False)  # line 83
        if kind == "right":
            return Vh[:rank, :].type(dtype)
        if kind == "left":
            return U[:, :rank].type(dtype)
        return [U[:, :rank].type(dtype), Vh[:rank, :].type(dtype)]


def reference_adam(group, state, grad):
    """galore_torch/adamw.py:98-123 (apollo_torch apollo.py:137-163 is the same): the moments of `grad` (the
    projected gradient where there is a projection), m / (sqrt(v) + eps) and the bias-corrected step size."""
    if "exp_avg" not in state:
        state["exp_avg"] = torch.zeros_like(grad)
        state["exp_avg_sq"] = torch.zeros_like(grad)
    exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
    beta1, beta2 = group["betas"]
    state["step"] += 1
    exp_avg.mul_(beta1).add_(grad, alpha=(1.0 - beta1))
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().add_(group["eps"])
    step_size = group["lr"] * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
    return exp_avg / denom, step_size


def reference_apply(p, norm_grad, step_size, group):
    """galore_torch/adamw.py:129-140 (apollo.py:206-217): the step, then the decay on the updated weight."""
    p.add_(norm_grad, alpha=-step_size)
    if group["weight_decay"] > 0.0:
        p.add_(p, alpha=(-group["lr"] * group["weight_decay"]))


class GaLoreReference:
    """galore_torch/adamw.py:78-140 (AdamW.step, correct_bias True) over LLaMA-Factory's three groups."""

    def __init__(self, groups, lr, betas, eps):
        self.groups = [{"lr": lr, "betas": betas, "eps": eps, **g} for g in groups]
        self.state = {}

    @torch.no_grad()
    def step(self):
        for group in self.groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state.setdefault(id(p), {})
                if "step" not in state:
                    state["step"] = 0
                if "rank" in group:  # lines 92-96
                    if "projector" not in state:
                        state["projector"] = ProjectorReference(group["rank"], group["update_proj_gap"],
                                                                group["scale"], group["proj_type"])
                    grad = state["projector"].project(grad, state["step"])
                norm_grad, step_size = reference_adam(group, state, grad)
                if "rank" in group:  # lines 126-127
                    norm_grad = state["projector"].project_back(norm_grad)
                reference_apply(p, norm_grad, step_size, group)


def lf_groups(hf, weight_decay, targets="all", rank=4, gap=2, scale=2.0, proj_type="std"):
    """LLaMA-Factory's `_create_galore_optimizer` groups over transformers' model (names, not tensors: the
    caller maps them): [no decay, decay, GaLore]."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    if targets == "all":  # find_all_linear_modules (misc.py:28-52)
        words = {n.split(".")[-1] for n, m in hf.named_modules()
                 if "lm_head" not in n and "Linear" in type(m).__name__ and "Embedding" not in type(m).__name__}
    else:
        words = [t.strip() for t in targets.split(",")]
    galore = {f"{n}.{pn}" for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and any(t in n for t in words)
              for pn, p in m.named_parameters(recurse=False) if p.requires_grad and p.ndim > 1}
    decay = {n for n in get_parameter_names(hf, ALL_LAYERNORM_LAYERS) if "bias" not in n}
    names = [n for n, p in hf.named_parameters() if p.requires_grad]
    return ([n for n in names if n not in galore and n not in decay], [n for n in names if n not in galore and n in decay],
            [n for n in names if n in galore])


def args(**keys):
    return train_args({"learning_rate": LR, "weight_decay": DECAY, "use_galore": True, "adam_beta1": BETAS[0],
                       "adam_beta2": BETAS[1], "adam_epsilon": EPS, "galore_rank": 4, "galore_update_interval": 2,
                       **keys})


def hf_names(model, group) -> list[str]:
    to_hf = family_of_model(model).to_hf
    ids = {id(p) for p in group["params"]}
    return [to_hf(n) for n, p in model.named_parameters() if id(p) in ids]


@pytest.mark.parametrize("target", ["all", "mlp", "q_proj,v_proj"])
def test_groups_are_llamafactorys_over_transformers_names(checkpoints, target):
    """Every Linear but lm_head (q/k/v/o, gate/up/down) with `all`; a word matches inside the module name; Qwen2's
    q/k/v biases are not decayed, the tied embedding and the RMSNorm gains are (transformers' RMSNorm is no
    nn.LayerNorm), as in LLaMA-Factory."""
    path, hf = checkpoints["qwen2"]
    model = load_model(path)
    groups = train_groups(model, args(galore_target=target))
    want = [names for names in lf_groups(hf, DECAY, target) if names]
    assert [sorted(hf_names(model, g)) for g in groups] == [sorted(n) for n in want]
    assert [g["low_rank"] for g in groups] == [False] * (len(groups) - 1) + [True]
    assert [g["weight_decay"] for g in groups[-2:]] == [DECAY, DECAY]
    assert groups[-1]["rank"] == 4 and groups[-1]["update_proj_gap"] == 2 and groups[-1]["proj_type"] == "std"
    if target == "all":
        assert len(groups[-1]["params"]) == 14 and "model.norm.weight" in hf_names(model, groups[-2])
        assert describe(groups).startswith("6 tensors by AdamW at lr 0.01, weight decay 0 | 6 tensors by AdamW at lr "
                                           "0.01, weight decay 0.1 | 14 tensors by GaLore (rank 4, std, every 2 "
                                           "steps)"), describe(groups)
        assert isinstance(make_optimizer(model, args()), GaLoreAdamW)
        assert isinstance(make_optimizer(model, args(use_galore=False)), torch.optim.AdamW)


def test_gpt2s_conv1d_projections_are_no_linear_for_galore_so_it_is_refused(checkpoints):
    """LLaMA-Factory's GaLore takes nn.Linear modules only: GPT-2's Conv1D projections are none, so it would train
    its AdamW alone without a word; the recipe is told."""
    from pipeline.errors import UserError

    path, hf = checkpoints["gpt2"]
    assert lf_groups(hf, DECAY)[2] == []
    with pytest.raises(UserError, match="galore_target 'all' selects no trainable weight of an nn.Linear"):
        train_groups(load_model(path), args())


def tensors(seed: int) -> list[torch.nn.Parameter]:
    """Tall, wide and square matrices (both projection sides), a bias and a norm gain."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 6), (5, 9), (7, 7), (6,), (9,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in shapes]


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "right", "left", "full"])
def test_three_steps_equal_galore_torchs_bitwise(proj_type):
    """Steps 1 and 3 take a new basis from the gradient's SVD (galore_update_interval 2), step 2 reuses step 1's;
    decay after the update, eps before the bias correction."""
    ours, theirs = tensors(0), tensors(0)
    split = {"rank": 3, "update_proj_gap": 2, "scale": 0.25, "proj_type": proj_type}

    def groups(params):
        return [{"params": params[3:4], "weight_decay": 0.0}, {"params": params[4:], "weight_decay": DECAY},
                {"params": params[:3], "weight_decay": DECAY, **split}]

    def marked(params):
        return [{**g, "low_rank": "rank" in g} for g in groups(params)]

    optimizer = GaLoreAdamW(marked(ours), lr=LR, betas=BETAS, eps=EPS)
    reference = GaLoreReference(groups(theirs), LR, BETAS, EPS)
    gen = torch.Generator().manual_seed(1)
    bases = []
    for _ in range(3):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen) * 1e-2
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
        for k, (a, b) in enumerate(zip(ours, theirs)):
            assert torch.equal(a, b), (proj_type, k)
        bases.append([v.clone() for p in ours[:3] for k, v in optimizer.state[p].items() if k.startswith("ortho")])
    assert all(torch.equal(x, y) for x, y in zip(bases[0], bases[1]))
    assert not any(torch.equal(x, y) for x, y in zip(bases[1], bases[2]))


def test_the_basis_is_kept_and_reused_after_a_state_dict_round_trip():
    """A resume loads the optimizer's state_dict: the basis tensors come back (row by row, as a checkpoint stores
    them), and step 2 reuses step 1's basis with the bits of the uninterrupted optimizer."""
    first, second = tensors(0), tensors(0)
    split = {"rank": 2, "update_proj_gap": 2, "scale": 2.0, "proj_type": "std", "low_rank": True}
    a = GaLoreAdamW([{"params": first[:3], "weight_decay": DECAY, **split}], lr=LR, betas=BETAS, eps=EPS)
    gen = torch.Generator().manual_seed(2)
    grads = [[torch.randn(p.shape, generator=gen) * 1e-2 for p in first[:3]] for _ in range(2)]
    for p, g in zip(first, grads[0]):
        p.grad = g
    a.step()
    saved = a.state_dict()  # as a checkpoint gives it back: copies, each tensor laid out row by row
    saved["state"] = {k: {n: v.contiguous().clone() if torch.is_tensor(v) else v for n, v in state.items()}
                      for k, state in saved["state"].items()}
    assert {"ortho_v"} <= set(saved["state"][0]) and "ortho_u" in saved["state"][1]
    with torch.no_grad():
        for p, q in zip(first, second):
            q.copy_(p)
    b = GaLoreAdamW([{"params": second[:3], "weight_decay": DECAY, **split}], lr=LR, betas=BETAS, eps=EPS)
    b.load_state_dict(saved)
    for ps, grad in ((first, grads[1]), (second, grads[1])):
        for p, g in zip(ps, grad):
            p.grad = g.clone()
    a.step()
    b.step()
    assert all(torch.equal(p, q) for p, q in zip(first[:3], second[:3]))


def test_layerwise_galore_trains_unclipped_as_llamafactorys_hooks_leave_it():
    from pipeline.recipe.dsconfig import gradient_clipping

    assert gradient_clipping({"use_galore": True, "galore_layerwise": True, "max_grad_norm": 1.0}) == 0.0
    assert gradient_clipping({"use_galore": True, "galore_layerwise": False, "max_grad_norm": 1.0}) == 1.0
    assert gradient_clipping({"use_galore": False, "galore_layerwise": True, "max_grad_norm": 1.0}) == 1.0


def test_what_galore_cannot_do_here_or_in_llamafactory_is_refused_where_the_recipe_says_so(tmp_path):
    from tests.acceptance.harness import write_data, write_recipe

    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          finetuning_type="lora", use_galore=True, zero_stage=2, use_muon=True, galore_layerwise=True,
                          gradient_accumulation_steps=2)
    lines = recipe.read_text().splitlines()
    at = {key: f"r.yaml:{next(i for i, line in enumerate(lines, 1) if line.startswith(key + ':'))}:"
          for key in ("zero_stage", "use_galore", "use_muon", "galore_layerwise")}
    err = refused(["validate", str(recipe)], tmp_path)
    assert f"{at['zero_stage']}13: zero_stage: given 2 with use_galore: true: GaLore needs zero_stage 0" in err, err
    assert (f"{at['use_galore']}13: use_galore: given true with finetuning_type: lora: GaLore projects the gradients "
            "of whole weight matrices") in err, err
    assert f"{at['use_muon']}11: use_muon: given true with use_galore: true: Muon and GaLore are two optimizers" in err
    assert (f"{at['galore_layerwise']}19: galore_layerwise: given true with gradient_accumulation_steps 2: layer-wise "
            "GaLore steps each weight as soon as its gradient is ready") in err, err
    # the tiny GPT-2's one nn.Linear is its (tied) head: its Conv1D projections leave `all` nothing to project
    refused_with_a_deepspeed_json(tmp_path, 1, "use_galore", "GaLore", galore_target="lm_head")


def resume_is_exact(make_recipe, workdir, **keys) -> Any:
    """Full fine-tuning of a tiny Llama for 6 steps, once straight and once stopped after step 3 and resumed: the
    weights are equal bit for bit; returns the resumed run's result."""
    from tests.train.test_checkpoint_resume import RESUME, interrupt_after
    from pipeline.train.run import train

    write_hf_checkpoint(workdir / "llama", "llama", small_vocab=True)
    keys = {**RESUME, "model_name_or_path": str(workdir / "llama"), "finetuning_type": "full", "weight_decay": 0.01,
            "cutoff_len": 256, **keys}  # the small byte-level vocabulary spells the rows out long
    straight = train(make_recipe(name="straight", **keys))
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, 3)
        first = train(make_recipe(name="resumed", **keys))
    assert first.exit_code == 143 and first.state.global_step == 3
    second = train(make_recipe(name="resumed", resume_from_checkpoint="latest", **keys))
    assert second.exit_code == 0 and second.state.global_step == 6
    ours = dict(second.engine.module.named_parameters())
    assert all(torch.equal(ours[name], p) for name, p in straight.engine.module.named_parameters())
    return second


@pytest.mark.slow  # ~15 s: three runs of a tiny Llama (tests/train/test_checkpoint_resume.py covers the machinery)
def test_interrupted_and_resumed_galore_run_equals_uninterrupted_bitwise(make_recipe, workdir):
    """A new basis every 2 steps: the stop after step 3 (which took one) and step 4 reuses it, restored from the
    checkpoint with the moments and step counts."""
    resume_is_exact(make_recipe, workdir, use_galore=True, galore_rank=2, galore_update_interval=2)
