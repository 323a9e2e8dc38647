"""`plan` under stage ppo counts what train holds beside the policy: the frozen reward model (pipeline.train.ppo
.load_reward_model) in the compute dtype and the value head trained with the policy.

Golden: the real resident tensors. A tiny Llama checkpoint (save_pretrained), a LoRA reward adapter (PEFT,
task_type SEQ_CLS) and a full reward model (transformers' LlamaForSequenceClassification) as users bring them;
the pipeline loads each reward model as train does and the bytes of its parameters and buffers (numel x
element_size) are summed; the value head is attached to the built policy as train attaches it. plan's arithmetic
is not used.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.acceptance.harness import write_data, write_hf_checkpoint

save_file = pytest.importorskip("safetensors.torch").save_file

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The policy's base, the two reward models, a dataset registry."""
    root = tmp_path_factory.mktemp("ppo_plan")
    write_hf_checkpoint(root / "llama", "llama", small_vocab=True)
    config = transformers.AutoConfig.from_pretrained(root / "llama", num_labels=1)
    config.pad_token_id = config.eos_token_id
    torch.manual_seed(0)
    transformers.LlamaForSequenceClassification(config).save_pretrained(root / "rm_full")
    torch.manual_seed(1)
    lora = peft.get_peft_model(transformers.LlamaForSequenceClassification(config),
                               peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(root / "rm_lora")  # PEFT's modules_to_save: ["classifier", "score"]
    transformers.AutoModelForCausalLM.from_pretrained(root / "llama").save_pretrained(root / "rm_value_head")
    save_file({"v_head.summary.weight": torch.ones(1, config.hidden_size), "v_head.summary.bias": torch.ones(1)},
              root / "rm_value_head" / "value_head.safetensors")  # LLaMA-Factory's full stage rm output
    write_data(root / "data")
    return root


def recipe(folder: Path, kind: str, **keys: Any) -> Any:
    from pipeline.recipe import resolve

    values = {"model_name_or_path": str(folder / "llama"), "dataset": ["tiny_sft"], "dataset_dir": str(folder / "data"),
              "template": "default", "output_dir": str(folder / "saves"), "finetuning_type": "lora", "cutoff_len": 32,
              "stage": "ppo", "reward_model": str(folder / f"rm_{kind}"),
              "reward_model_type": "full" if kind == "value_head" else kind, **keys}
    path = folder / "r.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in values.items()), encoding="utf-8")
    return resolve(path, [], command="plan", env={**os.environ, "WORLD_SIZE": "1"})


def resident_bytes(module: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*module.parameters(), *module.buffers()]}  # a tied tensor once
    return sum(t.numel() * t.element_size() for t in tensors.values())


@pytest.mark.parametrize("kind", ["lora", "full", "value_head"])
@pytest.mark.parametrize("precision, dtype", [({}, torch.float32), ({"bf16": True}, torch.bfloat16)],
                         ids=["fp32", "bf16"])
def test_plan_counts_the_reward_model_as_train_loads_it(folder, kind, precision, dtype):
    """It was not counted: a LoRA reward model is one more copy of the base (the adapter folded in, a score head
    for lm_head), a full one its folder's weights (LLaMA-Factory's causal LM: its value head, bias included, in
    place of lm_head), all in the compute dtype whatever the files hold."""
    from pipeline.recipe.args import recipe_args
    from pipeline.recipe.plan import estimate_memory
    from pipeline.train.ppo import load_reward_model

    r = recipe(folder, kind, **precision)
    loaded = load_reward_model(r["reward_model"], r["reward_model_type"], recipe_args(r).model, "cpu", dtype, pad_id=0)
    assert estimate_memory(r).gpu["reward_model"] == resident_bytes(loaded.model)


def test_plan_trains_the_value_head_beside_the_policy(folder):
    """TRL's value head (Linear(hidden, 1) with a bias) is trained by the optimizer: its weights, gradients and
    optimizer state count as the adapter's do."""
    from pipeline.model.build import build_model
    from pipeline.recipe.args import recipe_args
    from pipeline.recipe.plan import estimate_memory
    from pipeline.train.ppo import attach_value_head

    r = recipe(folder, "lora")
    model = build_model(*recipe_args(r), dtype=torch.float32)
    attach_value_head(model, 0)
    head = sum(p.numel() for p in model.v_head.parameters())
    ppo, sft = estimate_memory(r), estimate_memory(recipe(folder, "lora", stage="sft", reward_model=None,
                                                          reward_model_type="lora"))
    assert ppo.params_trainable - sft.params_trainable == head
    assert ppo.params_total - sft.params_total == head
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == ppo.params_trainable


SFT = {"stage": "sft", "reward_model": None, "reward_model_type": "lora"}


@pytest.mark.parametrize("keys", [
    SFT, {**SFT, "additional_target": "norm"}, {**SFT, "use_dora": True},
    {**SFT, "finetuning_type": "oft", "oft_block_size": 8}, {}, {"additional_target": "norm"},
], ids=["lora", "lora-additional_target", "dora", "oft", "ppo-lora", "ppo-lora-additional_target"])
def test_plan_counts_the_parameters_train_builds(folder, keys):
    """plan's `parameters` row left out the adapter's own weights (30,880 total where train builds 39,072 for this
    LoRA). Golden: the model train builds from the same recipe (ppo: its value head attached as train attaches it),
    its parameters and the trainable ones counted by torch, their fp32 bytes for the `parameters` memory row; and
    the reference a LoRA policy keeps beside it, the starting copies of its additional_target modules
    (lora.keep_starting_modules, as the adapters-off reference of stage ppo / dpo keeps them)."""
    from pipeline.model.build import build_model
    from pipeline.model.lora import keep_starting_modules
    from pipeline.recipe.args import recipe_args
    from pipeline.recipe.plan import estimate_memory
    from pipeline.train.ppo import attach_value_head

    r = recipe(folder, "lora", **keys)
    model = build_model(*recipe_args(r), dtype=torch.float32)
    if r["stage"] == "ppo":
        attach_value_head(model, 0)
    params = list(model.parameters())
    mem = estimate_memory(r)
    assert mem.params_total == sum(p.numel() for p in params)
    assert mem.params_trainable == sum(p.numel() for p in params if p.requires_grad)
    assert mem.gpu["parameters"] == sum(p.numel() * p.element_size() for p in params)
    keep_starting_modules(model)
    kept = {id(p): p for module in model._lora_starting.values() for p in module.parameters()}
    reference = sum(p.numel() * p.element_size() for p in kept.values()) if r["stage"] == "ppo" else 0
    assert mem.gpu.get("reference", 0) == reference


class RecordedCache:
    """Every KV cache generate makes (GPTModel.new_cache's pipeline.model.gpt.KVCache, wrapped): the buffers it
    allocated."""

    def __init__(self, monkeypatch):
        from pipeline.model import gpt
        from pipeline.model.kv_cache import KVCache

        self.made: list[Any] = []
        made = self.made

        class Recording(KVCache):
            def __init__(self, *args: Any, **kwargs: Any):
                super().__init__(*args, **kwargs)
                made.append(self)

        monkeypatch.setattr(gpt, "KVCache", Recording)

    def bytes(self) -> int:
        (cache,) = self.made
        return sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values])


def test_plan_counts_the_rollouts_kv_cache_and_zero3s_gathered_weights(folder, monkeypatch):
    """It was not counted: decoding a micro-batch of per_device_train_batch_size prompts (cutoff_len tokens each, the
    longest a row's prompt is) allocates a KV cache for prompt + max_new_tokens positions, and under ZeRO 3 the
    policy's weights are gathered whole beside their partitions. Golden: the bytes of the cache tensors our generate
    allocates for such a micro-batch (never stopping early: no stop ids), plus under ZeRO 3 the bytes of the
    policy's parameters (LoRA adapter and value head included) as train builds them; by hand, the Llama's 2 layers x
    2 key/value heads x 8 numbers a head (tests/helpers' tiny checkpoint), and under bf16 2 bytes a number. The
    step's rollout tensors (every row of its ppo_buffer_size) were not counted either: by hand, from the dtypes
    pipeline.train.ppo.PPOTrainer.rollout keeps."""
    from pipeline.model.build import build_model
    from pipeline.model.generate import generate
    from pipeline.recipe.args import recipe_args
    from pipeline.recipe.plan import estimate_memory
    from pipeline.train.ppo import attach_value_head

    rows, new = 3, 7
    keys = {"per_device_train_batch_size": rows, "max_new_tokens": new, "gradient_accumulation_steps": 2,
            "ppo_buffer_size": 2}
    r = recipe(folder, "full", **keys)
    model = build_model(*recipe_args(r), dtype=torch.float32)
    attach_value_head(model, 0)
    caches = RecordedCache(monkeypatch)
    out = generate(model, [[5] * r["cutoff_len"]] * rows, max_new_tokens=new, do_sample=False)
    assert [len(o) for o in out] == [new] * rows  # decoded to the end: the cache was filled
    cfg = model.cfg
    assert (cfg.n_layers, cfg.kv_heads, cfg.head_dim) == (2, 2, 8)
    by_hand = 2 * 2 * rows * 2 * (32 + new) * 8 * 4  # keys + values, layers, rows, heads, positions, head, fp32
    assert caches.bytes() == by_hand
    # and the step's rollout, kept through its updates: 3 x 2 accumulation x 2 ppo_buffer_size rows of 32 + 7
    # positions, each with input_ids, attention_mask, labels (int64) and mask, log-probs, values, advantages,
    # returns (fp32), each row with its score and KL (fp32)
    held = 3 * 2 * 2 * ((32 + new) * (3 * 8 + 5 * 4) + 2 * 4)
    assert estimate_memory(r).gpu["rollout"] == caches.bytes() + held
    assert estimate_memory(recipe(folder, "full", bf16=True, **keys)).gpu["rollout"] == by_hand // 2 + held
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert estimate_memory(recipe(folder, "full", zero_stage=3, **keys)).gpu["rollout"] == \
        caches.bytes() + weights + held
