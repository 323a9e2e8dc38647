"""The three LoRA training setups compared by the sft and dense benchmarks, each behind `step(batch)`.

- ours: the project's real training step: build_model (our GPTModel + LoRA) -> AdamW -> DeepSpeed engine
  from the recipe's ds_config (bf16: bf16 weights, fp32 master copies of the LoRA tensors) ->
  `pipeline.train.loop.Trainer.optimizer_step`, fed by our sft loader (group_by_length) and computing the
  output head only where labels are kept.
- hf: transformers' class of the model's family (GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM, built
  from the HF config of the same shape) + PEFT LoRA as LLaMA-Factory runs it with `bf16: true`: base weights
  created in bf16, LoRA tensors upcast to fp32, torch.autocast(bf16), labels -100 on the prompt, each batch padded to
  its longest example (DataCollatorForSeq2Seq), random order, grad-norm clipping at 1.0. Gradient
  checkpointing is off (LLaMA-Factory turns it on by default, which costs ~30% more compute): same
  algorithm as ours, so the comparison is of implementations.
- book: the book's code from PyPI `llms-from-scratch`: ch04.GPTModel (fp32, as the book trains) with
  appendix_e.replace_linear_with_lora on the transformer blocks (q, k, v, out_proj and both MLP layers),
  ch07.custom_collate_fn (pad to the longest, train on the whole sequence), ch05.calc_loss_batch's loss,
  plus torch.autocast(bf16) (the book has no bf16 path).

All: a model shape (bench.workload.Shape: a preset's published widths with the depth cut; the book's code
has GPT-2 only), r=16, alpha 32 on every block Linear, no dropout, AdamW lr 1e-4, micro-batch = global
batch (no accumulation). `HF.neat_packed_batch` + `greedy_knapsack` reproduce LLaMA-Factory's neat_packing.
"""
from __future__ import annotations

from typing import Callable, Mapping

from pipeline.recipe.args import data_args

import numpy as np

from bench.workload import Shape

PAD = 50256  # GPT-2's <|endoftext|>; other vocabularies store their pad id with the examples
IGNORE = -100
LORA_RANK, LORA_ALPHA, LR = 16, 32, 1e-4


class Examples:
    """Tokenized examples back to back (our tokenizer and template, shared by every contender)."""

    def __init__(self, ids: np.ndarray, trainable: np.ndarray, offsets: np.ndarray, pad: int = PAD):
        self.ids, self.trainable, self.offsets, self.pad = ids, trainable, offsets, pad

    @classmethod
    def load(cls, path: str) -> "Examples":
        data = np.load(path)
        return cls(data["ids"], data["trainable"], data["offsets"], int(data["pad"]) if "pad" in data else PAD)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def tokens(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]].astype(np.int64)

    def mask(self, i: int) -> np.ndarray:
        return self.trainable[self.offsets[i]:self.offsets[i + 1]]

    def useful_tokens(self, indices: np.ndarray) -> int:
        """Real (non-pad) input positions: every example of n tokens feeds n - 1 positions (the last token is
        only a target), counted as our trainer counts `tokens` (attention_mask.sum())."""
        return int(sum(int(self.offsets[i + 1] - self.offsets[i]) - 1 for i in indices))


class FixedLoader:
    """Pre-built batches with the Loader interface the Trainer reads (set_epoch, iter_from, len)."""

    def __init__(self, batches: list[dict]):
        self.batches = batches
        self.batch_size, self.world_size, self.num_examples = len(batches[0]["input_ids"]), 1, 0

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def iter_from(self, start: int):
        return iter(self.batches[start:])


# ---------------------------------------------------------------------------------------------- ours

class Ours:
    """Our Trainer's optimizer step on a DeepSpeed engine built exactly as pipeline.train.run builds it."""

    name = "ours"

    def __init__(self, recipe: str, overrides: list[str]):
        from pipeline.runtime import dist, hostmem

        dist.init()
        import deepspeed

        from bench.workload import resolve_recipe
        from pipeline.data.loaders import make_loader
        from pipeline.model.build import build_model
        from pipeline.recipe.args import recipe_args, train_args
        from pipeline.train.optim import make_optimizer
        from pipeline.train.run import compute_dtype, enable_features, exact_steps, seed_everything
        from pipeline.train.schedule import make_scheduler

        r = resolve_recipe(recipe, overrides)
        seed_everything(r["seed"])
        self.loader = make_loader(data_args(r), "train", rank=0, world_size=1, epoch=0, shuffle=True)
        self.r = exact_steps(r, self.loader)
        model = build_model(*recipe_args(self.r), dtype=compute_dtype(self.r))
        enable_features(model, self.r)  # gradient checkpointing per the recipe, as run() does
        optimizer = make_optimizer(model, train_args(self.r))
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                               lr_scheduler=make_scheduler(optimizer, train_args(self.r)),
                                               config=self.r.ds_config)
        hostmem.release_freed()  # as train() does before its loop

    def trainer(self, batches: list[dict], objective: Callable | None = None) -> Callable[[], None]:
        """A step function: each call is one Trainer.optimizer_step over the next of `batches` (objective: the
        dpo stage's PreferenceObjective, as pipeline.train.run passes it)."""
        from pipeline.train.checkpoint import TrainState
        from pipeline.train.loop import Trainer, Window

        from pipeline.recipe.args import train_args

        trainer = Trainer(self.engine, train_args(self.r), TrainState(), FixedLoader(batches), evaluate=None,
                          save=lambda: None, log=None, stop=None, objective=objective)
        self.last_loss = float("nan")

        def step() -> None:
            window = Window()
            trainer.optimizer_step(window)
            # the loop leaves the loss on the device (read at log points); reading it here ends each timed step
            # when the device has finished it, as the loop's own per-step read did
            self.last_loss = float(window.loss)

        return step

    def sft_batch(self, k: int) -> dict:
        return self.loader.batch(k)

    @staticmethod
    def dense_batch(tokens: np.ndarray) -> dict:
        import torch

        t = torch.from_numpy(tokens)
        return {"input_ids": t[:, :-1].contiguous(), "labels": t[:, 1:].contiguous(),
                "attention_mask": torch.ones_like(t[:, :-1])}


# ---------------------------------------------------------------------------------------------- transformers + PEFT

class HF:
    """transformers (the shape's family class: GPT2LMHeadModel, LlamaForCausalLM, Qwen3ForCausalLM, built from
    the matching HF config with random weights) + PEFT LoRA, stepped like the HF Trainer under LLaMA-Factory."""

    name = "hf"

    def __init__(self, shape: Shape, device: str | None = None):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoConfig, AutoModelForCausalLM

        # the GPU where there is one, as the HF Trainer does; each batch is moved there inside the timed step
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch.manual_seed(0)
        raw = shape.hf_config()
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        # LLaMA-Factory: torch_dtype = the compute dtype (bf16), so the weights are never held in fp32
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, fan_in_fan_out=bool(shape.cfg.hf.conv1d),
                          target_modules=shape.hf_lora_targets(), task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        for p in self.params:  # LLaMA-Factory upcasts trainable parameters to fp32
            p.data = p.data.float()
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=LR)

    def step(self, batch: dict) -> float:
        import torch

        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(self.device.type, dtype=torch.bfloat16):
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @staticmethod
    def sft_batch(examples: Examples, indices: np.ndarray) -> dict:
        """DataCollatorForSeq2Seq: right-pad input_ids with the pad id and labels with -100."""
        import torch

        width = max(len(examples.tokens(i)) for i in indices)
        ids = np.full((len(indices), width), examples.pad, dtype=np.int64)
        labels = np.full((len(indices), width), IGNORE, dtype=np.int64)
        mask = np.zeros((len(indices), width), dtype=np.int64)
        for row, i in enumerate(indices):
            tokens = examples.tokens(i)
            ids[row, :len(tokens)] = tokens
            labels[row, :len(tokens)] = np.where(examples.mask(i), tokens, IGNORE)
            mask[row, :len(tokens)] = 1
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "attention_mask": torch.from_numpy(mask)}

    @staticmethod
    def neat_packed_batch(examples: Examples, rows: list[list[int]], cutoff_len: int, dtype: str = "bfloat16") -> dict:
        """LLaMA-Factory's neat_packing on the eager/SDPA path (no FlashAttention on a CPU), rewritten here:
        each row is the examples of one knapsack back to back, right-padded to cutoff_len + 1, with
        position_ids restarting at 0 per example and the attention mask holding each token's example number
        (1, 2, ...; 0 = padding), which its SFTDataCollatorWith4DAttentionMask turns into a (B, 1, T, T) float
        mask in the compute dtype: 0 where causal and same example, the dtype's minimum elsewhere."""
        import torch

        width = cutoff_len + 1
        ids = np.full((len(rows), width), examples.pad, dtype=np.int64)
        labels = np.full((len(rows), width), IGNORE, dtype=np.int64)
        positions = np.zeros((len(rows), width), dtype=np.int64)
        segments = np.zeros((len(rows), width), dtype=np.int64)
        for r, row in enumerate(rows):
            at = 0
            for k, i in enumerate(row, 1):
                tokens = examples.tokens(i)
                n = len(tokens)
                ids[r, at:at + n] = tokens
                labels[r, at:at + n] = np.where(examples.mask(i), tokens, IGNORE)
                positions[r, at:at + n] = np.arange(n)
                segments[r, at:at + n] = k
                at += n
        seg = torch.from_numpy(segments)
        allowed = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] != 0)
        allowed &= torch.tril(torch.ones(width, width, dtype=torch.bool))
        dtype = getattr(torch, dtype)  # LLaMA-Factory: the compute dtype (bf16 here)
        mask = torch.where(allowed, torch.tensor(0, dtype=dtype), torch.tensor(torch.finfo(dtype).min, dtype=dtype))
        return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions), "attention_mask": mask}

    @staticmethod
    def dense_batch(tokens: np.ndarray) -> dict:
        """T positions, labels = inputs (the model shifts): the same T x B positions as the others."""
        import torch

        t = torch.from_numpy(tokens[:, :-1].copy())
        return {"input_ids": t, "labels": t, "attention_mask": torch.ones_like(t)}


def greedy_knapsack(lengths: Mapping[int, int], capacity: int) -> list[list[int]]:
    """LLaMA-Factory's packing (processor_utils.greedy_knapsack, rewritten): lengths sorted ascending; each
    knapsack repeatedly takes the longest remaining example that still fits. Returns example indices."""
    import bisect

    order = sorted(lengths, key=lambda i: (lengths[i], i))
    keys = [lengths[i] for i in order]
    packs = []
    while order:
        pack, room = [], capacity
        while True:
            at = bisect.bisect_right(keys, room) - 1
            if at < 0:
                break
            room -= keys.pop(at)
            pack.append(order.pop(at))
        if not pack:  # longer than the capacity: LLaMA-Factory drops it before packing
            keys.pop(0), order.pop(0)
            continue
        packs.append(pack)
    return packs


# ---------------------------------------------------------------------------------------------- the book

class Book:
    """The book's GPTModel + LoRA classes + instruction collate (llms-from-scratch on PyPI)."""

    name = "book"

    def __init__(self, n_layers: int):
        import torch
        from llms_from_scratch.appendix_e import replace_linear_with_lora
        from llms_from_scratch.ch04 import GPTModel

        torch.manual_seed(0)
        cfg = {"vocab_size": 50257, "context_length": 1024, "emb_dim": 768, "n_heads": 12, "n_layers": n_layers,
               "drop_rate": 0.0, "qkv_bias": True}
        self.model = GPTModel(cfg)
        for p in self.model.parameters():
            p.requires_grad = False
        replace_linear_with_lora(self.model.trf_blocks, rank=LORA_RANK, alpha=LORA_ALPHA)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=LR)

    def step(self, batch: tuple) -> float:
        import torch

        inputs, targets = batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = self.model(inputs)
            # ch05.calc_loss_batch (imported from there it would bring matplotlib into the measured RSS)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    @staticmethod
    def sft_batch(examples: Examples, indices: np.ndarray, cutoff_len: int) -> tuple:
        """ch07.custom_collate_fn on the examples without their closing EOS (the collate appends it)."""
        from llms_from_scratch.ch07 import custom_collate_fn

        return custom_collate_fn([examples.tokens(i)[:-1].tolist() for i in indices], allowed_max_length=cutoff_len)

    @staticmethod
    def dense_batch(tokens: np.ndarray) -> tuple:
        import torch

        t = torch.from_numpy(tokens)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def lora_step_flops(n_layers: int, batch: int, seq: int, d: int = 768, vocab: int = 50257,
                    rank: int = LORA_RANK) -> dict[str, float]:
    """Exact-enough FLOPs of one LoRA training step on a packed (batch, seq) block (multiply-add = 2).

    Per token, forward: 24 d^2 per block (qkv 6d^2, attention proj 2d^2, MLP 16d^2), the head 2 d V, LoRA
    2 r (in + out) per adapted Linear = 32 r d per block, and causal attention 2 d (seq + 1) per block
    (QK^T and AV over (seq + 1) / 2 keys on average). Backward: input gradients of every matmul (= forward
    FLOPs), both gradients of the LoRA matmuls (2x their forward), attention twice its forward; no weight
    gradients for the frozen base. Norms, GELU, softmax and the optimizer (< 1%) are left out.
    """
    tokens = batch * seq
    base = 24 * d * d * n_layers + 2 * d * vocab
    lora = 32 * rank * d * n_layers
    attention = 2 * d * (seq + 1) * n_layers
    forward = tokens * (base + lora + attention)
    backward = tokens * (base + 2 * lora + 2 * attention)
    return {"forward": float(forward), "backward": float(backward), "total": float(forward + backward)}
