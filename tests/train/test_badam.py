"""use_badam: badam 1.4's BlockOptimizer, layer mode, as LLaMA-Factory 0.9.5 builds it (pipeline.train.badam).

Goldens: badam's block inference and order re-written from its source (block_optim.py, line numbers quoted;
BAdamReference in tests/compat/test_badam_example.py holds its step, which that file checks through the CLI), on
transformers' own Llama names; orders written out by hand from those lines.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.lora import family_of_model
from pipeline.model.weights import load_model
from pipeline.recipe.args import train_args
from pipeline.train.badam import BlockOrder, block_prefixes
from pipeline.train.optim import make_optimizer
from tests.acceptance.harness import write_hf_checkpoint
from tests.compat.lf_golden import saved_weights
from tests.compat.test_badam_example import BAdamReference
from tests.train.test_galore import resume_is_exact
from tests.train.test_muon import refused, refused_with_a_deepspeed_json

ARGS = train_args({"learning_rate": 1e-3, "weight_decay": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.999,
                   "adam_epsilon": 1e-8, "use_badam": True, "badam_switch_mode": "ascending",
                   "badam_switch_interval": 2, "badam_start_block": None, "seed": 42})


def test_blocks_are_badams_over_transformers_names(tmp_path):
    """One block per decoder layer, in order, over the names transformers gives; the embedding, the final norm and
    the head in none: the optimizer has exactly the layers' tensors, and only layer 0's require gradients first."""
    hf = write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True, num_hidden_layers=3)
    names = [n for n, _ in hf.named_parameters()]
    assert block_prefixes(names) == [b[0] for b in BAdamReference.infer_param_groups(names)] == [
        "model.layers.0.", "model.layers.1.", "model.layers.2."]
    model = load_model(str(tmp_path / "llama"))
    optimizer = make_optimizer(model, ARGS)
    to_hf = family_of_model(model).to_hf
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        hf_name = to_hf(name)
        assert (id(param) in held) == (".layers." in hf_name), name
        assert param.requires_grad == hf_name.startswith("model.layers.0."), name
    with pytest.raises(UserError, match=r"badam_start_block: given 3, but the model has 3 decoder layers \(blocks "
                                        r"0 to 2\)"):
        make_optimizer(model, dataclasses.replace(ARGS, badam_start_block=3))


def test_a_start_block_past_the_last_layer_is_refused_at_its_line(tmp_path):
    """Said by validate at the recipe's key when the model is on disk (3 layers: blocks 0-2), not when train has
    built the model and its optimizer."""
    from tests.acceptance.harness import write_data, write_recipe

    write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True, num_hidden_layers=3)
    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="llama", template="llama3", dataset_dir="data",
                          output_dir="saves/r", finetuning_type="full", use_badam=True, badam_start_block=3)
    line = recipe.read_text().splitlines().index("badam_start_block: 3") + 1
    assert refused(["validate", str(recipe)], tmp_path).startswith(
        f"error: {recipe}:{line}:20: badam_start_block: given 3, but llama has 3 decoder layers (blocks 0 to 2); name "
        "one of them"), recipe
    assert refused(["validate", str(recipe), "badam_start_block=2", "badam_switch_interval=0"], tmp_path).count(
        "error:") == 1  # block 2 is the last layer: only the interval is said


def test_a_model_without_layers_in_its_names_is_refused(tmp_path):
    """GPT-2's blocks are transformer.h.<i>: badam's pattern finds no block there (LLaMA-Factory fails then)."""
    write_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    with pytest.raises(UserError, match=r"BAdam trains the decoder layers its names call `layers.<i>.`, and this "
                                        r"gpt2 model's transformers names have none"):
        make_optimizer(load_model(str(tmp_path / "gpt2")), ARGS)


def order(mode: str, start: int | None, switches: int, count: int = 3, seed: int = 0) -> list[int]:
    """The active block at the start and after each of `switches` switches (BlockOptimizer's switch_trainable_params
    activates current_block_idx, then advances it)."""
    blocks = BlockOrder(count, mode, start, seed)
    seen = []
    for _ in range(switches + 1):
        seen.append(blocks.upcoming)
        blocks.advance()
    return seen


@pytest.mark.parametrize("mode, start, want", [
    ("ascending", None, [0, 1, 2, 0, 1]),  # lines 99-100, 538-539
    ("descending", None, [2, 1, 0, 2, 1]),  # lines 97-98, 540-541
    ("ascending", 2, [2, 0, 1, 2, 0]),  # lines 95-96
    ("fixed", 1, [1, 1, 1, 1, 1]),  # lines 542-543
])
def test_the_order_of_the_blocks_is_badams(mode, start, want):
    assert order(mode, start, 4) == want


def test_random_takes_each_permutation_from_its_end_and_draws_a_new_one_when_it_runs_out():
    """lines 101-104 and 532-537: torch.randperm(block_num), popped; here from a generator seeded with the seed."""
    generator = torch.Generator().manual_seed(7)
    first, second = (torch.randperm(3, generator=generator).tolist() for _ in range(2))
    assert order("random", None, 5, seed=7) == first[::-1] + second[::-1]
    assert order("random", 1, 3, seed=7)[0] == 1 and sorted(order("random", 1, 3, seed=7)[1:]) == [0, 1, 2]


def test_a_state_dict_round_trip_keeps_the_block_its_moments_and_when_it_switches(tmp_path):
    write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True, num_hidden_layers=3)
    args = dataclasses.replace(ARGS, badam_switch_mode="random", badam_switch_interval=3, seed=3)

    def run(steps: int, optimizer=None, model=None):
        model = model or load_model(str(tmp_path / "llama"))
        optimizer = optimizer or make_optimizer(model, args)
        for _ in range(steps):
            for p in model.parameters():
                if p.requires_grad:
                    p.grad = torch.ones_like(p)
            optimizer.step()
        return model, optimizer

    straight, _ = run(7)
    model, optimizer = run(3)  # stops inside the second block (switches after steps 2 and 5)
    saved = optimizer.state_dict()
    fresh_model = load_model(str(tmp_path / "llama"))
    fresh_model.load_state_dict(model.state_dict())
    fresh = make_optimizer(fresh_model, args)
    fresh.load_state_dict(saved)
    assert fresh.active == optimizer.active and fresh.steps == 3
    resumed, _ = run(4, fresh, fresh_model)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


@pytest.mark.slow  # ~10 s each: three runs of a tiny Llama (tests/train/test_checkpoint_resume.py covers the machinery)
@pytest.mark.parametrize("keys", [{"badam_switch_mode": "random"}, {"bf16": True}], ids=["fp32-random", "bf16"])
def test_interrupted_and_resumed_badam_run_equals_uninterrupted_bitwise(make_recipe, workdir, keys):
    """A switch after steps 2 and 5: the stop after step 3 is inside a block, whose moments, step count, the order
    (random: its generator) and the layers BAdam left come back from the checkpoint; under bf16 from DeepSpeed's
    fp32 masters, one for every layer (pipeline.train.badam.every_block_trainable)."""
    resume_is_exact(make_recipe, workdir, use_badam=True, badam_switch_interval=3, **keys)


@pytest.mark.slow  # ~10 s: a bf16 run (emulated on most CPUs)
def test_under_bf16_the_layers_move_in_badams_turns(make_recipe, workdir):
    """DeepSpeed's bf16 wrapper steps the optimizer once with zero gradients as it starts: that step is not
    BAdam's (it would bring the first switch forward, and layer 0 would move at steps 2 and 3); with a switch
    every 2 steps layer 1 alone moves at steps 2 and 3."""
    from pipeline.train.run import train

    write_hf_checkpoint(workdir / "llama", "llama", small_vocab=True)
    keys = dict(model_name_or_path=str(workdir / "llama"), finetuning_type="full", cutoff_len=256, bf16=True,
                use_badam=True, badam_switch_interval=2, max_steps=3, save_steps=1, learning_rate=1e-2)
    run = train(make_recipe(name="bf16", **keys))
    moved = []
    for step in (1, 2, 3):
        before, after = (saved_weights(run.output_dir, s) if s else None for s in (step - 1, step))
        if before is not None:
            moved.append(sorted({n.split(".")[1] for n, t in after.items() if not torch.equal(t, before[n])}))
    assert moved == [["1"], ["1"]], moved


def test_what_badam_cannot_do_here_is_refused_where_the_recipe_says_so(tmp_path):
    from tests.acceptance.harness import write_data, write_recipe

    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          finetuning_type="lora", use_badam=True, zero_stage=2, use_galore=True,
                          use_adam_mini=True, badam_switch_mode="fixed")
    lines = recipe.read_text().splitlines()
    at = {key: f"r.yaml:{next(i for i, line in enumerate(lines, 1) if line.startswith(key + ':'))}:"
          for key in ("zero_stage", "use_badam", "use_galore", "use_adam_mini", "badam_switch_mode")}
    err = refused(["validate", str(recipe)], tmp_path)
    assert f"{at['zero_stage']}13: zero_stage: given 2 with use_badam: true: BAdam needs zero_stage 0" in err, err
    assert (f"{at['use_badam']}12: use_badam: given true with finetuning_type: lora: BAdam trains whole decoder "
            "layers") in err, err
    assert f"{at['use_galore']}13: use_galore: given true with use_badam: true: GaLore and BAdam" in err, err
    assert (f"{at['use_adam_mini']}16: use_adam_mini: given true with use_badam: true: Adam-mini and BAdam are two "
            "optimizers (LLaMA-Factory silently builds BAdam's)") in err, err
    assert (f"{at['badam_switch_mode']}20: badam_switch_mode: given 'fixed' without badam_start_block: fixed trains "
            "one decoder layer") in err, err
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          finetuning_type="full", use_badam=True, badam_switch_interval=-1)
    assert ("23:24: badam_switch_interval: given -1, expected an integer >= 1 (steps per layer): LLaMA-Factory "
            "documents -1 as 'never switch', but badam then switches after every step") in \
        refused(["validate", str(recipe)], tmp_path)
    refused_with_a_deepspeed_json(tmp_path, 3, "use_badam", "BAdam")
