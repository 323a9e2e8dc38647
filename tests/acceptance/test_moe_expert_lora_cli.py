"""LoRA on a Qwen3-MoE model's experts through the CLI, as a LLaMA-Factory user writes it: a Qwen3MoeForCausalLM as
transformers' save_pretrained writes it -> an LLaMA-Factory-format LoRA sft recipe with
`lora_target: q_proj,v_proj,gate_proj,up_proj,down_proj,gate` (the experts and the router) -> build / train / merge
as typed; PEFT reads adapter/ on
the base and transformers reads merged/ with our trained model's logits; plan counts the trainable parameters PEFT's
get_peft_model trains for those target_modules (LLaMA-Factory's adapter.py passes lora_target as they are). A setting
PEFT's ParamWrapper refuses (lora_dropout) is refused at its key (exit 2).

The run is under ZeRO 3 (LLaMA-Factory's own examples/deepspeed/ds_z3_config.json as `deepspeed`), with a checkpoint
at step 1 of 2: every parameter is a partition outside its module's gather, the expert pairs' too (the sparse block is
one ZeRO-3 leaf, moe.zero_stage_policy, so an up_proj wrapper reading its gate_proj's pair reads it gathered), and the
export gathers the fp32 masters. The run as a kill after its step-1 checkpoint leaves it, resumed as typed
(resume_from_checkpoint: latest), ends bitwise where the uninterrupted run ended (adapter tensors, logged losses): the
checkpoint holds the expert pairs' masters and Adam moments. (ZeRO 0's CLI path with expert LoRA:
test_deepseek_v3_cli; two ranks at ZeRO 3 matched one rank to 3e-6 by hand, not in the suite: a launch costs 20 s.)"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.acceptance.harness import (assert_outputs_compute_ours, assert_same_run, crash_copy, pipeline, refused,
                                      write_recipe)
from tests.acceptance.test_qwen3_moe_cli import save_pretrained_moe

TARGETS = "q_proj,v_proj,gate_proj,up_proj,down_proj,gate"  # the experts and the router
LF_ZERO3 = Path(__file__).parents[1] / "compat" / "lf_examples" / "deepspeed" / "ds_z3_config.json"


def test_lora_on_the_experts_trains_exports_to_peft_and_merges(workdir):
    import peft
    import torch
    import transformers

    base = workdir / "Qwen3-30B-A3B"
    save_pretrained_moe(base)
    shutil.copy(LF_ZERO3, workdir / "ds_z3_config.json")
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", template="qwen3",
                          output_dir="saves/r", learning_rate=0.05, lora_target=TARGETS, lora_alpha=8, save_steps=1,
                          deepspeed="ds_z3_config.json")
    message = refused("validate", recipe, "lora_dropout=0.1", cwd=workdir, as_typed=False)
    assert ("lora_dropout: given 0.1; lora_target names the MoE experts (gate_proj, up_proj, down_proj) and the MoE"
            " router (gate)") in message
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS.split(",")))
    trained = sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    plan = pipeline("plan", recipe, cwd=workdir, as_typed=False).stdout
    assert f" total, {trained:,} trainable " in plan, plan
    pipeline("build", recipe, cwd=workdir, as_typed=False)  # the data stage: as typed in test_qwen3_moe_cli
    pipeline("train", recipe, cwd=workdir)
    assert json.loads((workdir / "saves/r/ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    crash_copy(workdir / "saves/r", workdir / "saves/resumed", 1)
    resumed = pipeline("train", recipe, "output_dir=saves/resumed", "resume_from_checkpoint=latest", cwd=workdir)
    assert "resuming from saves/resumed/checkpoint-1 at step 1" in resumed.stderr + resumed.stdout
    assert_same_run(workdir / "saves/r", workdir / "saves/resumed", "adapter/adapter_model.safetensors")
    pipeline("merge", recipe, cwd=workdir)
    adapter = json.loads((workdir / "saves/r/adapter/adapter_config.json").read_text())
    assert (sorted(adapter["target_modules"]), sorted(adapter["target_parameters"]), adapter["rank_pattern"]) == (
        ["q_proj", "v_proj"], ["down_proj", "gate.weight", "gate_up_proj"], {r".*\.gate_up_proj": 8})
    merged = transformers.AutoModelForCausalLM.from_pretrained(workdir / "saves/r/merged").eval()
    x, want = assert_outputs_compute_ours(recipe, workdir, base, merged, merged.config.vocab_size)
    with torch.no_grad():  # the experts trained: merged/'s expert tensors moved from the base's
        source = transformers.AutoModelForCausalLM.from_pretrained(base)
        assert (merged.model.layers[0].mlp.experts.down_proj - source.model.layers[0].mlp.experts.down_proj
                ).abs().max() > 1e-4
        assert (merged.model.layers[1].mlp.experts.gate_up_proj - source.model.layers[1].mlp.experts.gate_up_proj
                ).abs().max() > 1e-4
        assert (merged.model.layers[1].mlp.gate.weight - source.model.layers[1].mlp.gate.weight).abs().max() > 1e-4
