"""A key a LLaMA-Factory recipe leaves out means the same here, or docs/coming-from-llama-factory.md's
"Defaults" table says how and why it differs.

A recipe brought unchanged must not train differently without a word: a missing `learning_rate` was 1e-4
here and 5e-5 there. The references are independent of the code under test: LLaMA-Factory 0.9.5's own
defaults, copied by hand from its `hparams/` dataclasses (file:line below; llamafactory is not installed
here), and transformers' `TrainingArguments`, read at test time, for the trainer's keys LLaMA-Factory
inherits.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "coming-from-llama-factory.md"
SCHEMA = ROOT / "pipeline" / "recipe" / "schema" / "recipe.schema.json"

LLAMAFACTORY_0_9_5 = {  # llamafactory/hparams/<file>:<line> of the 0.9.5 wheel
    "adapter_name_or_path": None,  # model_args.py:44
    "additional_target": None,  # finetuning_args.py:129
    "cutoff_len": 2048,  # data_args.py:46
    "dataset": None,  # data_args.py:30
    "dataset_dir": "data",  # data_args.py:38
    "disable_gradient_checkpointing": False,  # model_args.py:145
    "do_sample": True,  # generating_args.py:25
    "dpo_label_smoothing": 0.0,  # finetuning_args.py:187
    "enable_thinking": True,  # data_args.py:124
    "eval_dataset": None,  # data_args.py:34
    "export_device": "cpu",  # model_args.py:366
    "export_dir": None,  # model_args.py:358
    "export_legacy_format": False,  # model_args.py:386
    "export_size": 5,  # model_args.py:362
    "finetuning_type": "lora",  # finetuning_args.py:464
    "freeze_trainable_layers": 2,  # finetuning_args.py:23
    "infer_backend": "huggingface",  # model_args.py (EngineName.HF)
    "lora_alpha": None,  # finetuning_args.py:69
    "lora_dropout": 0.0,  # finetuning_args.py:73
    "lora_rank": 8,  # finetuning_args.py:77
    "lora_target": "all",  # finetuning_args.py:81
    "loraplus_lr_embedding": 1e-6,  # finetuning_args.py:95
    "loraplus_lr_ratio": None,  # finetuning_args.py:91
    "mask_history": False,  # data_args.py:54
    "max_new_tokens": 1024,  # generating_args.py:53
    "max_samples": None,  # data_args.py:88
    "mix_strategy": "concat",  # data_args.py:66
    "model_name_or_path": None,  # model_args.py:38
    "model_revision": "main",  # model_args.py:105
    "neat_packing": False,  # data_args.py:112
    "overwrite_cache": False,  # data_args.py:76
    "overwrite_output_dir": False,  # training_args.py:146
    "packing": None,  # data_args.py:108
    "plot_loss": False,  # finetuning_args.py:551
    "pref_beta": 0.1,  # finetuning_args.py:171
    "pref_ftx": 0.0,  # finetuning_args.py:175
    "pref_loss": "sigmoid",  # finetuning_args.py:183
    "preprocessing_num_workers": None,  # data_args.py:84
    "ref_model": None,  # finetuning_args.py:223
    "seed": 42,  # evaluation_args.py:37
    "simpo_gamma": 0.5,  # finetuning_args.py:199
    "stage": "sft",  # finetuning_args.py:460
    "temperature": 0.95,  # generating_args.py:29
    "template": None,  # data_args.py:26
    "top_k": 50,  # generating_args.py:41
    "top_p": 0.7,  # generating_args.py:33
    "train_on_prompt": False,  # data_args.py:50
    "trust_remote_code": False,  # model_args.py:201
    "use_dora": False,  # finetuning_args.py:103
    "use_rslora": False,  # finetuning_args.py:99
    "val_size": 0.0,  # data_args.py:100
}
# Keys LLaMA-Factory has no field for, whose behaviour there the table describes in words.
NO_LLAMAFACTORY_KEY = {"export_dtype", "overlength_policy"}
SAME_MEANING = {("max_steps", -1, None), ("warmup_steps", 0, None)}  # transformers' "unset" -> our null


def _ours() -> dict[str, object]:
    props = json.loads(SCHEMA.read_text("utf-8"))["properties"]
    return {k: p.get("default") for k, p in props.items() if "x-no-effect" not in p}


def _theirs() -> dict[str, object]:
    transformers = pytest.importorskip("transformers")
    trainer = {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)
               if f.default is not dataclasses.MISSING}
    return {**trainer, **LLAMAFACTORY_0_9_5}


def _table() -> dict[str, list[str]]:
    """The "## Defaults" section's table: key -> [LLaMA-Factory, here, why]."""
    section = PAGE.read_text("utf-8").split("\n## Defaults\n", 1)[1].split("\n## ", 1)[0]
    return {m[1]: [c.strip() for c in m[2].split(" | ")]
            for m in re.finditer(r"^\| `(\w+)` \| (.*) \|$", section, re.M)}


def test_every_default_that_differs_is_in_the_table_and_no_other():
    ours, theirs = _ours(), _theirs()
    differ = {k for k in ours.keys() & theirs.keys()
              if ours[k] != theirs[k] and (k, theirs[k], ours[k]) not in SAME_MEANING}
    assert differ | NO_LLAMAFACTORY_KEY == set(_table())


@pytest.mark.parametrize("key", sorted(_table()))
def test_the_table_states_our_default(key):
    """The "here" column starts with our default as the reference tables print it."""
    ours = _ours()[key]
    shown = f"`{ours}`" if isinstance(ours, str) else "null" if ours is None else json.dumps(ours)
    assert _table()[key][1].startswith(shown), (key, _table()[key][1], shown)


def test_the_trainer_defaults_a_recipe_leaves_out_are_transformers():
    """The ones that decide what an unchanged LLaMA-Factory recipe trains like."""
    ours, theirs = _ours(), _theirs()
    for key in ("learning_rate", "lr_scheduler_type", "num_train_epochs", "weight_decay", "warmup_steps",
                "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm", "per_device_train_batch_size",
                "gradient_accumulation_steps", "seed", "save_steps"):
        assert ours[key] == theirs[key] or (key, theirs[key], ours[key]) in SAME_MEANING, key
    assert ours["cutoff_len"] == LLAMAFACTORY_0_9_5["cutoff_len"]


def test_a_recipe_without_the_trainer_keys_plans_with_llamafactorys_values(tmp_path):
    """The user's path: LLaMA-Factory's qwen3 LoRA example with its schedule lines deleted, through `plan`."""
    from tests.acceptance.harness import pipeline, write_hf_checkpoint
    from tests.compat.test_lf_recipes import lf_checkout, template_override

    ckpt = tmp_path / "ckpt"
    write_hf_checkpoint(ckpt, "qwen3", small_vocab=True, max_position_embeddings=4096)
    work = lf_checkout(tmp_path / "lf", str(ckpt))
    recipe = work / "examples/train_lora/qwen3_lora_sft.yaml"
    dropped = ("learning_rate:", "lr_scheduler_type:", "num_train_epochs:", "cutoff_len:")
    recipe.write_text("".join(line for line in recipe.read_text("utf-8").splitlines(keepends=True)
                              if not line.startswith(dropped)), "utf-8")
    shown = pipeline("plan", str(recipe.relative_to(work)), *template_override(), cwd=work).stdout
    plan = {m[1]: (m[2], m[3]) for m in re.finditer(r"^(\w+) +(\S+) +(\S+)$", shown, re.M)}
    assert plan["learning_rate"] == ("5e-05", "default")
    assert plan["lr_scheduler_type"] == ('"linear"', "default")
    assert plan["num_train_epochs"] == ("3.0", "default")
    assert plan["cutoff_len"] == ("2048", "default")
