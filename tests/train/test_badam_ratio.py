"""use_badam with badam_mode ratio: badam 1.4's BlockOptimizerRatio as LLaMA-Factory 0.9.5 builds it
(pipeline.train.badam.RatioAdam). Its update against badam's re-typed source through the CLI is in
tests/compat/test_badam_ratio_example.py; here the details.

Goldens: the windows written out by hand from block_optim.py:768-803 (offset, num_ones = int(numel x ratio), the
wrap past the end) and :836-838 (the offset moves on by num_ones at a redraw); the frozen tensors from :591-594 and
:615-625; a resumed optimizer against the same optimizer run straight.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.model.weights import load_model
from pipeline.recipe.args import train_args
from pipeline.train.badam import REDRAW_EVERY, RatioAdam, Windows
from pipeline.train.optim import make_optimizer
from tests.acceptance.harness import write_hf_checkpoint
from tests.train.test_muon import refused

ARGS = train_args({"learning_rate": 1e-3, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
                   "adam_epsilon": 1e-8, "use_badam": True, "badam_mode": "ratio", "badam_update_ratio": 0.3,
                   "badam_mask_mode": "adjacent", "seed": 42})


def window(mode: str, number: int, shape: tuple[int, ...] = (2, 5)) -> list[int]:
    windows = Windows([torch.Size(shape)], 0.3, mode, seed=7)
    windows.move_to(number)
    return windows.entries(torch.Size(shape), torch.device("cpu")).tolist()


def test_adjacent_windows_walk_through_the_flat_entries_and_wrap():
    """10 entries, ratio 0.3: num_ones 3; offsets 0, 3, 6, 9 (the last wraps: arange(0, 2) and arange(9, 10))."""
    assert [window("adjacent", n) for n in range(5)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 1, 9], [2, 3, 4]]


def test_scatter_windows_are_the_same_slices_of_one_permutation_per_shape():
    """scatter: randperm(numel) from the shape's fixed seed, sliced as adjacent slices the positions (lines
    784-803: the seed is re-set before every draw, so the permutation never changes)."""
    windows = Windows([torch.Size((2, 5))], 0.3, "scatter", seed=7)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(windows.seeds[torch.Size((2, 5))]))
    for number, positions in enumerate([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]]):
        assert window("scatter", number) == sorted(perm[positions].tolist())
    assert sorted(sum((window("scatter", n) for n in range(3)), [])) == sorted(perm[:9].tolist())


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    path = tmp_path_factory.mktemp("ratio") / "llama"
    write_hf_checkpoint(path, "llama", small_vocab=True, tie_word_embeddings=False)
    return str(path)


def backward(model) -> None:
    ids = torch.randint(0, 200, (2, 8), generator=torch.Generator().manual_seed(0))
    (model(ids).float() ** 2).mean().backward()


def test_the_embedding_and_head_are_frozen_and_each_gradient_is_its_window(untied, tmp_path):
    """Every other tensor is in the one group; after a backward its gradient is zero outside the window (30% of
    its entries from position 0) and, under 100 entries (the norms), the window got 1e-9 added (lines 814-815);
    with a tied head the embedding alone is frozen (badam fails there)."""
    model = load_model(untied)
    optimizer = make_optimizer(model, ARGS)
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in held) == param.requires_grad == (name not in ("embed_tokens.weight", "lm_head.weight"))
    assert optimizer.param_groups[0]["weight_decay"] == 0.0 and len(optimizer.param_groups) == 1
    reference = load_model(untied)
    backward(model)
    backward(reference)
    for (name, param), plain in zip(model.named_parameters(), reference.parameters()):
        if not param.requires_grad:
            continue
        k = int(param.numel() * 0.3)
        want = plain.grad.flatten().clone()
        want[k:] = 0
        want[:k] += 1e-9 if param.numel() < 100 else 0
        assert torch.equal(param.grad.flatten(), want), name
    write_hf_checkpoint(tmp_path / "tied", "llama", small_vocab=True)
    tied = load_model(str(tmp_path / "tied"))
    make_optimizer(tied, ARGS)
    assert [n for n, p in tied.named_parameters() if not p.requires_grad] == ["embed_tokens.weight"]


def test_a_resume_across_a_redraw_keeps_the_moments_and_the_window(untied):
    """99 steps, the state dict into a fresh optimizer, 3 more (a redraw after step 100) equals 102 straight, bit
    for bit; scatter (its permutations from the seed)."""
    args = dataclasses.replace(ARGS, badam_mask_mode="scatter")

    def run(steps: int, model=None, optimizer=None):
        model = model or load_model(untied)
        optimizer = optimizer or make_optimizer(model, args)
        for _ in range(steps):
            backward(model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return model, optimizer

    straight, done = run(REDRAW_EVERY + 2)
    assert done.windows.window == 1 and int(done.state[done.param_groups[0]["params"][0]]["step"]) == 2
    model, optimizer = run(REDRAW_EVERY - 1)
    fresh_model = load_model(untied)
    fresh_model.load_state_dict(model.state_dict())
    fresh = make_optimizer(fresh_model, args)
    assert isinstance(fresh, RatioAdam)
    fresh.load_state_dict(optimizer.state_dict())
    resumed, _ = run(3, fresh_model, fresh)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def test_what_ratio_mode_cannot_do_here_is_refused_where_the_recipe_says_so(tmp_path, monkeypatch):
    from tests.acceptance.harness import write_data, write_recipe

    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          finetuning_type="full", use_badam=True, badam_mode="ratio", weight_decay=0.1,
                          badam_switch_interval=-1)
    lines = recipe.read_text().splitlines()
    at = {key: f"r.yaml:{next(i for i, line in enumerate(lines, 1) if line.startswith(key + ':'))}:"
          for key in ("badam_mode", "weight_decay")}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    err = refused(["validate", str(recipe)], tmp_path)
    assert (f"{at['badam_mode']}13: badam_mode: given 'ratio' on 2 ranks: LLaMA-Factory refuses ratio-wise BAdam in "
            "distributed training") in err, err
    assert (f"{at['weight_decay']}15: weight_decay: given 0.1 with badam_mode: ratio: badam's sparse Adam applies no "
            "weight decay (LLaMA-Factory drops it silently)") in err, err
    assert "badam_switch_interval" not in err, err  # layer mode's key: ratio mode never switches layers


@pytest.mark.slow  # ~10 s each: three runs of a tiny Llama (the optimizer's own round trip across a redraw is above)
@pytest.mark.parametrize("keys", [{"badam_mask_mode": "scatter"}, {"bf16": True}], ids=["fp32-scatter", "bf16"])
def test_interrupted_and_resumed_ratio_run_equals_uninterrupted_bitwise(make_recipe, workdir, keys):
    """The moments and the step count that places the window come back from the checkpoint's JSON and
    safetensors; under bf16 the moments of DeepSpeed's fp32 masters, whose gradients the hooks on the bf16
    weights masked."""
    from tests.train.test_galore import resume_is_exact

    resume_is_exact(make_recipe, workdir, use_badam=True, badam_mode="ratio", weight_decay=0.0, **keys)
