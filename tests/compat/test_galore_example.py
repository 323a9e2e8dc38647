"""LLaMA-Factory's extras/galore/llama3_full_sft.yaml (use_galore, galore_layerwise, pure_bf16) through the CLI, on
a tiny Llama written by transformers, with model_name_or_path changed and pure_bf16 turned off (refused here:
docs/training.md, GaLore).

Golden values: transformers' Llama of the same checkpoint fed our loader's micro-batches (the data layer is not
under test), its gradients clipped by torch's clip_grad_norm_, stepped by galore_torch's GaLoreAdamW over
LLaMA-Factory's groups as re-written from their source in tests/train/test_galore.py (GaLoreReference, lf_groups);
and transformers, which loads the merged model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from safetensors import safe_open

from pipeline.recipe import resolve
from pipeline.recipe.args import data_args
from tests.acceptance.harness import pipeline, write_hf_checkpoint
from tests.compat.test_lf_recipes import lf_checkout
from tests.train.test_galore import GaLoreReference, lf_groups

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

EXAMPLE = "examples/extras/galore/llama3_full_sft.yaml"
RUN = "saves/llama3-8b/full/sft"
NOT_PURE = ["pure_bf16=false"]  # refused here (bf16 weights without fp32 masters); fp32 on this CPU
# the golden run: fp32, one example per update, a constant rate high enough to see, weight decay (after the update
# in galore_torch), an adam_epsilon where its placement shows, a rank below the matrices' sides and an interval of 2:
# step 1 takes a basis, step 2 reuses it, step 3 takes a new one. galore_layerwise off: clipped, as the golden is
GOLDEN = [*NOT_PURE, "galore_layerwise=false", "max_steps=3", "save_steps=1", "lr_scheduler_type=constant",
          "warmup_ratio=0", "learning_rate=1e-3", "weight_decay=0.1", "adam_epsilon=1e-6", "galore_rank=4",
          "galore_update_interval=2"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("galore") / "llama"
    write_hf_checkpoint(path, "llama", small_vocab=True, max_position_embeddings=2048)
    return path


def golden_steps(work: Path, llama: Path, steps: int) -> list[dict[str, "torch.Tensor"]]:
    """transformers' weights after each of `steps` updates by galore_torch's GaLoreAdamW on our micro-batches."""
    from pipeline.data.loaders import make_loader

    cwd = os.getcwd()
    os.chdir(work)
    try:
        r = resolve(EXAMPLE, GOLDEN, command="train", env={**os.environ, "WORLD_SIZE": "1", "RANK": "0"})
        loader = make_loader(data_args(r), "train", rank=0, world_size=1, epoch=0, shuffle=True)
        batches = [loader.batch(k) for k in range(steps)]
    finally:
        os.chdir(cwd)
    model = transformers.AutoModelForCausalLM.from_pretrained(llama, torch_dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    names = lf_groups(model, r["weight_decay"], r["galore_target"])
    split = {"rank": r["galore_rank"], "update_proj_gap": r["galore_update_interval"], "scale": r["galore_scale"],
             "proj_type": r["galore_proj_type"]}
    groups = [{"params": [params[n] for n in names[0]], "weight_decay": 0.0},
              {"params": [params[n] for n in names[1]], "weight_decay": r["weight_decay"]},
              {"params": [params[n] for n in names[2]], "weight_decay": r["weight_decay"], **split}]
    galore = GaLoreReference(groups, r["learning_rate"], (r["adam_beta1"], r["adam_beta2"]), r["adam_epsilon"])
    out = []
    for batch in batches:
        labels = batch["labels"]  # ours are shifted already: labels[:, t] is the token after position t
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                 reduction="sum") / (labels != -100).sum()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), r["max_grad_norm"])
        galore.step()
        model.zero_grad(set_to_none=True)
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def test_each_step_is_galore_torchs_step(tmp_path, llama):
    """After steps 1, 2 and 3 every tensor equals the golden to fp32 rounding: the GaLore matrices (their bases
    from the same torch.linalg.svd call on gradients equal to the last bits), and the AdamW ones."""
    work = lf_checkout(tmp_path, str(llama))
    err = pipeline("train", EXAMPLE, *GOLDEN, cwd=work, timeout=600).stderr
    assert ("optimizer: GaLore (use_galore): 6 tensors by AdamW at lr 0.001, weight decay 0.1 | 14 tensors by "
            "GaLore (rank 4, std, every 2 steps) at lr 0.001, weight decay 0.1") in err, err
    start = {k[len("model."):]: v for k, v in
             transformers.AutoModelForCausalLM.from_pretrained(llama).state_dict().items() if k != "lm_head.weight"}
    for step, golden in enumerate(golden_steps(work, llama, 3), start=1):
        want = {k[len("model."):]: v for k, v in golden.items() if k != "lm_head.weight"}  # tied to embed_tokens
        # a checkpoint's model/ is the pipeline's own format: Llama's transformers names without "model."
        with safe_open(str(work / RUN / f"checkpoint-{step}/model/model.safetensors"), framework="pt") as handle:
            got = {k: handle.get_tensor(k) for k in handle.keys()}
        assert got.keys() == want.keys()
        for name, tensor in got.items():
            move = (want[name] - start[name]).abs().max()
            assert move > 1e-5 and torch.allclose(tensor, want[name], rtol=0, atol=1e-6), (step, name)


def test_the_example_as_written_trains_layerwise_and_its_merged_model_loads_in_transformers(tmp_path, llama):
    """galore_layerwise: true (as the example has it): the same update unclipped, said by a notice; merged/ loads."""
    work = lf_checkout(tmp_path, str(llama))
    err = pipeline("train", EXAMPLE, *NOT_PURE, "max_steps=2", cwd=work, timeout=600).stderr
    assert f"notice: {EXAMPLE}:10:19: galore_layerwise: true: the update is LLaMA-Factory's layer-wise one" in err, err
    assert "14 tensors by GaLore (rank 128, std, every 200 steps)" in err and "fp32, ZeRO stage 0" in err, err
    assert json.loads((work / RUN / "ds_config.json").read_text("utf-8"))["gradient_clipping"] == 0.0
    assert json.loads((work / RUN / "all_results.json").read_text("utf-8"))["global_step"] == 2
    pipeline("merge", EXAMPLE, *NOT_PURE, "max_steps=2", cwd=work)
    before = transformers.AutoModelForCausalLM.from_pretrained(llama).state_dict()
    merged = transformers.AutoModelForCausalLM.from_pretrained(work / RUN / "merged")
    after = merged.state_dict()
    assert after.keys() == before.keys() and all(not torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.isfinite(merged(torch.tensor([[3, 17, 42, 99]])).logits).all()


def test_without_use_galore_its_keys_say_they_do_nothing(tmp_path, llama):
    from tests.reliability.rel_helpers import run_main

    work = lf_checkout(tmp_path, str(llama))
    err = run_main(["validate", EXAMPLE, "use_galore=false", *NOT_PURE], work).err
    assert (f"notice: {EXAMPLE}:12:14: galore_rank: accepted without effect: it only matters with use_galore: true "
            "(GaLore)") in err, err
    assert "layer-wise" not in err
