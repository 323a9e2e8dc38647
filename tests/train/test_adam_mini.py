"""use_adam_mini: LLaMA-Factory 0.9.5's Adam-mini (`_create_adam_mini_optimizer`, train/trainer_utils.py: adam-mini's
Adam_mini over model.named_parameters() with hidden_size, num_attention_heads, num_key_value_heads from the config)
and adam-mini 1.1.1's step (pipeline.train.adam_mini).

Golden: adam_mini/adam_mini.py of the adam-mini 1.1.1 wheel re-written below as AdamMiniReference (line numbers
quoted), stepping transformers' own model of the same checkpoint by its own parameter names; on one process
(torch.cuda.device_count() is 0 or the run is not sharded), so its all_gather / all_reduce branches never run.
"""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.lora import family_of_model
from pipeline.model.weights import load_model
from pipeline.recipe.args import train_args
from pipeline.train.adam_mini import AdamMini, adam_mini_groups
from pipeline.train.optim import describe, make_optimizer, train_groups
from tests.train.test_galore import resume_is_exact
from tests.train.test_muon import refused, refused_with_a_deepspeed_json

LR, DECAY, BETAS, EPS = 1e-2, 0.1, (0.9, 0.95), 1e-6


class AdamMiniReference:
    """adam_mini.py's Adam_mini (1.1.1) on one process, for named parameters: its name sets (lines 115-128), its
    decay rule (141-144) and its four update branches (230-250 bias, 251-283 q/k, 284-323 rows, 325-402 rest)."""

    embd, output = {"embed", "embd", "wte"}, {"lm_head", "output", "final_layer"}
    wqk, wv = {"k_proj", "q_proj", "wq", "wk", "query", "key"}, {"v_proj", "wv", "value"}
    attn_proj, mlp = {"o_proj", "wo", "attn.proj"}, {"feed_forward", "linear", "mlp"}

    def __init__(self, named, lr, betas, eps, weight_decay, dim, n_heads):
        self.params = [(n.lower(), p, 0.0 if "norm" in n.lower() or "ln" in n.lower() or "bias" in n.lower()
                        else weight_decay) for n, p in named if p.requires_grad]
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.head_numel = dim * dim // n_heads  # line 93
        self.state = {}

    @torch.no_grad()
    def step(self):
        beta1, beta2, lr, eps = self.beta1, self.beta2, self.lr, self.eps
        for name, p, wd in self.params:
            if p.grad is None:
                continue
            state = self.state.setdefault(id(p), {})
            grad = p.grad
            if "bias" in name:  # lines 230-250: Adam per element
                if not state:
                    state.update(m=torch.zeros_like(p), step=0, v=torch.zeros_like(p))
                state["v"].mul_(beta2).addcmul_(grad, grad.conj(), value=1 - beta2)
                state["step"] += 1
                if wd > 0.0:
                    p.mul_(1 - lr * wd)
                state["m"].lerp_(grad, 1 - beta1)
                h = (state["v"].sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(eps)
                p.addcdiv_(state["m"], h, value=-(lr / (1 - beta1 ** state["step"])))
                continue
            if any(w in name for w in self.wqk):  # lines 251-283: one block per head_numel elements
                blocks = lambda t: t.view(-1, self.head_numel)  # noqa: E731
            elif any(w in name for s in (self.embd, self.output, self.wv, self.mlp, self.attn_proj) for w in s):
                blocks = lambda t: t  # noqa: E731  (lines 284-323: one block per row)
            else:  # lines 325-402: the whole tensor
                blocks = None
            if not state:
                m = torch.zeros_like(p)
                state.update(m=blocks(m) if blocks else m, step=0)
                state["vmean"] = (torch.zeros_like(state["m"][:, 0:1]) if blocks
                                  else torch.zeros_like(torch.sum(p * p)))
            if blocks:
                g = blocks(grad)
                tmp_lr = torch.mean(g * g, dim=1, keepdim=True)
            else:
                g = grad
                tmp_lr = torch.sum(grad * grad) / float(p.numel())
            state["vmean"].mul_(beta2).add_(tmp_lr, alpha=1 - beta2)
            state["step"] += 1
            if wd > 0.0:
                p.mul_(1 - lr * wd)
            state["m"].lerp_(g, 1 - beta1)
            h = (state["vmean"].sqrt() / math.sqrt(1 - beta2 ** state["step"])).add_(eps)
            stepsize = (1 / (1 - beta1 ** state["step"])) / h
            update = (state["m"] * stepsize).view(p.size())
            update.mul_(lr)
            p.add_(-update)


def reference_for(hf, named=None):
    """AdamMiniReference over a transformers model as LLaMA-Factory builds it (its config's width and heads)."""
    c = hf.config
    return AdamMiniReference(named or hf.named_parameters(), LR, BETAS, EPS, DECAY, c.hidden_size,
                             c.num_attention_heads)


def args(**keys):
    return train_args({"learning_rate": LR, "weight_decay": DECAY, "use_adam_mini": True, "adam_beta1": BETAS[0],
                       "adam_beta2": BETAS[1], "adam_epsilon": EPS, **keys})


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_three_steps_equal_adam_minis_on_transformers_model_bitwise(checkpoints, family):
    """Our model of the checkpoint and transformers' get the same gradients (GPT-2's Conv1D ones transposed, as our
    weights are): after each step every tensor is adam_mini's to the bit. Qwen2 (GQA: 4 query heads, 2 key/value
    groups) has q/k blocks by head, q/k/v biases by element, v/o/MLP/the tied embedding by row, norms whole; GPT-2's
    MLP by transformers' rows (our columns), its fused c_attn, attention c_proj and wpe whole."""
    import transformers

    path = checkpoints[family][0]  # transformers' model read afresh: other tests wrap the fixture's in PEFT
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    ours = load_model(path).float()
    to_hf, conv1d = family_of_model(ours).to_hf, family_of_model(ours).is_conv1d
    optimizer = make_optimizer(ours, args())
    assert isinstance(optimizer, AdamMini)
    reference = reference_for(hf)
    theirs = dict(hf.named_parameters())
    pairs = [(n, p, theirs[to_hf(n)]) for n, p in ours.named_parameters()]
    assert len(pairs) == len(theirs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for name, p, q in pairs:
            q.grad = torch.randn(q.shape, generator=gen) * 1e-2
            p.grad = q.grad.t().clone() if conv1d(name) else q.grad.clone()
        optimizer.step()
        reference.step()
        for name, p, q in pairs:
            assert torch.equal(p, q.t() if conv1d(name) else q), name


def test_groups_name_each_block_kind_and_its_decay(checkpoints):
    path, _ = checkpoints["qwen2"]
    groups = train_groups(load_model(path), args())
    assert [(g["block"], g["weight_decay"]) for g in groups] == [("rows", DECAY), ("whole", 0.0), ("heads", DECAY),
                                                                 ("adam", 0.0)]
    assert groups[2]["head_numel"] == 32 * 32 // 4
    assert describe(groups) == ("11 tensors by Adam-mini (rows) at lr 0.01, weight decay 0.1 | 5 tensors by "
                                "Adam-mini (whole) at lr 0.01, weight decay 0 | 4 tensors by Adam-mini (heads) at "
                                "lr 0.01, weight decay 0.1 | 6 tensors by Adam-mini (adam) at lr 0.01, weight decay 0")
    assert isinstance(make_optimizer(load_model(path), args(use_adam_mini=False)), torch.optim.AdamW)


def test_a_query_matrix_that_adam_mini_cannot_cut_into_heads_is_the_recipes_error():
    """adam_mini fails on view(-1, dim^2 / n_heads) here; the recipe is told which weight and why."""
    weight = torch.nn.Parameter(torch.zeros(6, 7))
    with pytest.raises(UserError, match=r"q_proj.weight has 42 elements, no multiple of .* = 16"):
        adam_mini_groups([("q_proj.weight", weight)], str, lambda n: False, DECAY, LR, 16)


def test_what_adam_mini_cannot_do_here_is_refused_where_the_recipe_says_so(tmp_path):
    from tests.acceptance.harness import write_data, write_recipe

    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          finetuning_type="lora", use_adam_mini=True, zero_stage=2, use_muon=True,
                          loraplus_lr_ratio=16.0)
    lines = recipe.read_text().splitlines()
    at = {key: f"r.yaml:{next(i for i, line in enumerate(lines, 1) if line.startswith(key + ':'))}:"
          for key in ("zero_stage", "use_adam_mini", "use_muon", "loraplus_lr_ratio")}
    err = refused(["validate", str(recipe)], tmp_path)
    assert (f"{at['zero_stage']}13: zero_stage: given 2 with use_adam_mini: true: Adam-mini needs zero_stage 0: it "
            "keeps one second moment per row or attention head") in err, err
    assert (f"{at['use_adam_mini']}16: use_adam_mini: given true with finetuning_type: lora: Adam-mini's blocks are "
            "rows and attention heads of whole weight matrices, which LoRA freezes") in err, err
    assert (f"{at['use_muon']}11: use_muon: given true with use_adam_mini: true: Muon and Adam-mini are two "
            "optimizers") in err, err
    assert (f"{at['loraplus_lr_ratio']}20: loraplus_lr_ratio: given 16.0 with use_adam_mini: true: LoRA+ and "
            "Adam-mini are two optimizers") in err, err
    refused_with_a_deepspeed_json(tmp_path, 3, "use_adam_mini", "Adam-mini")


@pytest.mark.slow  # ~15 s (35 s on a loaded machine): three runs of a tiny Llama, as GaLore's and APOLLO's
def test_interrupted_and_resumed_adam_mini_run_equals_uninterrupted_bitwise(make_recipe, workdir):
    """The moments (per element, per row, per head, whole) and step counts come back from the checkpoint."""
    resume_is_exact(make_recipe, workdir, use_adam_mini=True)
