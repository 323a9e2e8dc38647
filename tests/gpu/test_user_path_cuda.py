"""The user's path on a GPU: a checkpoint written by transformers -> `python -m pipeline build / train / merge`
on CUDA -> the outputs loaded by transformers and PEFT (CUDA only; bench/gpu_check.sh runs it on a lent GPU).

The CPU acceptance suite (tests/acceptance/) walks the same path on gloo and fp32/bf16. What only a GPU can
show is that nothing on it assumes a CPU: DeepSpeed on NCCL, fp16 with dynamic loss scaling, and
neat-packed rows through both packed-attention paths. A transformers GPT-2 keeps its 0.1 dropout, so its
rows take the length buckets; a Qwen3 has none, so its rows take the varlen FlashAttention kernel.

Golden values come from the reference libraries only. transformers loads merged/ and PEFT loads base +
adapter/, both in fp32 on the CPU, and their logits must agree: our merge has to mean what PEFT means
by our adapter. The adapter must have moved, or that agreement would be the base model agreeing with
itself. The profile of step 2 (PIPELINE_PROFILE) must show the GPU running kernels, which proves the run
did not quietly fall back to the CPU.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.acceptance.harness import assert_close, cli_env, pipeline, write_data, write_hf_checkpoint, write_recipe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.sh)")

# (family, template, precision, ZeRO stage): each family once, each precision once, ZeRO 2 and 3 once
CASES = [("gpt2", "alpaca", "bf16", 2), ("qwen3", "qwen3_nothink", "fp16", 3)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{p}-zero{z}" for f, _, p, z in CASES])
def session(request, tmp_path_factory) -> tuple[str, str, Path]:
    """(family, precision, workdir): base/ written by transformers, a neat-packed LoRA run on CUDA, merged."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    family, template, precision, zero = request.param
    root = tmp_path_factory.mktemp(f"gpu_{family}")
    write_data(root / "data")
    write_hf_checkpoint(root / "base", family, small_vocab=family != "gpt2")  # the small vocabulary: no download
    recipe = write_recipe(root / "lora.yaml", model_name_or_path=str(root / "base"), dataset_dir="data",
                          template=template, output_dir="saves/lora", cutoff_len=64, packing=True, neat_packing=True,
                          zero_stage=zero, bf16=precision == "bf16", fp16=precision == "fp16", max_steps=4,
                          learning_rate=0.05)
    env = cli_env(PIPELINE_PROFILE=f"{root / 'profile.json'}:2:1")
    pipeline("build", recipe, cwd=root)
    pipeline("train", recipe, cwd=root, env=env)
    pipeline("merge", recipe, cwd=root)
    return family, precision, root


def test_the_run_trained_on_the_gpu(session):
    family, precision, root = session
    profile = json.loads((root / "profile.json").read_text())
    assert profile["steps"] == [2, 2] and profile["device_busy_ms"] > 0, profile  # CUDA kernels ran in step 2
    records = [json.loads(line) for line in (root / "saves/lora/trainer_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
    if precision == "fp16":  # dynamic loss scaling ran and reported its scale
        assert any(r.get("loss_scale") for r in records), records
    assert json.loads((root / "saves/lora/all_results.json").read_text())["global_step"] == 4


def test_transformers_and_peft_read_the_outputs_alike(session):
    import peft
    import transformers

    _, _, root = session
    out = root / "saves/lora"
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 64, 21]])
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).eval()
        base = transformers.AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.float32).eval()
        base_logits = base(ids).logits
        adapted = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        adapter_logits = adapted(ids).logits
        merged_logits = merged(ids).logits
    assert_close(adapter_logits, merged_logits)  # merged/ = base + adapter/, as PEFT reads the adapter
    moved = (merged_logits - base_logits).abs().max() / base_logits.abs().max()
    assert moved > 1e-3, f"the adapter trained on the GPU did not move the model (relative change {moved:.1e})"
    verification = json.loads((out / "merged" / "verification.json").read_text())
    assert verification["logits"]["fp32"] <= verification["tolerance"]["fp32"]
