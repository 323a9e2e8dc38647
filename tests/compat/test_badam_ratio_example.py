"""LLaMA-Factory's extras/badam/llama3_full_sft.yaml switched to ratio mode (`badam_mode: ratio` with its
badam_update_ratio and badam_mask_mode, as a user edits it) through the CLI, on a tiny Llama with an untied head
written by transformers (LLaMA-Factory's ratio mode fails on a tied head: badam's lm_head_layer is None there).

Golden values: transformers' Llama of the same checkpoint fed our loader's micro-batches (the data layer is not under
test), stepped by BAdamRatioReference: badam 1.4's BlockOptimizerRatio (block_optim.py, line numbers quoted)
re-typed below with its sparse gradients, its mask per shape and its sparse Adam, and its sparse gradient clipping
(utils.py clip_grad_norm_old_version, which LLaMA-Factory's trainer installs for BAdam), as LLaMA-Factory builds it
(train/trainer_utils.py `_create_badam_optimizer`: update_ratio, mask_mode, include_embedding False; switch_every
100, preserve_threshold 100 and keep_mask True by default).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from tests.acceptance.harness import pipeline, write_hf_checkpoint
from tests.compat.lf_golden import golden_start, merged_is_the_last_checkpoint, saved_weights, stepped
from tests.compat.test_lf_recipes import lf_checkout

EXAMPLE = "examples/extras/badam/llama3_full_sft.yaml"
RUN = "saves/llama3-8b/full/sft"
RATIO = 0.3
# fp32, one micro-batch per update, a constant rate, no weight decay (badam's sparse Adam has none: refused), an
# epsilon large enough that the first Adam steps do not magnify last-bit gradient differences; 102 steps: the
# window moves on after step 100, so steps 101-102 train the next 30% of each tensor with fresh moments
GOLDEN = ["gradient_accumulation_steps=1", "max_steps=102", "save_steps=51", "lr_scheduler_type=constant",
          "warmup_ratio=0", "learning_rate=1e-3", "adam_epsilon=1e-4"]


class BAdamRatioReference:
    """badam 1.4 BlockOptimizerRatio, mask_mode adjacent, on one CPU, with LLaMA-Factory's gradient clipping."""

    def __init__(self, model: torch.nn.Module, update_ratio: float, lr: float, betas: tuple[float, float],
                 eps: float, max_grad_norm: float, switch_every: int = 100, preserve_threshold: int = 100):
        self.model, self.update_ratio, self.lr, self.betas, self.eps = model, update_ratio, lr, betas, eps
        self.max_grad_norm, self.switch_every, self.preserve_threshold = max_grad_norm, switch_every, preserve_threshold
        self.global_step, self.mask_dict, self.offset, self.state = 0, {}, {}, {}
        named = list(model.named_parameters())
        next(p for n, p in named if "embed" in n).requires_grad_(False)  # lines 591-594, 615-620
        next(p for n, p in named if "lm_head" in n).requires_grad_(False)  # lines 593-594, 621-625
        for _, p in named:
            if p.requires_grad:
                p.register_post_accumulate_grad_hook(self.hook)  # lines 601-603
            self.offset[p] = 0  # line 604

    def mask_adjacent(self, p: torch.Tensor) -> torch.Tensor:  # lines 768-782
        num_elements, offset = p.numel(), self.offset[p]
        num_ones = int(num_elements * self.update_ratio)
        if offset + num_ones > num_elements:
            i = torch.cat([torch.arange(0, offset + num_ones - num_elements).unsqueeze(0),
                           torch.arange(offset, num_elements).unsqueeze(0)], dim=1)
        else:
            i = torch.arange(offset, min(offset + num_ones, num_elements)).unsqueeze(0)
        unraveled_i = torch.vstack(torch.unravel_index(i, p.size()))
        return torch.sparse_coo_tensor(unraveled_i, torch.ones(num_ones, dtype=p.dtype), p.shape)

    def hook(self, p: torch.Tensor) -> None:  # lines 807-838, update_ratio < 1
        num_elements, offset = p.numel(), self.offset[p]
        if num_elements < self.preserve_threshold:
            p.grad = p.grad.add_(1e-9).to_sparse()
        if self.mask_dict.get(p.shape) is None:
            self.mask_dict[p.shape] = self.mask_adjacent(p)  # keep_mask: one mask per shape
        p.grad = p.grad.sparse_mask(self.mask_dict[p.shape])
        if (self.global_step + 1) % self.switch_every == 0:
            self.offset[p] = (offset + int(num_elements * self.update_ratio)) % num_elements
            self.mask_dict[p.shape] = None

    def clip(self) -> None:
        """utils.py:135-158, torch 1.13's clip_grad_norm_ over the sparse gradients, as badam means it: line 158's
        `g.detach().mul_(...)` scales a copy of a sparse gradient in the torch here (its detach() does not share
        the values), so the gradient itself is scaled (docs/training.md#badam)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        total_norm = torch.norm(torch.stack([torch.norm(g.detach(), 2.0) for g in grads]), 2.0)
        clip_coef_clamped = torch.clamp(self.max_grad_norm / (total_norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(clip_coef_clamped)

    @torch.no_grad()
    def step(self) -> None:  # lines 697-761 with _sparse_adam, lines 627-693
        self.clip()
        beta1, beta2 = self.betas
        for p in self.model.parameters():
            if p.grad is None:
                continue
            state = self.state.setdefault(p, {})
            if not state:
                state.update(step=0, exp_avg=torch.zeros_like(p.grad._values()),
                             exp_avg_sq=torch.zeros_like(p.grad._values()))
            state["step"] += 1
            grad = p.grad.coalesce()
            grad_values, exp_avg, exp_avg_sq, step = grad._values(), state["exp_avg"], state["exp_avg_sq"], state["step"]
            exp_avg.add_(grad_values.sub(exp_avg).mul_(1 - beta1))
            exp_avg_sq.add_(grad_values.pow(2).sub_(exp_avg_sq).mul_(1 - beta2))
            numer, denom = exp_avg.clone(), exp_avg_sq.clone().sqrt_().add_(self.eps)
            step_size = self.lr * (1 - beta2 ** step) ** 0.5 / (1 - beta1 ** step)
            p.add_(-step_size * grad.new(grad._indices(), numer.div_(denom), grad.size()))
        self.global_step += 1
        if self.global_step % self.switch_every == 0:  # lines 758-766
            self.state = {}


def ratio_example(work: Path) -> None:
    """The example as a user switches it to ratio mode: badam_mode ratio and its two keys."""
    path = work / EXAMPLE
    text = path.read_text("utf-8")
    assert "badam_mode: layer\n" in text
    path.write_text(text.replace("badam_mode: layer\n", f"badam_mode: ratio\nbadam_update_ratio: {RATIO}\n"
                                                        "badam_mask_mode: adjacent\n"), "utf-8")


def ours(name: str) -> str:
    """transformers' Llama name -> a checkpoint's (no "model.")."""
    return name.removeprefix("model.")


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # the reference's sparse masks, as badam builds them
def test_each_tensors_window_steps_as_badams_across_a_redraw_and_the_merged_model_loads(tmp_path):
    """After steps 51 and 102 every tensor equals the golden to fp32 rounding; the embedding and the head never
    move; the entries that moved are those of windows 0 and 1 (the first and second 30% of each tensor, flat);
    merged/ loads in transformers."""
    llama = tmp_path / "llama"
    write_hf_checkpoint(llama, "llama", small_vocab=True, max_position_embeddings=2048, tie_word_embeddings=False)
    work = lf_checkout(tmp_path / "lf", str(llama))
    ratio_example(work)
    err = pipeline("train", EXAMPLE, *GOLDEN, cwd=work, timeout=600).stderr
    assert "optimizer: BAdam (use_badam): 19 tensors at lr 0.001, weight decay 0" in err, err
    assert ("badam: ratio mode, 0.3 of each tensor's entries (adjacent), the window moving on every 100 steps; "
            "embedding and head frozen") in err, err
    r, batches, model = golden_start(work, EXAMPLE, GOLDEN, 102, llama)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    badam = BAdamRatioReference(model, RATIO, r["learning_rate"], (r["adam_beta1"], r["adam_beta2"]),
                                r["adam_epsilon"], r["max_grad_norm"])
    goldens = stepped(model, batches, badam.step, None)
    for step in (51, 102):
        got = saved_weights(work / RUN, step)
        assert set(got) == {ours(k) for k in start}
        for name, want in goldens[step - 1].items():
            assert torch.allclose(got[ours(name)], want, rtol=0, atol=1e-6), (step, name)
    final = goldens[-1]
    for name, before in start.items():
        moved = (final[name] != before).flatten().nonzero().flatten()
        k = int(before.numel() * RATIO)
        if "embed" in name or "lm_head" in name:
            assert moved.numel() == 0, name
        else:
            assert moved.max() < 2 * k and moved.numel() > k, name  # window 1 is positions k .. 2k - 1
    merged_is_the_last_checkpoint(work, EXAMPLE, GOLDEN, work / RUN, 102)
    assert transformers.AutoModelForCausalLM.from_pretrained(work / RUN / "merged").lm_head.weight.shape[0] > 0


def test_the_layer_keys_the_example_keeps_say_they_do_nothing_in_ratio_mode(tmp_path, lf_models):
    from tests.reliability.rel_helpers import run_main

    work = lf_checkout(tmp_path, str(lf_models("llama")))
    ratio_example(work)
    lines = (work / EXAMPLE).read_text("utf-8").splitlines()
    err = run_main(["validate", EXAMPLE], work).err
    for key in ("badam_switch_mode", "badam_switch_interval"):
        line = next(i for i, text in enumerate(lines, 1) if text.startswith(key + ":"))
        assert (f"notice: {EXAMPLE}:{line}:{len(key) + 3}: {key}: accepted without effect: it only matters with "
                "badam_mode: layer") in err, err
    err = run_main(["validate", EXAMPLE, "badam_mode=layer"], work).err
    assert "badam_update_ratio: accepted without effect: it only matters with badam_mode: ratio" in err, err
