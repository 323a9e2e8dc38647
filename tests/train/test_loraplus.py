"""LoRA+ (loraplus_lr_ratio): LLaMA-Factory 0.9.5's parameter groups, one AdamW step, the schedule's ratios.

Goldens: the groups LLaMA-Factory's `_create_loraplus_optimizer` (src/llamafactory/train/trainer_utils.py, copied
below as LF_RULE with transformers' own get_parameter_names) forms over PEFT's model of the same base and adapter;
a hand-written name -> (lr, weight decay) table; and a torch AdamW built by hand with those groups.
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline.model.build import FinetuneArgs, apply_finetuning_type
from pipeline.model.lora import family_of_model, lora_modules, lora_state_dict
from pipeline.names import PEFT_PREFIX
from pipeline.model.weights import load_model
from pipeline.recipe.args import train_args
from pipeline.train.optim import make_optimizer
from pipeline.train.schedule import make_scheduler

LR, RATIO, DECAY = 2e-3, 16.0, 0.1


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """(directory, model): a tiny GPT-2 written by transformers' save_pretrained."""
    from tests.acceptance.harness import write_hf_checkpoint

    path = tmp_path_factory.mktemp("hf") / "gpt2"
    return path, write_hf_checkpoint(path, "gpt2", vocab_size=512)


def lf_groups(model, lr: float, ratio: float, weight_decay: float) -> list[dict]:
    """LLaMA-Factory 0.9.5's LoRA+ param_groups (train/trainer_utils.py:372-406, `_create_loraplus_optimizer`, its
    loop verbatim; `_get_decay_parameter_names` :193-197; loraplus_lr_embedding's default 1e-6), empty ones
    included, as it hands them to `optim`'s class."""
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    decay_names = [n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if "bias" not in n]
    param_dict: dict[str, list] = {"lora_a": [], "lora_b": [], "lora_b_nodecay": [], "embedding": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            if "lora_embedding_B" in name:
                param_dict["embedding"].append(param)
            elif "lora_B" in name or param.ndim == 1:
                if name in decay_names:
                    param_dict["lora_b"].append(param)
                else:
                    param_dict["lora_b_nodecay"].append(param)
            else:
                param_dict["lora_a"].append(param)
    return [dict(params=param_dict["lora_a"], lr=lr, weight_decay=weight_decay),
            dict(params=param_dict["lora_b"], lr=lr * ratio, weight_decay=weight_decay),
            dict(params=param_dict["lora_b_nodecay"], lr=lr * ratio, weight_decay=0.0),
            dict(params=param_dict["embedding"], lr=1e-6, weight_decay=weight_decay)]


def lf_rule(model, lr: float, ratio: float, weight_decay: float) -> dict[str, tuple[float, float]]:
    """LLaMA-Factory 0.9.5's LoRA+ groups (lf_groups): parameter name -> (lr, weight decay)."""
    where = {id(p): (g["lr"], g["weight_decay"]) for g in lf_groups(model, lr, ratio, weight_decay) for p in g["params"]}
    return {name: where[id(p)] for name, p in model.named_parameters() if p.requires_grad}


def ours(path, use_dora=False, **keys):
    """Our model as `train` builds it: the checkpoint, LoRA on every Linear, the final norm trained in full."""
    ft = FinetuneArgs(finetuning_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all",
                      use_rslora=False, use_dora=use_dora, additional_target=["ln_f"], freeze_trainable_layers=1,
                      adapter_name_or_path=None, seed=3)
    model = apply_finetuning_type(load_model(path), ft)
    args = train_args({"learning_rate": LR, "weight_decay": DECAY, "loraplus_lr_ratio": RATIO,
                       "lr_scheduler_type": "linear", "total_steps": 10, "num_warmup_steps": 2, **keys})
    return model, args


def table(optimizer) -> dict[int, tuple[float, float]]:
    return {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_groups_are_llamafactorys_over_the_same_peft_model(hf_dir):
    peft = pytest.importorskip("peft")
    path, hf = hf_dir
    model, args = ours(path)
    optimizer = make_optimizer(model, args)
    got = table(optimizer)
    named = dict(model.named_parameters())
    # by hand, LLaMA-Factory's rule: B fast and decayed, A slow and decayed, the LayerNorm's gain and bias fast
    # and not decayed
    expected = {"lora.B": (LR * RATIO, DECAY), "lora.A": (LR, DECAY), "norm.weight": (LR * RATIO, 0.0),
                "norm.bias": (LR * RATIO, 0.0)}
    for name, p in named.items():
        if p.requires_grad:
            suffix = next(s for s in expected if name.endswith(s))
            assert got[id(p)] == pytest.approx(expected[suffix]), name
    assert sum(p.requires_grad for p in named.values()) == len(got) == 2 * 4 * 2 + 2  # 4 Linears x 2 blocks

    # LLaMA-Factory's own loop over PEFT's model of the same adapter: the same (lr, decay, size) multiset
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], modules_to_save=["ln_f"],
                             fan_in_fan_out=True)
    theirs_model = peft.get_peft_model(hf, config)
    theirs = lf_rule(theirs_model, LR, RATIO, DECAY)
    sizes = dict(theirs_model.named_parameters())
    want = Counter((round(lr, 12), wd, sizes[n].numel()) for n, (lr, wd) in theirs.items())
    have = Counter((round(g[0], 12), g[1], named_p.numel()) for named_p in named.values() if named_p.requires_grad
                   for g in [got[id(named_p)]])
    assert have == want


@pytest.mark.parametrize("ratio", [RATIO, None], ids=["loraplus", "plain"])
def test_dora_magnitudes_are_grouped_as_llamafactory_and_transformers_do(hf_dir, ratio):
    """DoRA's magnitude vector is 1-D but neither a bias nor a LayerNorm gain: LLaMA-Factory's LoRA+ rule puts it
    with B (lr x ratio) and decays it, and without LoRA+ transformers' Trainer (get_decay_parameter_names, the
    same names) decays it at learning_rate. Golden: both rules over PEFT's DoRA model of the same adapter."""
    peft = pytest.importorskip("peft")
    path, hf = hf_dir
    model, args = ours(path, use_dora=True, loraplus_lr_ratio=ratio)
    named = dict(model.named_parameters())
    got = table(make_optimizer(model, args))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], modules_to_save=["ln_f"],
                             fan_in_fan_out=True, use_dora=True)
    theirs_model = peft.get_peft_model(hf, config)
    theirs = lf_rule(theirs_model, LR, ratio or 1.0, DECAY)
    sizes = dict(theirs_model.named_parameters())
    magnitudes = [n for n in theirs if "lora_magnitude_vector" in n]
    assert magnitudes and all(theirs[n] == pytest.approx((LR * (ratio or 1.0), DECAY)) for n in magnitudes)
    want = Counter((round(lr, 12), wd, sizes[n].numel()) for n, (lr, wd) in theirs.items())
    have = Counter((round(g[0], 12), g[1], p.numel()) for p in named.values() if p.requires_grad for g in [got[id(p)]])
    assert have == want


def test_one_step_equals_a_hand_built_adamw_with_those_groups(hf_dir):
    path, _ = hf_dir
    model, args = ours(path)
    twin, _ = ours(path)
    x = torch.randint(0, 512, (2, 12))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for m in (model, twin):  # eval mode: no dropout, the same gradients in both
        m.eval()
        m(x, labels=x).backward()
    named = {n: p for n, p in twin.named_parameters() if p.requires_grad}
    groups = [{"params": [p for n, p in named.items() if n.endswith("lora.A")], "lr": LR, "weight_decay": DECAY},
              {"params": [p for n, p in named.items() if n.endswith("lora.B")], "lr": LR * RATIO,
               "weight_decay": DECAY},
              {"params": [p for n, p in named.items() if p.dim() == 1], "lr": LR * RATIO, "weight_decay": 0.0}]
    reference = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=1e-8, foreach=False)
    make_optimizer(model, args).step()
    reference.step()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-6), name
    step = {n: (p - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    # Adam's first step moves each weight with a gradient by about its group's lr
    assert max(v for n, v in step.items() if n.endswith("lora.B")) == pytest.approx(LR * RATIO, rel=0.05)
    for name, p in model.named_parameters():  # A's gradient is 0 while B is 0: only the decay moves it
        if name.endswith("lora.A"):
            assert torch.allclose(p, before[name] * (1 - LR * DECAY), atol=1e-8, rtol=1e-6), name


def test_the_schedule_keeps_every_groups_ratio(hf_dir):
    path, _ = hf_dir
    model, args = ours(path)
    optimizer = make_optimizer(model, args)
    scheduler = make_scheduler(optimizer, args)
    for step in range(6):
        slow, fast, vectors = (g["lr"] for g in optimizer.param_groups)
        # linear warmup over 2 steps, then linear decay to 0 at step 10: the factor by hand
        factor = step / 2 if step < 2 else 1 - (step - 2) / 8
        assert slow == pytest.approx(LR * factor) and fast == vectors == pytest.approx(LR * RATIO * factor)
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("optim", ["sgd", "adagrad", "rmsprop", "adafactor"])
def test_each_optim_steps_as_llamafactorys_loraplus_groups_of_transformers_optimizer(hf_dir, optim):
    """LoRA+ with `optim`: LLaMA-Factory's `_create_loraplus_optimizer` takes optim's class and kwargs from
    transformers' Trainer.get_optimizer_cls_and_kwargs and builds lf_groups over PEFT's model of the same adapter
    (GPT-2: Conv1D, fan_in_fan_out; the final LayerNorm trained in full). Ours is the same class with the same
    (lr, weight decay) per tensor, and three steps with the same gradients (PEFT's backward, copied into ours in our
    layout: A and B stored transposed, which Adafactor factors as PEFT's rows and columns) leave every trained tensor
    equal, bit for bit."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    path, _ = hf_dir
    model, args = ours(path, optim=optim, lr_scheduler_type="constant", num_warmup_steps=0)
    hf = AutoModelForCausalLM.from_pretrained(path)  # a fresh one: PEFT wraps the fixture's in place
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], modules_to_save=["ln_f"],
                             fan_in_fan_out=True, lora_dropout=0.0)
    theirs = peft.get_peft_model(hf, config)
    assert not peft.set_peft_model_state_dict(theirs, lora_state_dict(model)).unexpected_keys
    training = TrainingArguments(output_dir=str(path.parent / "hf-out"), optim=optim, learning_rate=LR,
                                 weight_decay=DECAY, report_to=[])
    optim_class, optim_kwargs = Trainer.get_optimizer_cls_and_kwargs(training)
    golden = optim_class(lf_groups(theirs, LR, RATIO, DECAY), **optim_kwargs)
    optimizer = make_optimizer(model, args)
    assert type(optimizer).__name__ == type(golden).__name__

    family = family_of_model(model)
    peft_named = {n.replace(".modules_to_save.default", "").replace(".default", ""): p
                  for n, p in theirs.named_parameters() if p.requires_grad}
    pairs = []  # (ours, PEFT's, stored transposed)
    for name, wrapper in lora_modules(model).items():
        for suffix, (p, flipped) in wrapper.peft_params().items():
            pairs.append((p, peft_named.pop(f"{PEFT_PREFIX}{family.to_hf(name)}.{suffix}"), flipped))
    for name in model._lora_additional:
        for pname, p in model.get_submodule(name).named_parameters():
            pairs.append((p, peft_named.pop(f"{PEFT_PREFIX}{family.to_hf(name)}.{pname}"), False))
    assert not peft_named and len(pairs) == sum(p.requires_grad for p in model.parameters())
    lf_table = {id(q): (g["lr"], g["weight_decay"]) for g in golden.param_groups for q in g["params"]}
    assert all(table(optimizer)[id(p)] == pytest.approx(lf_table[id(q)]) for p, q, _ in pairs)
    theirs.eval()
    starts = [q.detach().clone() for _, q, _ in pairs]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(0, 512, (2, 12), generator=gen)
        theirs(input_ids=ids, labels=ids).loss.backward()
        for p, q, flipped in pairs:
            p.grad = (q.grad.t() if flipped else q.grad).clone(memory_format=torch.contiguous_format)  # our layout
        golden.step()
        optimizer.step()
        theirs.zero_grad(set_to_none=True)
        for p, q, flipped in pairs:
            assert torch.equal(p.detach(), q.detach().t() if flipped else q.detach())
    assert all(not torch.equal(q, start) for (_, q, _), start in zip(pairs, starts))  # every tensor moved


def test_without_loraplus_the_groups_are_as_before(hf_dir):
    path, _ = hf_dir
    model, args = ours(path, loraplus_lr_ratio=None)
    groups = make_optimizer(model, args).param_groups
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups] == [(LR, DECAY, 16), (LR, 0.0, 2)]


def transformers_decays(model) -> set[str]:
    """transformers' Trainer.get_decay_parameter_names (5.x) on `model`: the decayed names (it reads no Trainer
    state, so no Trainer is built)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_full_finetuning_decays_what_transformers_trainer_decays(tmp_path, family):
    """RMSNorm gains (also Qwen3's q_norm / k_norm) and Qwen2's q/k/v biases are not decayed, every matrix is:
    golden, transformers' rule over the same checkpoint's transformers model, names mapped by the family."""
    from pipeline.model.families import FAMILIES
    from pipeline.train.optim import param_groups
    from tests.acceptance.harness import write_hf_checkpoint

    hf = write_hf_checkpoint(tmp_path, family, vocab_size=512)
    ft = FinetuneArgs(finetuning_type="full", lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all",
                      use_rslora=False, use_dora=False, additional_target=None, freeze_trainable_layers=1,
                      adapter_name_or_path=None, seed=3)
    model = apply_finetuning_type(load_model(tmp_path), ft)
    fam = FAMILIES[model.cfg.family]
    decayed = {fam.to_hf(n) for g in param_groups(model.named_parameters(), DECAY, LR) if g["weight_decay"]
               for n, p in model.named_parameters() if any(p is q for q in g["params"])}
    assert decayed == transformers_decays(hf) & {n for n, _ in hf.named_parameters()}
    assert any(n.endswith("norm.weight") for n, _ in hf.named_parameters() if n not in decayed)


def test_loraplus_on_rmsnorm_and_dora_decays_as_transformers_trainer(tmp_path):
    """Qwen3 with LoRA+ and DoRA, the final RMSNorm and the blocks' q_norm trained in full (additional_target):
    B, the magnitudes and the norms at lr x ratio, the norms not decayed. Golden: PEFT's model of the same adapter,
    LLaMA-Factory's lr split ("lora_B" or 1-D) and transformers' decay rule, as (lr, decay, size) multisets."""
    peft = pytest.importorskip("peft")
    from tests.acceptance.harness import write_hf_checkpoint

    hf = write_hf_checkpoint(tmp_path, "qwen3", vocab_size=512)
    ft = FinetuneArgs(finetuning_type="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0, lora_target="all",
                      use_rslora=False, use_dora=True, additional_target=["model.norm", "q_norm"],
                      freeze_trainable_layers=1, adapter_name_or_path=None, seed=3)
    model = apply_finetuning_type(load_model(tmp_path), ft)
    args = train_args({"learning_rate": LR, "weight_decay": DECAY, "loraplus_lr_ratio": RATIO,
                       "lr_scheduler_type": "linear", "total_steps": 10, "num_warmup_steps": 2})
    got = table(make_optimizer(model, args))
    have = Counter((round(got[id(p)][0], 12), got[id(p)][1], p.numel()) for p in model.parameters() if p.requires_grad)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["model.norm", "q_norm"],
                             use_dora=True)
    theirs = peft.get_peft_model(hf, config)
    decay = transformers_decays(theirs)
    want = Counter((round(LR * RATIO if "lora_B" in n or p.ndim == 1 else LR, 12), DECAY if n in decay else 0.0,
                    p.numel()) for n, p in theirs.named_parameters() if p.requires_grad)
    assert have == want
    assert (round(LR * RATIO, 12), 0.0, 16) in have  # a q_norm gain (head_dim 16): fast, not decayed
