"""A pure_bf16 run end to end through the CLI, as a LLaMA-Factory user brings it: a save_pretrained Llama, a recipe in
LLaMA-Factory's layout with `pure_bf16: true` (ZeRO 0), then `train`, `eval` and `merge`.

What is written: model/ holds the bf16 weights as bf16 (LLaMA-Factory's Trainer saves what it holds), merged/ too
(export_dtype left out), its config.json saying bfloat16, and transformers loads it with the trained values
exactly. A LoRA run's merge stays fp32 and folds the adapter into the base as it trained: the base in bf16 (PEFT's
merge_and_unload onto transformers' bf16 base is the golden).

How it is evaluated: as it trained, the bf16 weights without autocast. eval's tuned loss (and train's eval_loss)
equal the mean token cross-entropy of transformers' model loaded in bf16 over the same val rows (transformers upcasts
the bf16 logits to fp32 for the loss, as the pipeline's head does); the fp32 model's loss is further away than the
tolerance, so an fp32 evaluation would fail here. (The LoRA run's loss is compared with train's only: our bf16
forward and PEFT's round differently by about the fp32 / bf16 gap, so PEFT's cannot tell the two apart.)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.acceptance.harness import cli_env, pipeline, write_data, write_hf_checkpoint

RECIPE = """\
### model
model_name_or_path: llama

### method
stage: sft
do_train: true
finetuning_type: {finetuning_type}
{method}
pure_bf16: true

### dataset
dataset: tiny_sft
dataset_dir: data
template: alpaca
cutoff_len: 256
max_samples: 8
val_size: 3

### output
output_dir: saves/run
logging_steps: 1
plot_loss: false

### train
per_device_train_batch_size: 2
gradient_accumulation_steps: 1
learning_rate: 5.0e-2
max_steps: 2
lr_scheduler_type: constant
max_new_tokens: 2
max_eval_samples: 1
"""
# ours against transformers, both bf16: measured 5e-6 on one CPU and 4.8e-5 on an AVX512-BF16 one (oneDNN's bf16
# kernels sum in other orders there); the fp32 loss is 1.6e-4 / 2.6e-4 away on them
RTOL = 8e-5


def prepared(tmp_path: Path, finetuning_type: str, method: str = "") -> Path:
    """data/, llama/ (a tiny save_pretrained Llama) and the recipe; returns the recipe's path."""
    write_data(tmp_path / "data")
    write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True)
    recipe = tmp_path / "run.yaml"
    recipe.write_text(RECIPE.format(finetuning_type=finetuning_type, method=method), encoding="utf-8")
    return recipe


def val_loss(model: Any, recipe: Path, monkeypatch: Any) -> float:
    """Mean token cross-entropy of a transformers model's logits over the recipe's val batches (the pipeline's loader
    gives the rows and masks), over all their labelled tokens."""
    from pipeline.data.loaders import make_loader
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    monkeypatch.chdir(recipe.parent)
    data = data_args(resolve(recipe, [], command="train", env=cli_env(WORLD_SIZE="1")))
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in make_loader(data, "val", rank=0, world_size=1, shuffle=False):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # our labels are each position's next token already; transformers' loss upcasts the logits to fp32
            total += float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                                                             ignore_index=-100, reduction="sum"))
            count += int((batch["labels"] != -100).sum())
    return total / count


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_full_pure_bf16_run_writes_bf16_and_evaluates_as_it_trained(tmp_path, monkeypatch):
    import transformers

    recipe = prepared(tmp_path, "full")
    pipeline("build", recipe.name, cwd=tmp_path)
    pipeline("train", recipe.name, cwd=tmp_path)
    out = tmp_path / "saves/run"
    assert {t.dtype for t in tensors(out / "model/model.safetensors").values()} == {torch.bfloat16}
    assert json.loads((out / "model/config.json").read_text())["torch_dtype"] == "bfloat16"
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_precision"] == "bf16 weights, no autocast (pure_bf16, as trained)"

    pipeline("eval", recipe.name, cwd=tmp_path)
    metrics = json.loads((out / "eval/metrics.json").read_text())
    assert metrics["precision"] == "bf16 weights, no autocast (pure_bf16, as trained)"
    assert "- precision: bf16 weights, no autocast" in (out / "eval/report.md").read_text()
    pipeline("merge", recipe.name, cwd=tmp_path)
    merged = out / "merged"
    assert json.loads((merged / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in tensors(merged / "model.safetensors").values()} == {torch.bfloat16}

    model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    trained = tensors(out / "model/model.safetensors")  # our names are Llama's under model.
    hf = model.state_dict()
    assert all(torch.equal(hf[f"model.{k}" if not k.startswith("lm_head") else k], v) for k, v in trained.items())
    golden = val_loss(model, recipe, monkeypatch)
    fp32 = val_loss(model.float(), recipe, monkeypatch)
    assert abs(fp32 - golden) > 1.5 * RTOL * golden  # an fp32 evaluation would fail this tolerance
    assert metrics["results"]["tuned"]["loss"] == pytest.approx(golden, rel=RTOL)
    assert results["eval_loss"] == pytest.approx(golden, rel=RTOL)


def in_process(command: str, recipe: Path) -> None:
    """`python -m pipeline COMMAND RECIPE` without an interpreter start (the full run's test types them)."""
    from tests.reliability.rel_helpers import run_main

    done = run_main([command, recipe.name], recipe.parent)
    assert done.code == 0, done.err[-4000:]


def test_a_lora_pure_bf16_run_merges_onto_the_bf16_base_it_trained_on(tmp_path):
    """merged/ (fp32, export_dtype left out) is PEFT's merge_and_unload of the adapter onto transformers' base loaded
    in bf16 and upcast: the base the run trained on (onto the fp32 base it would differ by the base's bf16
    rounding); eval's loss is train's eval_loss, both the bf16 model with the fp32 adapter on it, without autocast.
    adapter/ is fp32 with values no bf16 holds: the adapter trained in fp32, as PEFT upcasts it under
    LLaMA-Factory's pure_bf16, and PEFT's from_pretrained onto the bf16 base holds exactly those tensors."""
    import peft
    import transformers

    recipe = prepared(tmp_path, "lora", "lora_rank: 4\nlora_target: all")
    in_process("build", recipe)
    pipeline("train", recipe.name, cwd=tmp_path)
    for command in ("eval", "merge"):
        in_process(command, recipe)
    out = tmp_path / "saves/run"
    metrics = json.loads((out / "eval/metrics.json").read_text())
    results = json.loads((out / "all_results.json").read_text())
    assert metrics["results"]["tuned"]["loss"] == results["eval_loss"]
    assert metrics["precision"] == results["eval_precision"] == ("bf16 weights (the adapter fp32), no autocast "
                                                                 "(pure_bf16, as trained)")
    written = tensors(out / "adapter/adapter_model.safetensors")
    assert {v.dtype for v in written.values()} == {torch.float32}
    assert any(not torch.equal(v, v.bfloat16().float()) for v in written.values())
    on_bf16 = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "llama", dtype=torch.bfloat16), out / "adapter")
    held = peft.get_peft_model_state_dict(on_bf16)
    assert held.keys() == written.keys() and all(torch.equal(held[k], v) for k, v in written.items())

    assert json.loads((out / "merged/config.json").read_text())["torch_dtype"] == "float32"
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32).state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "llama", dtype=torch.bfloat16).float()
    folded = peft.PeftModel.from_pretrained(base, out / "adapter").merge_and_unload().state_dict()
    assert merged.keys() == folded.keys()
    for name, value in folded.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=1e-6, msg=name)

    # LLaMA-Factory's merge_lora recipe (model + the run's output_dir as adapter, no pure_bf16 key): `export` folds
    # onto the bf16 base too, as the run's resolved.yaml says it trained, so it writes merged/'s model
    (tmp_path / "merge.yaml").write_text("model_name_or_path: llama\nadapter_name_or_path: saves/run\ntemplate: alpaca"
                                         "\nexport_dir: saves/exported\nexport_size: 5\n", encoding="utf-8")
    in_process("export", tmp_path / "merge.yaml")
    exported = tensors(tmp_path / "saves/exported/model.safetensors")
    assert all(torch.equal(v, exported[k]) for k, v in tensors(out / "merged/model.safetensors").items())
