"""LLaMA-Factory's extras/badam/llama3_full_sft.yaml (use_badam, layer mode) through the CLI, on a tiny Llama written
by transformers, with only model_name_or_path changed.

Golden values: transformers' Llama of the same checkpoint fed our loader's micro-batches (the data layer is not under
test), its gradients clipped by torch's clip_grad_norm_ over the tensors that require them, stepped by BAdamReference:
badam 1.4's BlockOptimizer (block_optim.py, single-GPU path; line numbers quoted) re-written below over torch's own
AdamW, as LLaMA-Factory builds it (train/trainer_utils.py `_create_badam_optimizer`: block_prefix_list None,
include_embedding / include_lm_head False). One documented difference is kept in the reference: the weight decay
follows the recipe by transformers' rule (badam's group dicts let AdamW's default 0.01 win: docs/training.md).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch
import transformers

from tests.acceptance.harness import pipeline
from tests.compat.lf_golden import golden_start, merged_is_the_last_checkpoint, saved_weights, stepped, without_prefix
from tests.compat.test_lf_recipes import lf_checkout

EXAMPLE = "examples/extras/badam/llama3_full_sft.yaml"
RUN = "saves/llama3-8b/full/sft"
# fp32 (the example's own precision here), one micro-batch per update, a constant rate high enough to see, weight
# decay, an epsilon large enough that the first Adam steps, g / (|g| + eps), do not magnify the last-bit
# differences of our gradients from transformers' on the tiniest ones (1e-6 moves some by 1.4e-6); a switch every
# 2 steps over 5: layer 0 trains step 1 (badam's first block gets one step), layer 1 steps 2-3, layer 0 again (its
# Adam state started afresh) steps 4-5
GOLDEN = ["gradient_accumulation_steps=1", "max_steps=5", "save_steps=1", "lr_scheduler_type=constant",
          "warmup_ratio=0", "learning_rate=1e-3", "weight_decay=0.1", "adam_epsilon=1e-4", "badam_switch_interval=2"]


def no_decay(name: str) -> bool:
    """transformers' Trainer.get_decay_parameter_names rule (biases and norms are not decayed)."""
    return bool(re.search(r"bias|layernorm|rmsnorm|(?:^|\.)norm(?:$|\.)|_norm(?:$|\.)", name.lower()))


class BAdamReference:
    """badam 1.4 BlockOptimizer, layer mode, ascending from block 0, as it steps on one GPU."""

    def __init__(self, named: list[tuple[str, torch.Tensor]], lr: float, betas: tuple[float, float], eps: float,
                 weight_decay: float, switch_every: int):
        self.named, self.switch_every, self.global_step = named, switch_every, 0
        self.kwargs = {"lr": lr, "betas": betas, "eps": eps}
        self.weight_decay = weight_decay
        self.blocks = self.infer_param_groups([n for n, _ in named])
        self.current_block_idx = 0  # lines 99-100: ascending, start_block None
        self.switch_trainable_params()  # line 130

    @staticmethod
    def infer_param_groups(names: list[str]) -> list[list[str]]:  # lines 148-175, embedding and head left out
        blocks: list[list[str]] = []
        for name in names:
            if any(prefix[0] in name for prefix in blocks):
                continue
            if re.findall(r".*layers.[^.]*\.", name):
                blocks.append(re.findall(r".*layers.[^.]*\.", name))
        return blocks

    def switch_trainable_params(self) -> None:  # lines 403-437 with 490-528
        active = self.blocks[self.current_block_idx]
        self.lp, self.hp, decay, rest = [], [], [], []
        for name, param in self.named:
            if not any(p in name for p in active):
                param.requires_grad_(False)
                param.grad = None
                continue
            param.requires_grad_(True)
            hp = param.clone().float().detach()
            hp.requires_grad = True
            self.lp.append(param)
            self.hp.append(hp)
            (rest if no_decay(name) else decay).append(hp)
        # a fresh AdamW: badam empties the base optimizer's state (line 435) and sets its groups (line 528)
        self.base = torch.optim.AdamW([{"params": decay, "weight_decay": self.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}], **self.kwargs)
        self.current_block_idx = (self.current_block_idx + 1) % len(self.blocks)  # lines 538-539

    def step(self) -> None:  # lines 217-237 and 270-287
        for lp, hp in zip(self.lp, self.hp):
            hp.grad = lp.grad.float()
            lp.grad = None
        self.base.step()
        for lp, hp in zip(self.lp, self.hp):
            lp.data.copy_(hp.to(lp.dtype).data)
            hp.grad = None
        self.global_step += 1
        if (self.global_step + 1) % self.switch_every == 0:
            self.switch_trainable_params()


def golden_steps(work: Path, llama: Path, steps: int) -> list[dict[str, torch.Tensor]]:
    r, batches, model = golden_start(work, EXAMPLE, GOLDEN, steps, llama)
    badam = BAdamReference(list(model.named_parameters()), r["learning_rate"], (r["adam_beta1"], r["adam_beta2"]),
                           r["adam_epsilon"], r["weight_decay"], r["badam_switch_interval"])
    return stepped(model, batches, badam.step, r["max_grad_norm"] or None)


def test_each_step_is_badams_block_update_and_the_merged_model_loads(tmp_path, lf_models):
    """After each of 5 steps every tensor equals the golden to fp32 rounding: layer 0 moves at steps 1, 4 and 5,
    layer 1 at 2 and 3, the others stay as they were; the embedding and the final norm never move; merged/ loads in
    transformers."""
    llama = lf_models("llama")
    work = lf_checkout(tmp_path, str(llama))
    err = pipeline("train", EXAMPLE, *GOLDEN, cwd=work, timeout=600).stderr
    assert "optimizer: BAdam (use_badam): 14 tensors at lr 0.001, weight decay 0.1 | 4 tensors at lr 0.001, " \
           "weight decay 0" in err, err
    assert ("badam: one decoder layer at a time, ascending: the first for 1 step, each next for 2; embedding, final "
            "norm and head frozen") in err, err
    assert "fp32, ZeRO stage 0" in err, err
    assert f"notice: {EXAMPLE}:13:16: badam_verbose: accepted without effect: badam's printing" in err, err
    start = without_prefix(transformers.AutoModelForCausalLM.from_pretrained(llama).state_dict())
    moving = {1: "layers.0.", 2: "layers.1.", 3: "layers.1.", 4: "layers.0.", 5: "layers.0."}
    before = start
    for step, golden in enumerate(golden_steps(work, llama, 5), start=1):
        want, got = without_prefix(golden), saved_weights(work / RUN, step)
        assert got.keys() == want.keys()
        for name, tensor in got.items():
            assert torch.allclose(tensor, want[name], rtol=0, atol=1e-6), (step, name)
            assert torch.equal(tensor, before[name]) != name.startswith(moving[step]), (step, name)
        before = got
    merged_is_the_last_checkpoint(work, EXAMPLE, GOLDEN, work / RUN, 5)


def test_without_use_badam_its_keys_say_they_do_nothing(tmp_path, lf_models):
    from tests.reliability.rel_helpers import run_main

    work = lf_checkout(tmp_path, str(lf_models("llama")))
    err = run_main(["validate", EXAMPLE, "use_badam=false"], work).err
    assert (f"notice: {EXAMPLE}:12:24: badam_switch_interval: accepted without effect: it only matters with "
            "use_badam: true (BAdam)") in err, err
