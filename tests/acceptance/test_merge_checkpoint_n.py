"""Merging the adapter of an intermediate checkpoint (save_steps), the LLaMA-Factory way: a merge recipe whose
adapter_name_or_path is the run's checkpoint-N folder (LLaMA-Factory's examples/merge_lora with
adapter_name_or_path: saves/x/checkpoint-500). Our checkpoint-N keeps its adapter in checkpoint-N/adapter/
(pipeline.train.checkpoint), which resolve reads for checkpoint-N (recipe.run_folders.run_adapter), so `export`
merges step N. Golden values: PEFT's reading of checkpoint-N/adapter on the transformers-written base.

The training recipe itself with adapter_name_or_path at its own checkpoint-N merged the run's final adapter without a
word (merge takes what the recipe trained first: runtime.layout.trained_weights); it is refused now, naming the two
ways that merge step N: the merge recipe, or the same recipe with another output_dir
(rules.outputs.adapter_is_no_checkpoint_of_this_run; it exited 0 before).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tests.acceptance.harness import pipeline, refused, write_recipe

# LLaMA-Factory's examples/merge_lora/qwen3_lora_sft.yaml, with our tiny base, its template and step 1's checkpoint
MERGE_RECIPE = """### model
model_name_or_path: {base}
adapter_name_or_path: saves/r/checkpoint-1
template: alpaca
trust_remote_code: true

### export
export_dir: saves/r_step1
export_size: 5
export_device: cpu
export_legacy_format: false
"""


def test_a_merge_recipe_naming_checkpoint_n_merges_step_n(workdir: Path, hf_checkpoint):
    import peft
    import transformers

    base = hf_checkpoint("gpt2")
    train = write_recipe(workdir / "train.yaml", model_name_or_path=str(base), dataset_dir="data",
                         output_dir="saves/r", max_steps=2, save_steps=1, learning_rate=5e-2)
    pipeline("build", train, cwd=workdir, as_typed=False)  # no model: the same files as typed, without a start
    pipeline("train", train, cwd=workdir)
    out = workdir / "saves/r"
    assert (out / "checkpoint-1/adapter/adapter_model.safetensors").is_file() and (out / "adapter").is_dir()

    (workdir / "merge.yaml").write_text(MERGE_RECIPE.format(base=base), encoding="utf-8")
    # in this process (main(argv)): export as typed is driven by tests/acceptance/test_export_ends_answers.py;
    # what is new here, the checkpoint folder read as its adapter/, is the same without an interpreter's start
    done = pipeline("export", "merge.yaml", cwd=workdir, as_typed=False)
    assert "exported adapter saves/r/checkpoint-1/adapter onto" in done.stderr, done.stderr[-2000:]

    merged = transformers.AutoModelForCausalLM.from_pretrained(workdir / "saves/r_step1").eval()
    step1 = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                           out / "checkpoint-1/adapter").eval()
    final = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                           out / "adapter").eval()
    x = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = step1(x).logits
        assert torch.allclose(merged(x).logits, want, atol=1e-4, rtol=0)
        assert (final(x).logits - want).abs().max() > 1e-3  # step 2 moved the adapter: step 1's was merged

    # the training recipe pointed at its own checkpoint: refused, naming both ways; the first, another output_dir,
    # merges the same model as the merge recipe
    err = refused("merge", train, "adapter_name_or_path=saves/r/checkpoint-1", cwd=workdir, as_typed=False)
    assert ("saves/r/checkpoint-1/adapter is step 1's adapter of this recipe's own run (output_dir saves/r), but "
            "this recipe's merge, eval and chat use that run's final adapter (saves/r/adapter)") in err, err
    assert "give it with another output_dir (adapter_name_or_path=saves/r/checkpoint-1 output_dir=saves/r-step1: " in err
    assert "(model_name_or_path, adapter_name_or_path: saves/r/checkpoint-1, template, export_dir)" in err
    assert not (out / "merged").exists()
    pipeline("merge", train, "adapter_name_or_path=saves/r/checkpoint-1", "output_dir=saves/r-step1", cwd=workdir,
             as_typed=False)
    again = transformers.AutoModelForCausalLM.from_pretrained(workdir / "saves/r-step1/merged").state_dict()
    assert all(torch.equal(again[k], v) for k, v in merged.state_dict().items())
