"""An independent plain-PyTorch training loop: the yardstick for the DeepSpeed path.

Same model init (the model layer's build_model), same batches (the data layer's loader, in order, epochs cut to
whole accumulation groups), torch AdamW with decay on matrices only, the warmup + cosine/linear schedule written
out here from its textbook formula, gradient accumulation as transformers' num_items_in_batch (the loss
summed over the update's labelled tokens, divided by their number), torch's clip_grad_norm_. No DeepSpeed,
nothing from pipeline.train.
"""
from __future__ import annotations

from pipeline.recipe.args import data_args
import math
from typing import Any, Iterator, Mapping

import torch


def schedule(step: int, *, kind: str, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = (1 - t) if kind == "linear" else (1 + math.cos(math.pi * t)) / 2
    return min_ratio + (1 - min_ratio) * decay


def batches(r: Mapping[str, Any]) -> Iterator[dict]:
    from pipeline.data.loaders import make_loader

    loader = make_loader(data_args(r), "train", rank=0, world_size=1, epoch=0, shuffle=True)
    gas = r["gradient_accumulation_steps"]
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        usable = len(loader) // gas * gas
        for k in range(usable):
            yield loader.batch(k)
        epoch += 1


def train(r: Mapping[str, Any], steps: int, dtype: torch.dtype = torch.float32) -> tuple[list[float], list[float], Any]:
    """(loss per optimizer step, L1 term per step, trained model) after `steps` updates."""
    from pipeline.model.build import build_model
    from pipeline.recipe.args import recipe_args

    torch.manual_seed(r["seed"])
    model = build_model(*recipe_args(r)).train()
    for block in model.modules():  # sparse MoE blocks keep their router logits for moe_aux
        if hasattr(block, "keep_router_logits"):
            block.keep_router_logits = bool(r.get("moe_aux_loss_coef"))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": r["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=r["learning_rate"],
                            betas=(r["adam_beta1"], r["adam_beta2"]), eps=r["adam_epsilon"])
    gas, total = r["gradient_accumulation_steps"], r["max_steps"]
    warmup = r["warmup_steps"] or 0
    data = batches(r)
    losses, l1s = [], []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = r["learning_rate"] * schedule(step, kind=r["lr_scheduler_type"], total=total,
                                                        warmup=warmup, min_ratio=r["min_lr_ratio"])
        step_loss = step_l1 = 0.0
        window = [next(data) for _ in range(gas)]
        labelled = sum(int((b["labels"] != -100).sum()) for b in window)
        for b in window:
            # transformers' num_items_in_batch: summed cross-entropy / the labelled tokens of the whole update
            loss_sum, _ = model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                                reduction="sum")
            loss = loss_sum / labelled
            l1 = r["l1_lambda"] * sum(p.abs().sum() for p in params)
            aux = moe_aux(r, model, b["attention_mask"])
            (loss + l1 / gas + aux).backward()
            step_loss += loss.item() + float(aux.detach() if torch.is_tensor(aux) else aux)  # transformers' Trainer logs the model's loss, aux term included
            step_l1 += float(l1.detach() if torch.is_tensor(l1) else l1) / gas
        if r["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_(params, r["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        l1s.append(step_l1)
    return losses, l1s, model


def moe_aux(r: Mapping[str, Any], model: Any, attention_mask: torch.Tensor) -> Any:
    """moe_aux_loss_coef x transformers' own load_balancing_loss_func over the router logits this forward left in the
    model's sparse blocks (collected by attribute, not by pipeline.model.moe), added in full per micro-batch as
    transformers' Trainer adds a Qwen3MoeForCausalLM's aux loss under num_items_in_batch; 0 without the key."""
    if not r.get("moe_aux_loss_coef"):
        return 0.0
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    blocks = [m for m in model.modules() if hasattr(m, "router_logits")]
    logits = tuple(b.router_logits for b in blocks)
    return r["moe_aux_loss_coef"] * load_balancing_loss_func(logits, len(blocks[0].experts), blocks[0].top_k,
                                                             attention_mask)
