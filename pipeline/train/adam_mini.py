"""LLaMA-Factory's Adam-mini (`use_adam_mini`): adam-mini 1.1.1's Adam_mini, step for step, as the client optimizer
DeepSpeed wraps.

LLaMA-Factory 0.9.5 (train/trainer_utils.py `_create_adam_mini_optimizer`) builds adam_mini.Adam_mini over
model.named_parameters() with learning_rate, (adam_beta1, adam_beta2), adam_epsilon, weight_decay, and the config's
hidden_size (dim), num_attention_heads (n_heads) and num_key_value_heads (n_kv_heads). Adam-mini keeps Adam's first
moment per element but one second moment per block of the weight, the mean of the squared gradient over the block;
which blocks, it reads from the (lower-cased) transformers name, in this order (adam_mini.py:114-128, 230-325):

- `bias` anywhere in the name: plain per-element Adam (Qwen2's q/k/v biases);
- `q_proj`, `k_proj`, `wq`, `wk`, `query`, `key`: one block per dim x dim / n_heads elements of the flattened weight
  (a head of q, a key/value group of GQA's k, when head_dim is dim / n_heads);
- `embed`, `embd`, `wte`, `lm_head`, `output`, `final_layer`, `v_proj`, `wv`, `value`, `feed_forward`, `linear`,
  `mlp`, `o_proj`, `wo`, `attn.proj`: one block per row of the transformers weight (a token of the embedding and
  the head, an output neuron of the projections);
- anything else (the norm gains, GPT-2's fused c_attn and attention c_proj, its position embedding): the whole
  tensor is one block.

One update with gradient g, step t, lr the scheduled rate: m = lerp(m, g, 1 - beta1); v (per element or per block)
= beta2 v + (1 - beta2) mean(g^2); h = sqrt(v) / sqrt(1 - beta2^t) + eps (eps after the bias correction, as torch's
AdamW); p *= 1 - lr x weight_decay (decoupled, before the update; none for names holding `norm`, `ln` or `bias`:
adam_mini.py:141-144, its rule, not transformers'); p -= lr x m / (1 - beta1^t) / h. The arithmetic here keeps
adam_mini.py's order of operations, so the result is its to the bit.

GPT-2's Conv1D weights are stored transposed here (pipeline.model.lora's is_conv1d); their rows in transformers are
columns here, and the blocks follow transformers' layout. The state is per parameter (step, m, and v or vmean),
saved and restored by DeepSpeed's checkpoint like AdamW's. adam_mini gathers the block sizes over ranks when a
tensor is sharded (ZeRO-3, FSDP); here each rank holds whole weights: ZeRO 1-3 hand the client optimizer flat slices
of each group that cut rows and heads apart, so use_adam_mini asks for zero_stage 0
(pipeline.recipe.rules.optimizers.adam_mini_fits).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch

from pipeline.recipe.args import TrainArgs
from pipeline.model.optimizer_state import block_kind, head_numel
from pipeline.train.per_param import PerParameterOptimizer

NO_DECAY_WORDS = ("norm", "ln", "bias")  # adam_mini.py:141


def decays(hf_name: str) -> bool:
    """adam_mini's decay rule: every name but those holding `norm`, `ln` or `bias`."""
    return not any(word in hf_name.lower() for word in NO_DECAY_WORDS)


def adam_mini_groups(named_params: Iterable[tuple[str, Any]], hf_name: Callable[[str], str],
                     is_conv1d: Callable[[str], bool], weight_decay: float, learning_rate: float,
                     heads: int) -> list[dict[str, Any]]:
    """One group per (block kind, decayed, transposed) over the trainable parameters, in order of first appearance,
    each with `lr`, `weight_decay`, `block` and `transposed` (a GPT-2 Conv1D weight); `heads` is head_numel. A q/k
    weight whose size is no multiple of it is the recipe's model's problem, said here (adam_mini fails on a view)."""
    from pipeline.errors import UserError

    groups: dict[tuple[str, bool, bool], dict[str, Any]] = {}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        hf, kind = hf_name(name), block_kind(hf_name(name))
        if kind == "heads" and param.numel() % heads:
            raise UserError(f"use_adam_mini: {hf} has {param.numel()} elements, no multiple of Adam-mini's block of "
                            f"hidden_size^2 / num_attention_heads = {heads}; remove use_adam_mini")
        transposed = kind in ("heads", "rows") and is_conv1d(name)
        key = (kind, decays(hf), transposed)
        if key not in groups:
            groups[key] = {"params": [], "lr": learning_rate, "weight_decay": weight_decay if key[1] else 0.0,
                           "block": kind, "transposed": transposed, "head_numel": heads}
        groups[key]["params"].append(param)
    return list(groups.values())


def model_groups(model: Any, train: TrainArgs) -> list[dict[str, Any]]:
    """The recipe's Adam-mini groups over our model, by its parameters' transformers names and its config's width
    and head count (LLaMA-Factory reads hidden_size and num_attention_heads; num_key_value_heads only checks)."""
    from pipeline.model.adapter import family_of_model

    family, cfg = family_of_model(model), model.cfg
    return adam_mini_groups(model.named_parameters(), family.to_hf, family.is_conv1d, train.weight_decay,
                            train.learning_rate, head_numel(cfg.emb_dim, cfg.n_heads))


def _blocks(tensor: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """The tensor in transformers' layout, one block per row (heads: rows of head_numel elements)."""
    hf = tensor.t() if group["transposed"] else tensor
    return hf.reshape(-1, group["head_numel"]) if group["block"] == "heads" else hf


def _block_mean(grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """This step's mean of g^2 per block: one per row (heads, rows) or one in all (whole)."""
    if group["block"] == "whole":
        return torch.sum(grad * grad) / float(grad.numel())
    blocks = _blocks(grad, group)
    return torch.mean(blocks * blocks, dim=1, keepdim=True)


class AdamMini(PerParameterOptimizer):
    """adam-mini 1.1.1's Adam_mini on one rank (see the module docstring); groups from adam_mini_groups."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float) -> None:
        super().__init__(groups, {"lr": lr, "weight_decay": 0.0, "betas": betas, "eps": eps})

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        grad, state = param.grad, self.state[param]
        beta1, beta2 = group["betas"]
        if "step" not in state:
            state["step"] = 0
            state["m"] = torch.zeros_like(grad)
            state["v"] = torch.zeros_like(grad if group["block"] == "adam" else _block_mean(grad, group))
        if group["block"] == "adam":  # adam_mini.py:240
            state["v"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        else:  # adam_mini.py:269-271, 309-311, 356-397
            state["v"].mul_(beta2).add_(_block_mean(grad, group), alpha=1 - beta2)
        state["step"] += 1
        lr = group["lr"]
        if group["weight_decay"] > 0.0:
            param.mul_(1 - lr * group["weight_decay"])
        state["m"].lerp_(grad, 1 - beta1)
        bias_correction_1 = 1 - beta1 ** state["step"]
        h = (state["v"].sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(group["eps"])
        if group["block"] == "adam":  # adam_mini.py:248-250
            param.addcdiv_(state["m"], h, value=-lr / bias_correction_1)
            return
        stepsize = (1 / bias_correction_1) / h  # adam_mini.py:279-283, 319-323, 398-402
        if group["block"] == "whole":
            update = state["m"] * stepsize
        else:
            update = _blocks(state["m"], group) * stepsize
            update = update.reshape(param.t().shape).t() if group["transposed"] else update.view(param.shape)
        update.mul_(lr)
        param.add_(-update)
