"""use_asft_loss: LLaMA-Factory's ASFT loss per micro-batch, against the starting model as reference.

Golden values: LLaMA-Factory's asft_loss_func re-written below from its source (0.9.5 and main alike,
src/llamafactory/train/trainer_utils.py:686-765: asft_loss_func shifts logits, labels and the reference's logits,
_asft_cross_entropy returns dft_loss + asft_alpha * kl_loss at :740, _dft_cross_entropy at :658 the mean of
CE x exp(-CE).detach() without num_items_in_batch, _kl_divergence F.kl_div(log_softmax(policy), softmax(ref))
summed over the vocabulary, averaged over the labelled positions at :765), applied to transformers' logits: a tiny
LlamaForCausalLM as the reference (the starting model) and the policy from transformers (full: weights moved) or
PEFT (LoRA / OFT: an adapter with nonzero weights on that base); and a hand value.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.asft import asft_loss
from pipeline.train.asft import AsftObjective
from pipeline.train.preference import AdapterReference, ModelReference, starting_reference

ALPHA = 0.3


def llama_factory_asft(logits: torch.Tensor, ref_logits: torch.Tensor, hf_labels: torch.Tensor,
                       alpha: float) -> torch.Tensor:
    """LLaMA-Factory's asft_loss_func over a causal LM's logits (B, T, V), its reference's and transformers' labels
    (unshifted, -100 where nothing is learned)."""
    vocab = logits.size(-1)
    policy = logits.float()[..., :-1, :].reshape(-1, vocab)
    ref = ref_logits[..., :-1, :].reshape(-1, vocab)
    labels = hf_labels[..., 1:].reshape(-1)
    per_token = F.cross_entropy(policy, labels, ignore_index=-100, reduction="none")  # _dft_cross_entropy
    valid = per_token[labels != -100]
    dft = (valid * torch.exp(-valid).detach()).mean()
    kl = F.kl_div(F.log_softmax(policy, dim=-1), F.softmax(ref, dim=-1), reduction="none").sum(dim=-1)
    mask = (labels != -100).float()  # _kl_divergence
    return dft + alpha * (kl * mask).sum() / mask.sum()


def test_hand_value():
    """Policy logits (0, 0): p = (1/2, 1/2); reference (ln 3, 0): q = (3/4, 1/4); target 0. DFT: ln 2 x 1/2;
    KL(q || p) = 3/4 ln(3/2) + 1/4 ln(1/2)."""
    got = asft_loss(torch.zeros(1, 2), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([0]), ALPHA)
    want = math.log(2) / 2 + ALPHA * (0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert got.item() == pytest.approx(want, rel=1e-6)


class Engine:
    """What the objective and the reference read of a DeepSpeed engine: a callable model, .module and .device."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.device = torch.device("cpu")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def tiny_llama(directory: Path) -> Any:
    import transformers

    from tests.acceptance.harness import FAMILIES

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**FAMILIES["llama"].tiny, "vocab_size": 256})).eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model


def batch(vocab: int) -> dict[str, torch.Tensor]:
    """Our batch (labels already shifted) of two rows: a prompt, and a shorter second row (right padding)."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, vocab, (2, 12), generator=gen)
    labels = ids.roll(-1, 1)
    labels[:, :4] = -100
    labels[:, -1] = 2
    labels[1, 8:] = -100
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def hf_logits(model: Any, b: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits


def hf_labels(labels: torch.Tensor) -> torch.Tensor:
    """transformers' labels for our shifted ones: moved right one column (the logits get one position more)."""
    return torch.cat([torch.full_like(labels[:, :1], -100), labels], dim=1)


def golden(policy: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> float:
    """LLaMA-Factory's loss over transformers' logits of our batch, each one position longer as Trainer sees them."""
    longer = [torch.cat([x, x[:, -1:]], dim=1) for x in (policy, reference)]
    return float(llama_factory_asft(*longer, hf_labels(labels), ALPHA))


@pytest.mark.parametrize("finetuning", ["full", "lora", "oft"])
def test_the_objective_is_llama_factorys_loss_against_the_starting_model(tmp_path, finetuning):
    """Full: the policy's weights moved, the reference the start given as ref_model (a frozen ModelReference; without
    ref_model the starting copy is tests/acceptance/test_asft_cli.py's). LoRA / OFT: the adapter's weights nonzero,
    the reference the policy with its adapters off (AdapterReference)."""
    import peft

    from pipeline.model.lora import apply_lora, save_adapter
    from pipeline.model.oft import apply_oft
    from pipeline.model.weights import load_model
    from pipeline.recipe.args import recipe_args

    base = tiny_llama(tmp_path / "base")
    b = batch(base.config.vocab_size)
    ours = load_model(tmp_path / "base")
    gen = torch.Generator().manual_seed(2)
    if finetuning == "full":
        with torch.no_grad():
            for p in base.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        policy = hf_logits(base, b)
        base.save_pretrained(tmp_path / "moved", safe_serialization=True)
        ours = load_model(tmp_path / "moved")
        models = recipe_args({"model_name_or_path": str(tmp_path / "moved"), "finetuning_type": "full"})
        reference = starting_reference(str(tmp_path / "base"), None, models, Engine(ours))
        assert isinstance(reference, ModelReference) and reference.description == f"ref_model {tmp_path / 'base'}"
        starting = tiny_llama(tmp_path / "again")
    else:
        (apply_lora(ours, "all", rank=4, seed=0) if finetuning == "lora" else apply_oft(ours, "all", block_size=4))
        with torch.no_grad():
            for name, p in ours.named_parameters():
                if p.requires_grad:
                    p.add_((0.2 if finetuning == "lora" else 1.0) * torch.randn(p.shape, generator=gen))
        save_adapter(ours, tmp_path / "adapter")
        reference = AdapterReference(Engine(ours))
        policy = hf_logits(peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval(), b)
        starting = tiny_llama(tmp_path / "again")  # PEFT wrapped base in place: the start, written anew
    want = golden(policy, hf_logits(starting, b), b["labels"])
    assert abs(want - golden(policy, policy, b["labels"])) > 0.05 * want  # the KL term weighs in
    loss, metrics = AsftObjective(Engine(ours.eval()), reference, ALPHA)(b)
    assert loss.item() == pytest.approx(want, rel=1e-5) and metrics == {}
    loss.backward()  # the policy gets the gradient, the reference none
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)
