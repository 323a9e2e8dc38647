"""use_muon: LLaMA-Factory 0.9.5's Muon groups and step (pipeline.train.muon).

Goldens: LLaMA-Factory's parameter rule (`_create_muon_optimizer`, train/trainer_utils.py: 2-D and neither "embed"
nor "lm_head" in the name) applied to transformers' and PEFT's own models of the same checkpoint, and its update
(third_party/muon/muon.py: Newton-Schulz in bfloat16, Nesterov momentum, lr x 0.2 sqrt(max(A, B)), its AdamW with
eps before the bias correction, decay on every parameter) re-written below from that source as LFMuon.
"""
from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pytest
import torch

from pipeline.model.build import FinetuneArgs, apply_finetuning_type
from pipeline.model.lora import family_of_model
from pipeline.model.weights import load_model
from pipeline.recipe.args import train_args
from pipeline.train.muon import MuonAdamW, muon_groups
from pipeline.train.optim import make_optimizer, train_groups

LR, DECAY, BETAS, EPS = 2e-2, 0.1, (0.9, 0.95), 1e-6


def lf_takes_muon(name: str, param: torch.Tensor) -> bool:
    """LLaMA-Factory's `_create_muon_optimizer` rule, on the name the model itself gives."""
    return param.ndim == 2 and "embed" not in name and "lm_head" not in name


def lf_newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """LLaMA-Factory's zeropower_via_newtonschulz5."""
    a, b, c = (3.4445, -4.7750, 2.0315)
    X = G.bfloat16()
    if G.size(0) > G.size(1):
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(0) > G.size(1):
        X = X.T
    return X


class LFMuon:
    """LLaMA-Factory's Muon.step for one group (lr, wd, momentum 0.95, nesterov, 5 steps, adamw betas / eps)."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], lr: float, wd: float, betas, eps: float) -> None:
        self.muon = [p for n, p in named if lf_takes_muon(n, p)]
        self.adamw = [p for n, p in named if not lf_takes_muon(n, p)]
        self.lr, self.wd, self.betas, self.eps = lr, wd, betas, eps
        self.state: dict[int, dict] = {}

    @torch.no_grad()
    def step(self) -> None:
        for p in self.muon:
            g, state = p.grad, self.state.setdefault(id(p), {})
            buf = state.setdefault("momentum_buffer", torch.zeros_like(g))
            buf.mul_(0.95).add_(g)
            u = lf_newton_schulz(g.add(buf, alpha=0.95))
            p.data.mul_(1 - self.lr * self.wd)
            p.data.add_(u, alpha=-self.lr * 0.2 * math.sqrt(max(p.shape[0], p.shape[1])))
        beta1, beta2 = self.betas
        for p in self.adamw:
            g, state = p.grad, self.state.setdefault(id(p), {"step": 0})
            state["step"] += 1
            m1 = state.setdefault("moment1", torch.zeros_like(g)).lerp_(g, 1 - beta1)
            m2 = state.setdefault("moment2", torch.zeros_like(g)).lerp_(g.square(), 1 - beta2)
            direction = m1 / (self.eps + m2.sqrt())
            scale = (1 - beta1 ** state["step"]) / (1 - beta2 ** state["step"]) ** 0.5
            p.data.mul_(1 - self.lr * self.wd)
            p.data.add_(direction, alpha=-self.lr / scale)


def args(**keys):
    return train_args({"learning_rate": LR, "weight_decay": DECAY, "use_muon": True, "adam_beta1": BETAS[0],
                       "adam_beta2": BETAS[1], "adam_epsilon": EPS, **keys})


def hf_names(model, group) -> set[str]:
    to_hf = family_of_model(model).to_hf
    ids = {id(p) for p in group["params"]}
    return {to_hf(n) for n, p in model.named_parameters() if id(p) in ids}


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_full_groups_are_llamafactorys_rule_over_transformers_names(checkpoints, family):
    """GPT-2's token and position tables (transformers' wte / wpe) hold no "embed": LLaMA-Factory gives them to
    Muon, and so does this; Qwen2's embed_tokens (tied to lm_head) and every 1-D tensor go to AdamW."""
    path, hf = checkpoints[family]
    model = load_model(path)
    groups = train_groups(model, args())
    assert [g["muon"] for g in groups] == [True, False]
    theirs = {n for n, p in hf.named_parameters() if lf_takes_muon(n, p)}
    assert hf_names(model, groups[0]) == theirs
    assert hf_names(model, groups[1]) == {n for n, _ in hf.named_parameters()} - theirs
    assert all(g["lr"] == LR and g["weight_decay"] == DECAY for g in groups)  # decay on vectors too, as there
    if family == "gpt2":
        assert {"transformer.wte.weight", "transformer.wpe.weight"} <= theirs


def test_lora_groups_are_llamafactorys_rule_over_peft_names(checkpoints):
    """With LoRA, LLaMA-Factory's rule gives every lora_A / lora_B to Muon and a modules_to_save embedding to
    AdamW (its PEFT name keeps "embed_tokens"); the same multiset of (Muon?, shape) here (sides sorted: our A and
    B are PEFT's transposed, and Muon's update and step size do not depend on the orientation)."""
    peft = pytest.importorskip("peft")
    path, hf = checkpoints["qwen2"]
    ft = FinetuneArgs(finetuning_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all",
                      use_rslora=False, use_dora=False, additional_target=["embed_tokens", "norm"],
                      freeze_trainable_layers=1, adapter_name_or_path=None, seed=3)
    model = apply_finetuning_type(load_model(path), ft)
    groups = train_groups(model, args())
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["embed_tokens", "norm"])
    theirs = peft.get_peft_model(copy.deepcopy(hf), config)  # PEFT wraps in place: the session's model stays plain
    trained = [(n, p) for n, p in theirs.named_parameters() if p.requires_grad]
    want = Counter((lf_takes_muon(n, p), tuple(sorted(p.shape))) for n, p in trained)
    have = Counter((g["muon"], tuple(sorted(p.shape))) for g in groups for p in g["params"])
    assert have == want
    assert any(n.endswith("embed_tokens.modules_to_save.default.weight") and not lf_takes_muon(n, p)
               for n, p in trained)


def named_tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    """A tall and a wide matrix (Newton-Schulz on the transpose for the tall one), a bias and an embedding."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"layers.0.mlp.up_proj.weight": (12, 5), "layers.0.self_attn.o_proj.weight": (4, 9),
              "layers.0.self_attn.q_proj.bias": (4,), "embed_tokens.weight": (10, 4)}
    return [(n, torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1)) for n, s in shapes.items()]


def test_two_steps_equal_llamafactorys_muon_bitwise():
    ours, theirs = named_tensors(0), named_tensors(0)
    optimizer = MuonAdamW(muon_groups(ours, str, DECAY, LR), lr=LR, betas=BETAS, eps=EPS)
    reference = LFMuon(theirs, LR, DECAY, BETAS, EPS)
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 2]
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        for (_, a), (_, b) in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=gen) * 1e-2
            b.grad = a.grad.clone()
        optimizer.step()
        reference.step()
        for (name, a), (_, b) in zip(ours, theirs):
            assert torch.equal(a, b), name
    before = dict(named_tensors(0))
    moved = ours[0][1] - before[ours[0][0]] * (1 - LR * DECAY) ** 2
    # two orthogonalized updates (singular values within about [0.7, 1.2]) at lr x 0.2 sqrt(12)
    assert 0.5 < torch.linalg.matrix_norm(moved, ord=2) / (2 * LR * 0.2 * math.sqrt(12)) < 1.3


def test_make_optimizer_builds_muon_only_when_asked(checkpoints):
    path, _ = checkpoints["qwen2"]
    model = load_model(path)
    assert isinstance(make_optimizer(model, args()), MuonAdamW)
    assert isinstance(make_optimizer(model, args(use_muon=False)), torch.optim.AdamW)


def test_llamafactorys_bf16_newton_schulz_magnifies_the_last_fp32_bit():
    """Why a CLI run is held to LLaMA-Factory's step within 8% per matrix (tests/compat/test_muon_example.py), not
    to fp32 rounding: its Newton-Schulz casts to bfloat16 and its quintic multiplies small singular directions by
    up to 3.4445^5; a gradient changed in its last bit (as summing in another order does) moves the result."""
    gen = torch.Generator().manual_seed(0)
    changes = []
    for _ in range(20):
        g = torch.randn((64, 32), generator=gen) * 1e-2
        h = g * (1 + torch.randn((64, 32), generator=gen) * 2 ** -23)
        a, b = lf_newton_schulz(g).float(), lf_newton_schulz(h).float()
        changes.append(float((a - b).norm() / a.norm()))
    assert 1e-3 < max(changes) < 0.05


def refused(argv: list[str], cwd) -> str:
    from tests.reliability.rel_helpers import run_main

    done = run_main(argv, cwd)
    assert done.code == 2 and "Traceback" not in done.err, done.err
    return done.err


def refused_with_a_deepspeed_json(tmp_path, stage: int, key: str, name: str, **keys) -> None:
    """`train` of a full fine-tuning recipe with `key: true` (and `keys`) and a DeepSpeed JSON of ZeRO `stage`
    (tmp_path holds data/) exits 2 before writing anything, naming the file, the optimizer and the fix."""
    from tests.acceptance.harness import write_recipe

    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": stage}}))
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          finetuning_type="full", deepspeed="ds.json", **{key: True}, **keys)
    err = refused(["train", str(recipe)], tmp_path)
    assert err.startswith(f"error: ds.json: zero_optimization.stage is {stage} with {key}: true: {name} needs "
                          "zero_stage 0"), err
    assert "set zero_optimization.stage to 0 there" in err and not (tmp_path / "saves/r").exists()


def test_zero_stages_that_cut_matrices_and_loraplus_are_refused_where_the_recipe_says_so(tmp_path):
    from tests.acceptance.harness import write_data, write_recipe

    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          use_muon=True, zero_stage=2, loraplus_lr_ratio=16.0)
    lines = recipe.read_text().splitlines()
    at = {key: f"r.yaml:{next(i for i, line in enumerate(lines, 1) if line.startswith(key + ':'))}:"
          for key in ("zero_stage", "loraplus_lr_ratio")}
    err = refused(["validate", str(recipe)], tmp_path)
    assert f"{at['zero_stage']}13: zero_stage: given 2 with use_muon: true: Muon needs zero_stage 0" in err, err
    assert "set zero_stage: 0" in err
    assert (f"{at['loraplus_lr_ratio']}20: loraplus_lr_ratio: given 16.0 with use_muon: true: LoRA+ and Muon are two "
            "optimizers (LLaMA-Factory silently trains with LoRA+'s AdamW and ignores use_muon)") in err, err
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          use_muon=True, deepspeed="ds.json")
    err = refused(["train", str(recipe)], tmp_path)
    assert err.startswith("error: ds.json: zero_optimization.stage is 3 with use_muon: true: Muon needs zero_stage "
                          "0"), err
    assert "set zero_optimization.stage to 0 there" in err and not (tmp_path / "saves/r").exists()
    # the plan of this recipe (the JSON's stage is set in the file, not by an override): it said `make plan`
    assert f"the memory plan: `python -m pipeline plan {recipe}`" in err, err
