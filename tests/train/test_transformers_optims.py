"""optim sgd / adagrad / rmsprop / adafactor: the optimizers transformers' Trainer builds for those names
(pipeline.train.optim, pipeline.train.adafactor), their recipe rules and their ZeRO stages.

Golden: transformers' own Trainer.create_optimizer (trainer.py; trainer_optimizer.py `_get_sgd`, `_get_adagrad`,
`_get_rmsprop`, `_get_adafactor`) over transformers' GPT-2 of the same checkpoint, given the same gradients each step
(transformers' backward, copied into our model in our layout: GPT-2's Conv1D weights transposed), stepped beside
ours. Same gradients, same arithmetic: the weights after every step are equal, bit for bit.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline.model.lora import family_of_model
from pipeline.model.weights import load_model
from pipeline.recipe.args import train_args
from pipeline.runtime.log import read_log
from pipeline.train.optim import make_optimizer
from pipeline.train.run import train
from pipeline.train.schedule import make_scheduler
from tests.train.helpers import BASE_PT

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers' Trainer needs it, on a CPU too

LR, DECAY = 1e-2, 0.1


# optim_args as transformers' Trainer (5.x trainer_optimizer.py _parse_optim_args, _get_sgd / _get_adagrad /
# _get_rmsprop) reads it: spaces dropped, flags true for "true" / "1" / "yes" in any case; weight_decay overridden by
# the decay groups, keys it does not read (foo, initial_accumulator_value, all of adafactor's) ignored
OPTIM_ARGS = [("sgd", None), ("sgd", "momentum=0.9, nesterov=True,dampening=0,weight_decay=0.5,foo=1"),
              ("adagrad", None), ("adagrad", "lr_decay=0.5,eps=1e-3,initial_accumulator_value=1"),
              ("rmsprop", None), ("rmsprop", "momentum=0.5,alpha=0.9,eps=1e-4,centered=YES"),
              ("adafactor", None), ("adafactor", "beta1=0.9")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "pure-bf16"])
@pytest.mark.parametrize("optim, optim_args", OPTIM_ARGS, ids=[f"{o}-{a}" if a else o for o, a in OPTIM_ARGS])
def test_each_step_is_transformers_trainers_optimizer_bitwise(checkpoints, tmp_path, optim, optim_args, dtype):
    """Three steps with weight decay (so the decay groups matter: biases and LayerNorm gains are not decayed) on
    GPT-2, whose Conv1D weights are stored transposed here (Adafactor factors them by transformers' rows and
    columns), each optimizer's rate driven by the recipe's schedule beside transformers' get_scheduler (cosine, one
    warmup step: the first step's rate is 0). In bf16 (pure_bf16's weights, stepped by the optimizer itself):
    torch's three keep bf16 state, transformers' Adafactor upcasts the gradient, the weight and its statistics to
    float32 for the update and copies the weight back. Between steps 2 and 3 our optimizer goes through
    state_dict / load_state_dict, as a resume does, and step 3 still equals the uninterrupted golden's (torch's
    load_state_dict would cast Adafactor's float32 statistics to the bf16 weights' dtype)."""
    path, _ = checkpoints["gpt2"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    ours = load_model(path).to(dtype)
    family = family_of_model(ours)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), optim=optim, learning_rate=LR,
                                          weight_decay=DECAY, report_to=[], optim_args=optim_args)
    golden = transformers.Trainer(model=hf, args=args).create_optimizer()
    their_schedule = transformers.get_scheduler("cosine", golden, num_warmup_steps=1, num_training_steps=4)
    settings = train_args({"optim": optim, "optim_args": optim_args, "learning_rate": LR, "weight_decay": DECAY, "lr_scheduler_type": "cosine",
                          "total_steps": 4, "num_warmup_steps": 1, "min_lr_ratio": 0.0})
    optimizer = make_optimizer(ours, settings)
    schedule = make_scheduler(optimizer, settings)
    assert type(optimizer).__name__ == type(golden).__name__
    if optim != "adafactor":  # the same constructor arguments (optim_args' momentum, nesterov, eps, ... included)
        assert optimizer.defaults == golden.defaults
    theirs = dict(hf.named_parameters())
    pairs = [(p, theirs[family.to_hf(name)], family.is_conv1d(name)) for name, p in ours.named_parameters()]
    assert len(pairs) == len(theirs)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        if step == 2:  # a resume's round trip of the state (DeepSpeed hands the client optimizer its state dict)
            optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        ids = torch.randint(0, 256, (2, 12), generator=gen)
        hf(ids, labels=ids).loss.backward()
        for p, q, flipped in pairs:
            p.grad = (q.grad.t() if flipped else q.grad).clone(memory_format=torch.contiguous_format)  # our layout
        golden.step()
        optimizer.step()
        their_schedule.step()
        schedule.step()
        hf.zero_grad(set_to_none=True)
        for p, q, flipped in pairs:
            assert torch.equal(p.detach(), q.detach().t() if flipped else q.detach())
    start = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).state_dict()
    moved = [not torch.equal(start[k], v) for k, v in hf.state_dict().items()]
    assert all(moved) if dtype == torch.float32 else any(moved)  # bf16 SGD's smallest steps round to nothing
    if optim == "adafactor":  # float32 statistics whatever the weights' dtype, as transformers keeps them
        assert {v.dtype for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)} == {torch.float32}


def test_adafactor_factors_loras_matrices_as_peft_stores_them(checkpoints):
    """LoRA's A (in x r here, r x in in PEFT) and B are stored transposed: Adafactor's groups say so, and its row
    and column means are PEFT's rows' and columns'."""
    from pipeline.model.build import FinetuneArgs, apply_finetuning_type

    ft = FinetuneArgs(finetuning_type="lora", lora_rank=2, lora_alpha=4, lora_dropout=0.0, lora_target="q_proj",
                      use_rslora=False, use_dora=False, additional_target=None, freeze_trainable_layers=1,
                      adapter_name_or_path=None, seed=3)
    model = apply_finetuning_type(load_model(checkpoints["qwen2"][0]), ft)
    optimizer = make_optimizer(model, train_args({"optim": "adafactor", "learning_rate": LR}))
    assert [(len(g["params"]), g["transposed"]) for g in optimizer.param_groups] == [(4, True)]
    a = model.layers[0].self_attn.q_proj.lora.A
    a.grad, model.layers[0].self_attn.q_proj.lora.B.grad = torch.ones_like(a), None
    optimizer.step()
    state = optimizer.state[a]
    assert state["exp_avg_sq_row"].shape == (a.shape[1],) and state["exp_avg_sq_col"].shape == (a.shape[0],)


SMALL = dict(per_device_train_batch_size=2, gradient_accumulation_steps=1)  # bf16 matmuls are slow on a CPU
# the bf16 mixed-precision runs: each optimizer with the optim_args that give it every kind of state it has
MIXED = [("adafactor", None), ("sgd", "momentum=0.9,nesterov=True"), ("adagrad", "lr_decay=0.5,eps=1e-3"),
         ("rmsprop", "momentum=0.5,alpha=0.9,centered=YES")]


@pytest.mark.parametrize("optim, optim_args", MIXED, ids=[o for o, _ in MIXED])
def test_bf16_mixed_precision_steps_the_fp32_masters_as_transformers_optimizer(make_recipe, monkeypatch, capsys, optim,
                                                                                optim_args):
    """bf16: true at ZeRO 0 (no pure_bf16): DeepSpeed's FP16_UnfusedOptimizer keeps bf16 weights and one fp32
    master per tensor (its shape kept, so Adafactor factors it; the group's `transposed` flag goes with it) and
    steps our optimizer on the masters with their fp32 gradients. Each step's masters and gradients going in are
    recorded and replayed on transformers' optimizer (its Trainer's class and kwargs,
    Trainer.get_optimizer_cls_and_kwargs, optim_args included) over copies in transformers' layout, with the recorded
    groups' rates and decays: its masters coming out equal ours bit for bit, step after step, the first one included
    (DeepSpeed's start-up step with zero gradients is skipped: pipeline.train.optim.no_startup_step). The state is
    the masters' (float32). For SGD, Adagrad and RMSprop, two more runs of the recipe: one resumed from the checkpoint
    the run saved after step 2 ends with its weights, masters and optimizer state, bit for bit; ZeRO 2 (offloaded:
    DeepSpeed steps the client optimizer on the CPU's flat fp32 partitions) keeps the recipe's groups and ends with
    ZeRO 0's masters, state and losses, bit for bit. No clipping (max_grad_norm 0): DeepSpeed's ZeRO 0 sums the
    gradient norm tensor by tensor, ZeRO 2 over its flat partitions, and the factors part in the sixth digit.
    Failed before: Adagrad's constructor-made state, keyed by the bf16 weights, stopped the first checkpoint's
    save (KeyError); at ZeRO 2 DeepSpeed swapped it for an Adagrad of one group (IndexError at the first step)."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    from pipeline.model.optimizer_state import OTHER_OPTIMS
    from pipeline.train.adafactor import Adafactor

    ours = Adafactor if optim == "adafactor" else getattr(torch.optim, OTHER_OPTIMS[optim])
    steps: list[list[tuple[dict, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]]] = []
    original = ours.step

    def recorded(self, closure=None):
        groups = [({k: v for k, v in g.items() if k != "params"}, [(p, p.detach().clone(), p.grad.clone())
                                                                   for p in g["params"]]) for g in self.param_groups]
        loss = original(self, closure)
        steps.append([(g, [(before, grad, p.detach().clone()) for p, before, grad in ps]) for g, ps in groups])
        return loss

    monkeypatch.setattr(ours, "step", recorded)
    keys = dict(bf16=True, optim=optim, optim_args=optim_args, weight_decay=DECAY, learning_rate=1e-3, max_steps=3,
                warmup_steps=0, val_size=0.0, max_grad_norm=0.0, save_steps=2, **SMALL)
    result = train(make_recipe(BASE_PT, name="mixed", **keys))
    monkeypatch.setattr(ours, "step", original)  # the golden and the runs below step unrecorded
    engine = result.engine
    assert type(engine.optimizer) is FP16_UnfusedOptimizer and type(engine.optimizer.optimizer) is ours
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    masters = [p for g in engine.optimizer.optimizer.param_groups for p in g["params"]]
    assert {p.dtype for p in masters} == {torch.float32} and len(steps) == 3
    state = engine.optimizer.optimizer.state
    assert state.keys() == set(masters)  # the masters' state alone
    assert {v.dtype for p in masters for v in state[p].values() if torch.is_tensor(v)} == {torch.float32}

    args = transformers.TrainingArguments(output_dir=str(result.output_dir / "hf"), optim=optim, optim_args=optim_args,
                                          learning_rate=1e-3, weight_decay=DECAY, report_to=[])
    cls, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args)
    flip = [g.get("transposed", False) for g, _ in steps[0]]
    copies = [[(before.t() if f else before).clone().requires_grad_() for before, _, _ in ps]
              for f, (_, ps) in zip(flip, steps[0])]
    golden = cls([{"params": c, "lr": g["lr"], "weight_decay": g["weight_decay"]} for c, (g, _) in zip(copies, steps[0])],
                 **kwargs)
    assert any(flip) and not all(flip) if optim == "adafactor" else not any(flip)  # GPT-2's Conv1D: transposed
    for step in steps:
        for group, (g, ps), c, f in zip(golden.param_groups, step, copies, flip):
            group["lr"] = g["lr"]  # the schedule's rate at this step
            for (before, grad, _), q in zip(ps, c):
                assert torch.equal(q.detach(), before.t() if f else before)  # nothing else moved the masters
                q.grad = (grad.t() if f else grad).contiguous()
        golden.step()
        for (g, ps), c, f in zip(step, copies, flip):
            for (_, _, after), q in zip(ps, c):
                assert torch.equal(q.detach(), after.t() if f else after)
    losses = [r["loss"] for r in read_log(result.output_dir / "trainer_log.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    if optim == "adafactor":  # ZeRO 0 only; its pure_bf16 resume: tests/train/test_checkpoint_resume.py
        return

    assert_same_state(resumed_at_step_2(make_recipe, result, "mixed-resumed", keys).engine, engine)

    # ZeRO 2 (offloaded: DeepSpeed steps the client optimizer on the CPU's fp32 partitions) trains as ZeRO 0
    capsys.readouterr()
    zero2 = train(make_recipe(BASE_PT, name="mixed-zero2", **keys | dict(zero_stage=2, offload_optimizer="cpu",
                                                                         save_steps=1000)))
    pairs = ", ".join(optim_args.split(",")).replace("YES", "True").replace("1e-3", "0.001")
    assert f"optimizer: {OTHER_OPTIMS[optim]} (optim {optim}, {pairs}): " in capsys.readouterr().err
    inner = zero2.engine.optimizer.optimizer
    assert type(inner) is ours and len(inner.param_groups) == len(engine.optimizer.optimizer.param_groups)
    assert [g["weight_decay"] for g in inner.param_groups] == [g["weight_decay"] for g, _ in steps[0]]
    for masters, (flat,) in zip(engine.optimizer.fp32_groups, (g["params"] for g in inner.param_groups), strict=True):
        n = sum(m.numel() for m in masters)  # ZeRO's flat partition: the group's tensors in order, then padding
        assert torch.equal(flat[:n], torch.cat([m.flatten() for m in masters]))
        assert inner.state[flat].keys() == state[masters[0]].keys()
        for key, value in inner.state[flat].items():  # the momentum buffers, sums and averages, element for element
            if value.dim():
                assert torch.equal(value[:n], torch.cat([state[m][key].flatten() for m in masters])), key
    assert [r["loss"] for r in read_log(zero2.output_dir / "trainer_log.jsonl") if "loss" in r] == losses


def resumed_at_step_2(make_recipe, straight, name: str, keys: dict):
    """A new run of `keys` from the checkpoint `straight` saved after step 2 (save_steps 2), to the end."""
    second = train(make_recipe(BASE_PT, name=name, resume_from_checkpoint=str(straight.output_dir.resolve()
                                                                                / "checkpoint-2"), **keys))
    assert second.exit_code == 0 and second.state.global_step == keys["max_steps"] == 3
    return second


def assert_same_state(engine, golden) -> None:
    """The weights, the fp32 masters where DeepSpeed keeps them, and every optimizer state tensor (momentum buffers,
    Adagrad's sum, RMSprop's square_avg and grad_avg, the step counts) of two runs are equal, bit for bit."""
    ours, theirs = (getattr(e.optimizer, "optimizer", e.optimizer) for e in (engine, golden))
    for a, b in zip(engine.module.parameters(), golden.module.parameters(), strict=True):
        assert torch.equal(a, b)
    pairs = list(zip((p for g in ours.param_groups for p in g["params"]),
                     (p for g in theirs.param_groups for p in g["params"]), strict=True))
    for p, q in pairs:
        assert torch.equal(p, q) and ours.state[p].keys() == theirs.state[q].keys() and ours.state[p]
        for key, value in ours.state[p].items():
            assert torch.equal(value, theirs.state[q][key]), key


@pytest.mark.parametrize("optim, optim_args", MIXED[1:], ids=[o for o, _ in MIXED[1:]])
def test_a_pure_bf16_run_resumes_bitwise(make_recipe, optim, optim_args):
    """pure_bf16 (the optimizer steps the bf16 weights; DeepSpeed saves its state dict as it is): resumed from the
    checkpoint it saved after step 2, the run and its optimizer state (bf16, torch's float32 step counts) equal the
    uninterrupted run's, bit for bit. (A SIGTERM saves through the same Trainer.save: pipeline/train/loop.py.)"""
    from pipeline.model.optimizer_state import OTHER_OPTIMS

    keys = dict(pure_bf16=True, optim=optim, optim_args=optim_args, weight_decay=DECAY, learning_rate=LR,
                max_steps=3, warmup_steps=0, val_size=0.0, save_steps=2, **SMALL)
    straight = train(make_recipe(BASE_PT, name="straight", **keys))
    assert type(straight.engine.optimizer) is getattr(torch.optim, OTHER_OPTIMS[optim])  # no DeepSpeed wrapper
    resumed = resumed_at_step_2(make_recipe, straight, "resumed", keys)
    assert_same_state(resumed.engine, straight.engine)
    losses = [[r["loss"] for r in read_log(run.output_dir / "trainer_log.jsonl") if "loss" in r]
              for run in (straight, resumed)]
    assert losses[1] == losses[0][2:] and len(set(losses[0])) == 3  # step 3's; every step moved the bf16 weights


def refused_at(tmp_path, keys: dict, command: str = "validate") -> tuple[str, dict[str, str]]:
    """stderr of `command` on a recipe of `keys` (exit 2, no traceback) and where each key sits in it."""
    from tests.acceptance.harness import refused, write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          finetuning_type="full", **keys)
    lines = recipe.read_text().splitlines()
    at = {key: f"r.yaml:{next(i for i, line in enumerate(lines, 1) if line.startswith(key + ':'))}:" for key in keys}
    return refused(command, "r.yaml", cwd=tmp_path, as_typed=False), at


def test_adafactor_needs_zero0_and_one_optimizer_at_a_time(tmp_path):
    from tests.acceptance.harness import write_data

    write_data(tmp_path / "data")
    err, at = refused_at(tmp_path, {"optim": "adafactor", "zero_stage": 2, "use_muon": True,
                                    "optim_args": "momentum=0.9,nesterov"})
    assert (f"{at['zero_stage']}13: zero_stage: given 2 with optim: adafactor: Adafactor needs zero_stage 0: it keeps "
            "each weight matrix's second moment as the means over its rows and its columns") in err, err
    assert "set zero_stage: 0" in err and "or set optim: adamw_torch" in err
    assert (f"{at['use_muon']}11: use_muon: given true with optim: adafactor: Muon and Adafactor are two optimizers "
            "(LLaMA-Factory builds Muon's and silently ignores optim)") in err, err
    assert (f"{at['optim_args']}13: optim_args: given 'momentum=0.9,nesterov': 'nesterov' is not one key=value pair; "
            "expected comma-separated key=value pairs as transformers' Trainer reads them") in err, err
    for other in ("use_galore", "use_apollo", "use_adam_mini", "use_badam"):
        err, at = refused_at(tmp_path, {"optim": "sgd", other: True})
        assert f"{at[other]}" in err and f"{other}: given true with optim: sgd: " in err, err
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))
    err, _ = refused_at(tmp_path, {"optim": "adafactor", "deepspeed": "ds.json"}, "train")
    assert ("error: ds.json: zero_optimization.stage is 1 with optim: adafactor: Adafactor needs zero_stage 0"
            in err), err
    assert "set zero_optimization.stage to 0 there" in err and not (tmp_path / "saves/r").exists()


def test_optim_args_transformers_cannot_parse_is_refused_and_what_it_ignores_is_said(tmp_path):
    """What stops transformers' Trainer (a pair that is not key=value, float() on a number that is none) or torch's
    constructor (nesterov without momentum) is refused at the key; the keys transformers reads and ignores
    (weight_decay: its decay groups override it; a key sgd does not take) are said, once each."""
    from tests.acceptance.harness import pipeline, write_data, write_recipe

    write_data(tmp_path / "data")
    err, at = refused_at(tmp_path, {"optim": "rmsprop", "optim_args": "eps=1e-8,momentum=0.9x"})
    assert (f"{at['optim_args']}13: optim_args: given 'eps=1e-8,momentum=0.9x': momentum=0.9x: '0.9x' is not a "
            "number") in err, err
    err, at = refused_at(tmp_path, {"optim": "sgd", "optim_args": "nesterov=1"})
    assert (f"{at['optim_args']}13: optim_args: given 'nesterov=1': torch's SGD takes nesterov only with a momentum "
            "above 0 and dampening 0") in err, err
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          optim="sgd", optim_args="momentum=0.9,weight_decay=0.5,foo=1")
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if text.startswith("optim_args:"))
    lines = pipeline("validate", "r.yaml", cwd=tmp_path, as_typed=False, expect=None).stderr.splitlines()
    said = [text for text in lines if "optim_args" in text]
    assert said == [f"notice: r.yaml:{line}:13: optim_args: weight_decay: ignored, as transformers' Trainer ignores "
                    "it (its weight decay groups set weight_decay; use the weight_decay key)",
                    f"notice: r.yaml:{line}:13: optim_args: foo: ignored, as transformers' Trainer ignores it (it "
                    "reads momentum, dampening, nesterov for optim sgd)"], lines
