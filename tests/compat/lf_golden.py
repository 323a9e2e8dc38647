"""What the golden tests of LLaMA-Factory's optimizer examples (extras/muon, galore, apollo) share: our loader's
micro-batches for the example's recipe (the data layer is not under test there), transformers' model of the same
checkpoint trained on them by a reference optimizer, and the weights a CLI run saved per step."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import safe_open

from pipeline.recipe import resolve
from pipeline.recipe.args import data_args


def tiny_checkpoint(tmp_path_factory: Any, family: str) -> Path:
    """A tiny transformers `family` checkpoint with a small vocabulary holding its template markup and the
    examples' 2,048-token context (their cutoff_len)."""
    from tests.acceptance.harness import write_hf_checkpoint

    path = tmp_path_factory.mktemp(family) / family
    write_hf_checkpoint(path, family, small_vocab=True, max_position_embeddings=2048)
    return path


def golden_start(work: Path, example: str, overrides: list[str], steps: int, checkpoint: Path,
                 dtype: torch.dtype = torch.float32) -> tuple[Any, list[dict], Any]:
    """(the resolved recipe, its first `steps` training micro-batches as a one-rank `train` in `work` reads them,
    transformers' model of `checkpoint` in `dtype` (fp32; bf16 for pure_bf16, as LLaMA-Factory loads it) and eval
    mode: no dropout, the golden is deterministic)."""
    import transformers

    from pipeline.data.loaders import make_loader

    cwd = os.getcwd()
    os.chdir(work)
    try:
        r = resolve(example, overrides, command="train", env={**os.environ, "WORLD_SIZE": "1", "RANK": "0"})
        loader = make_loader(data_args(r), "train", rank=0, world_size=1, epoch=0, shuffle=True)
        batches = epoch_after_epoch(loader, steps, r["gradient_accumulation_steps"])
    finally:
        os.chdir(cwd)
    model = transformers.AutoModelForCausalLM.from_pretrained(checkpoint, torch_dtype=dtype).eval()
    return r, batches, model


def epoch_after_epoch(loader: Any, count: int, accumulation: int) -> list[dict]:
    """The first `count` micro-batches as the train loop reads them: each epoch's whole updates (a last partial
    update's micro-batches are left out), then the next epoch's shuffle (pipeline.train.loop)."""
    batches: list[dict] = []
    epoch = 0
    while len(batches) < count:
        loader.set_epoch(epoch)
        usable = len(loader) // accumulation * accumulation
        batches += [loader.batch(k) for k in range(min(usable, count - len(batches)))]
        epoch += 1
    return batches


def stepped(model: Any, batches: list[dict], step: Callable[[], None],
            max_grad_norm: float | None) -> list[dict[str, torch.Tensor]]:
    """transformers' `model` after each batch's update: the mean cross-entropy over the labelled tokens (of the
    logits in fp32, as transformers' ForCausalLMLoss upcasts a bf16 model's), backward, torch's clip_grad_norm_ to
    max_grad_norm (None: no clipping), `step()`; its state dict after each."""
    out = []
    for batch in batches:
        labels = batch["labels"]  # ours are shifted already: labels[:, t] is the token after position t
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                 reduction="sum") / (labels != -100).sum()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        step()
        model.zero_grad(set_to_none=True)
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def without_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers Llama / Qwen state dict in the pipeline's own names (no "model."), the head left out where it
    is tied to the embedding (the same values), as a checkpoint's model/ holds them."""
    tied = torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    return {k.removeprefix("model."): v for k, v in state.items() if k != "lm_head.weight" or not tied}


def saved_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """checkpoint-<step>/model/model.safetensors of a full fine-tuning run."""
    with safe_open(str(run / f"checkpoint-{step}/model/model.safetensors"), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def assert_each_step_equals(run: Path, start: dict[str, torch.Tensor], goldens: list[dict[str, torch.Tensor]],
                            atol: float = 1e-6) -> None:
    """Every tensor of checkpoint-1, -2, ... equals the golden after that step within `atol`, and moved from
    `start` (transformers' state dict before training) by more than that in the golden. A bf16 golden (pure_bf16)
    is compared as bf16 arithmetic allows instead (bf16_within_a_step)."""
    start = without_prefix(start)
    for step, golden in enumerate(goldens, start=1):
        want, got = without_prefix(golden), saved_weights(run, step)
        assert got.keys() == want.keys()
        for name, tensor in got.items():
            if want[name].dtype == torch.bfloat16:
                bf16_within_a_step(tensor, want[name], start[name], (step, name))
                continue
            moved = (want[name] - start[name]).abs().max()
            assert moved > 10 * atol and torch.allclose(tensor, want[name], rtol=0, atol=atol), (step, name)


def bf16_within_a_step(got: torch.Tensor, want: torch.Tensor, start: torch.Tensor, where: Any) -> None:
    """A weight trained in pure bf16 (saved as its exact fp32 value) against its bf16 golden. Exact: it is a bf16
    value (an fp32 master copy would not be: nor would an update smaller than half a bf16 step, which the golden
    loses, survive in it), and where the golden did not move it, it did not move. Within bf16 arithmetic: its
    mean distance from the golden is under 0.3 x the golden's mean move from the start (rounded to bf16). Why not
    bit for bit: both compute in bf16 and our model is not transformers' code, so gradients differ in their last
    bits; Adam's first steps are about lr x the gradient's sign, so a component near zero can step the other way,
    and a new GaLore / APOLLO projection (an SVD of a bf16 gradient) turns: measured on the galore example, 75-95%
    of the weights equal bit for bit, the mean distance 0.02-0.11 x the move (0.27 where step 3 took a new SVD
    basis)."""
    assert torch.equal(got, got.bfloat16().float()), (where, "not a bf16 value: an fp32 master copy?")
    distance = (got.float() - want.float()).abs().mean()
    move = (want.float() - start.bfloat16().float()).abs().mean()
    assert distance <= 0.3 * move if move > 0 else torch.equal(got, want.float()), (where, distance, move)


def merged_is_the_last_checkpoint(work: Path, example: str, overrides: list[str], run: Path, last: int) -> None:
    """`python -m pipeline merge` writes merged/: transformers loads it, it holds checkpoint-<last>'s weights and
    its logits are finite. The merge runs as main(argv) in this process (harness.pipeline as_typed=False: the same
    command line and files without an interpreter start and torch's import, ~1 CPU-s a call): these files' point is
    the optimizer's steps, and a full run's merge is typed by test_lf_examples.py's full examples."""
    import transformers

    from tests.acceptance.harness import pipeline

    pipeline("merge", example, *overrides, cwd=work, as_typed=False)
    merged = transformers.AutoModelForCausalLM.from_pretrained(run / "merged")
    final = saved_weights(run, last)
    assert all(torch.equal(v, final[k]) for k, v in without_prefix(merged.state_dict()).items())
    with torch.no_grad():
        assert torch.isfinite(merged(torch.tensor([[3, 17, 42, 99]])).logits).all()


def unclipped(run: Path) -> bool:
    """Whether the run's DeepSpeed config clips nothing (layer-wise GaLore / APOLLO, as LLaMA-Factory's hooks)."""
    import json

    return json.loads((run / "ds_config.json").read_text("utf-8"))["gradient_clipping"] == 0.0
