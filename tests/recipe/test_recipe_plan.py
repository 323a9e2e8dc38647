"""plan: memory estimate (hand-computed for the tiny preset), output sections, and no torch import."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.recipe import resolve
from pipeline.recipe.plan import estimate_memory, render

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# tiny: vocab 50257, context 128, width 64, 2 heads, 2 blocks, tied head. Counted by hand:
WTE, WPE = 50257 * 64, 128 * 64
BLOCK = 2 * 64 * 2 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)  # 2 norms + 4 linears
TINY_PARAMS = WTE + WPE + 2 * BLOCK + 2 * 64  # + ln_f = 3,324,736
TINY_TENSORS = 2 + 2 * 12 + 2  # wte, wpe; per block 2 norms and 4 linears, weight and bias each; ln_f's two
# LoRA r=8 on every linear of a block: r * (in + out) each
TINY_LORA_8 = 2 * 8 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))  # 16,384
TINY_LORA_TENSORS = 2 * 4 * 2  # A and B of 4 linears in 2 blocks
STEP = 4  # torch AdamW's step count: a float32 scalar tensor per trained tensor
# activations for micro-batch 8, sequence 128: L*s*b*h*(34 + 5*a*s/h) * (bytes/2) + fp32 logits s*b*V*4
ACT_PER_BYTE = 2 * 128 * 8 * 64 * (34 + 5 * 2 * 128 / 64) / 2
LOGITS = 128 * 8 * 50257 * 4

RECIPE = "model_name_or_path: tiny\ndataset: d\nmax_steps: 10\ncutoff_len: 128\nper_device_train_batch_size: 8\n"


def test_hand_counts_match_transformers_and_peft():
    """The hand counts above against an independent library: GPT-2 of the tiny shape in transformers, LoRA r=8
    on every linear of a block in PEFT."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.GPT2Config(vocab_size=50257, n_positions=128, n_embd=64, n_layer=2, n_head=2,
                                     tie_word_embeddings=True)
    model = transformers.GPT2LMHeadModel(config)
    assert model.num_parameters() == TINY_PARAMS == 3_324_736  # tied head counted once
    assert len(list(model.parameters())) == TINY_TENSORS
    lora = peft.get_peft_model(model, peft.LoraConfig(r=8, target_modules=["c_attn", "c_proj", "c_fc"],
                                                      fan_in_fan_out=True))
    trainable, _ = lora.get_nb_trainable_parameters()
    assert trainable == TINY_LORA_8 == 16_384
    assert sum(p.requires_grad for p in lora.parameters()) == TINY_LORA_TENSORS


def test_memory_full_fp32_single_rank(write):
    write("r.yaml", RECIPE + "finetuning_type: full\n")
    mem = estimate_memory(resolve("r.yaml"))
    assert (mem.params_total, mem.params_trainable) == (TINY_PARAMS, TINY_PARAMS)
    assert mem.gpu == {"parameters": TINY_PARAMS * 4, "gradients": TINY_PARAMS * 4,
                       "optimizer": TINY_PARAMS * 8 + TINY_TENSORS * STEP, "activations": round(ACT_PER_BYTE * 4 + LOGITS)}
    assert mem.cpu == {}


def test_memory_lora_bf16(write):
    write("r.yaml", RECIPE + "bf16: true\n")
    mem = estimate_memory(resolve("r.yaml"))
    assert mem.params_trainable == TINY_LORA_8
    # bf16 weights (the base's and the adapter's); gradients in bf16; Adam m, v and fp32 master copy: 12 bytes per
    # trainable parameter
    assert mem.params_total == TINY_PARAMS + TINY_LORA_8  # the adapter's own weights are parameters of the model
    assert mem.gpu == {"parameters": (TINY_PARAMS + TINY_LORA_8) * 2, "gradients": TINY_LORA_8 * 2,
                       "optimizer": TINY_LORA_8 * 12 + TINY_LORA_TENSORS * STEP, "activations": round(ACT_PER_BYTE * 2 + LOGITS)}


def test_memory_qwen3_preset_counts_gqa_swiglu_and_the_152k_head(write):
    """qwen3-0.6b: 28 blocks, width 1024, 16 query heads and 8 key/value heads of 128, SwiGLU 3072, vocab 151,936."""
    write("r.yaml", RECIPE.replace("tiny", "qwen3-0.6b") + "bf16: true\nlora_target: [q_proj, v_proj]\n")
    mem = estimate_memory(resolve("r.yaml"))
    lora = 28 * 8 * ((1024 + 2048) + (1024 + 1024))
    assert mem.params_total == 596_049_920 + lora  # Qwen3-0.6B's published size (0.44B without the embedding)
    assert mem.params_trainable == lora
    s, b, h, q, kv, f = 128, 8, 1024, 2048, 1024, 3072
    per_token = (2 * h + 2 * q + 4 * kv + 2 * q + h) + (2 * h + 8 * f + h) + 4 * h  # attention, SwiGLU, norms
    block = s * b * per_token + 5 * 16 * s * s * b  # bf16: 2 bytes per value
    logits = s * b * 151_936 * 4
    assert mem.gpu["activations"] == round(28 * block + logits)  # no recomputation (the default)
    write("r.yaml", RECIPE.replace("tiny", "qwen3-0.6b") + "bf16: true\ndisable_gradient_checkpointing: false\n")
    checkpointed = estimate_memory(resolve("r.yaml")).gpu["activations"]
    assert checkpointed == round(28 * s * b * h * 2 + block + logits)  # each block's input + one block at a time


def test_memory_qwen3_moe_counts_each_chosen_experts_rows(write):
    """qwen3-30b-a3b: 48 sparse blocks, width 2048, 32 query heads and 4 key/value heads of 128, 128 experts of
    768, 8 per token. Per token a sparse block keeps its MLP input and, for each of the 8 experts the token runs,
    the token's copied row 2h, the expert's SwiGLU 8 x 768 and dropout mask h, and its output 2h (kept for the
    routing weight), plus the router's logits and fp32 probabilities 6 x 128 (measured against autograd in
    tests/model/test_moe.py); the estimate counted one dense SwiGLU of 8 x 768 instead."""
    write("r.yaml", RECIPE.replace("tiny", "qwen3-30b-a3b") + "bf16: true\nlora_target: [q_proj]\n")
    s, b, h, q, kv = 128, 8, 2048, 4096, 512
    mlp = 2 * h + 8 * (2 * h + 8 * 768 + h + 2 * h) + 6 * 128
    per_token = (2 * h + 2 * q + 4 * kv + 2 * q + h) + mlp + 4 * h  # attention, the sparse MLP, norms
    block = s * b * per_token + 5 * 32 * s * s * b  # bf16: 2 bytes per value
    assert estimate_memory(resolve("r.yaml")).gpu["activations"] == round(48 * block + s * b * 151_936 * 4)


@pytest.mark.parametrize("stage", [0, 2])
def test_memory_lora_pure_bf16(write, stage):
    """pure_bf16 with LoRA: the base bf16, the adapter fp32 as PEFT upcasts it (LLaMA-Factory leaves that on), so
    its gradients and Adam m and v are fp32 (8 bytes per trainable parameter, + the step counts), at ZeRO 2 as at 0
    (DeepSpeed's bf16 is off: its fp32 partition copy of the fp32 adapter is not counted, as for any fp32 run), and
    the reduce bucket fp32."""
    write("r.yaml", RECIPE + f"pure_bf16: true\nzero_stage: {stage}\n")
    r = resolve("r.yaml")
    mem = estimate_memory(r)
    assert mem.gpu["parameters"] == TINY_PARAMS * 2 + TINY_LORA_8 * 4  # the base bf16 beside the fp32 adapter
    assert mem.gpu["optimizer"] == TINY_LORA_8 * 8 + TINY_LORA_TENSORS * STEP
    bucket = r.ds_config["zero_optimization"]["reduce_bucket_size"] * 4 if stage else 0
    assert mem.gpu["gradients"] == TINY_LORA_8 * 4 + bucket
    assert mem.gpu["activations"] == round(ACT_PER_BYTE * 2 + LOGITS)


# ZeRO 1-2 also hold DeepSpeed's reduce-bucket staging buffer, whole on every rank: one bucket of every trainable
# gradient (full fine-tuning here), in bf16
@pytest.mark.parametrize("stage, params, grads, optim", [
    (1, TINY_PARAMS * 2, TINY_PARAMS * 2 + TINY_PARAMS * 2, (TINY_PARAMS * 12 + TINY_TENSORS * STEP) / 4),
    (2, TINY_PARAMS * 2, TINY_PARAMS * 2 / 4 + TINY_PARAMS * 2, (TINY_PARAMS * 12 + TINY_TENSORS * STEP) / 4),
    (3, TINY_PARAMS * 2 / 4, TINY_PARAMS * 2 / 4, (TINY_PARAMS * 12 + TINY_TENSORS * STEP) / 4),
])
def test_memory_zero_partitions_over_four_ranks(write, stage, params, grads, optim):
    write("r.yaml", RECIPE + f"finetuning_type: full\nbf16: true\nzero_stage: {stage}\n")
    mem = estimate_memory(resolve("r.yaml", env={"WORLD_SIZE": "4", "RANK": "0"}))
    assert mem.gpu["parameters"] == round(params)
    assert mem.gpu["gradients"] == round(grads)
    assert mem.gpu["optimizer"] == round(optim)


def test_memory_offload_moves_to_cpu(write):
    write("r.yaml", RECIPE + "finetuning_type: full\nbf16: true\nzero_stage: 3\noffload_optimizer: cpu\n"
                             "offload_param: cpu\n")
    mem = estimate_memory(resolve("r.yaml", env={"WORLD_SIZE": "2", "RANK": "0"}))
    assert mem.gpu["parameters"] == 0 and mem.gpu["optimizer"] == 0
    assert mem.cpu == {"parameters": TINY_PARAMS * 2 // 2, "optimizer": (TINY_PARAMS * 12 + TINY_TENSORS * STEP) // 2}
    assert mem.gpu["gradients"] == TINY_PARAMS * 2 // 2


def test_memory_unknown_model_is_none(write):
    write("r.yaml", RECIPE.replace("tiny", "saves/upstream/model"))
    r = resolve("r.yaml", command="plan")
    assert estimate_memory(r) is None
    assert "cannot be read here yet" in render(r)


def test_plan_output_has_every_section(write, manifest):
    manifest("d", train=100)
    write("r.yaml", RECIPE + "warmup_ratio: 0.1\n")
    text = render(resolve("r.yaml", ["seed=3"], command="plan"))
    for header in ("[model]", "[method]", "[train]", "[derived]", "[deepspeed] generated from the recipe",
                   "[memory per rank, training]"):
        assert header in text
    assert any(line.split() == ["seed", "3", "cli"] for line in text.splitlines())
    assert any(line.split()[:3] == ["model_name_or_path", '"tiny"', "r.yaml:1"] for line in text.splitlines())
    assert "floor(floor(100 / (8 x 1)) / 1)" in text  # steps per epoch explained with the numbers
    assert f"{TINY_PARAMS + TINY_LORA_8:,} total, {TINY_LORA_8:,} trainable" in text


def test_validate_and_plan_do_not_import_torch(write, tmp_path):
    """On built data: validate's length pass and plan's step count tokenize the train split (pipeline.recipe.exact)."""
    write("datasets/dataset_info.json", {"d": {"file_name": "d.jsonl"}})
    write("datasets/d.jsonl", "".join(json.dumps({"instruction": f"Say {i}", "output": f"{i}"}) + "\n"
                                      for i in range(20)))
    write("r.yaml", RECIPE)
    code = ("import sys, io, contextlib\n"
            "from pipeline.__main__ import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    assert main(['build', 'r.yaml']) == 0\n"
            "    assert main(['validate', 'r.yaml']) == 0\n"
            "    assert main(['plan', 'r.yaml', 'zero_stage=3']) == 0\n"
            "    assert main(['deps', 'r.yaml']) == 0\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'deepspeed', 'transformers'))\n"
            "print(bad)\n")
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_the_rules_read_checkpoints_and_adapters_without_torch(tmp_path):
    """What validate's rules read from files on disk: an adapter's tensor shapes against its base checkpoint, a
    reward model's folder and form, whether LLaMA Pro's zeroed projections moved. Each once imported torch on the way
    (pipeline.model.lora / weights for a file name or shard_files; safe_open(framework="pt")); the files here are
    written with safetensors' numpy writer, the reads run in a process that must end without torch."""
    import json

    import numpy as np
    from safetensors.numpy import save_file

    model, adapter = tmp_path / "model", tmp_path / "adapter"
    model.mkdir(), adapter.mkdir()
    (model / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 32,
        "max_position_embeddings": 16, "rms_norm_eps": 1e-6, "tie_word_embeddings": True}))
    layer = "model.layers.0."
    save_file({layer + "self_attn.o_proj.weight": np.zeros((8, 8), np.float32),
               layer + "mlp.down_proj.weight": np.eye(8, 16, dtype=np.float32),
               "model.embed_tokens.weight": np.ones((32, 8), np.float32)}, str(model / "model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4,
                                                             "target_modules": ["o_proj"], "task_type": "SEQ_CLS"}))
    save_file({"base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight": np.ones((2, 4), np.float32),
               "base_model.model.score.weight": np.ones((1, 8), np.float32)}, str(adapter / "adapter_model.safetensors"))
    code = ("import sys\nfrom pathlib import Path\n"
            "from pipeline.recipe.rules.model import adapter_shape_problems\n"
            "from pipeline.recipe.run_folders import reward_folder\n"
            "from pipeline.model.reward_folder import reward_source\n"
            "from pipeline.model.expand import nonzero_outputs\n"
            f"m, a = {str(model)!r}, {str(adapter)!r}\n"
            "said = adapter_shape_problems('adapter_name_or_path', a, 'model_name_or_path', m)\n"
            "assert len(said) == 1 and '(2, 4)' in said[0][1].replace('[', '(').replace(']', ')'), said\n"
            "assert reward_source(reward_folder(a, 'lora'), 'lora', 8).value_head is None\n"
            "assert nonzero_outputs(Path(m), ['layers.0.self_attn.o_proj', 'layers.0.mlp.down_proj']) == "
            "{'layers.0.mlp.down_proj'}\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'deepspeed', 'transformers')))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


@pytest.mark.parametrize("extra, reference", [
    ("finetuning_type: full\n", TINY_PARAMS * 4),  # a frozen copy of the starting weights
    ("finetuning_type: full\npref_loss: simpo\n", None),  # reference-free
    ("", None),  # LoRA: the policy with its adapters switched off, no copy
    ("ref_model: tiny\n", TINY_PARAMS * 4),
], ids=["full", "full-simpo", "lora", "lora-ref_model"])
def test_memory_dpo_counts_both_sides_of_a_pair_and_the_reference_copy(write, extra, reference):
    """A dpo micro-batch of b pairs is one forward of 2b sequences, and full / freeze (or ref_model) hold a frozen
    reference model beside the policy: the estimate left out both (half the activations, a whole model)."""
    write("r.yaml", RECIPE.replace("max_steps", "stage: dpo\nmax_steps") + extra)
    mem = estimate_memory(resolve("r.yaml"))
    assert mem.gpu["activations"] == round(ACT_PER_BYTE * 4 * 2 + LOGITS * 2)  # b = 2 x 8 sequences
    assert mem.gpu.get("reference") == reference


@pytest.mark.parametrize("extra, reference", [("finetuning_type: full\n", TINY_PARAMS * 4), ("", None)],
                         ids=["full", "lora"])
def test_memory_asft_counts_its_reference_copy(write, extra, reference):
    """sft's use_asft_loss scores against the starting model: a frozen copy beside a full / freeze policy (a whole
    model more), the policy itself with its adapters off under LoRA; its loss holds three (N x V) fp32 tensors where
    the cross-entropy counts one: the policy's log-probabilities, the reference's probabilities, the KL terms."""
    write("r.yaml", RECIPE + "stage: sft\nuse_asft_loss: true\n" + extra)
    mem = estimate_memory(resolve("r.yaml"))
    assert mem.gpu.get("reference") == reference
    write("r.yaml", RECIPE + "stage: sft\n" + extra)
    assert mem.gpu["activations"] - estimate_memory(resolve("r.yaml")).gpu["activations"] == 2 * LOGITS


@pytest.mark.parametrize("extra, reference", [("finetuning_type: full\n", TINY_PARAMS * 4),
                                               ("finetuning_type: freeze\n", TINY_PARAMS * 4), ("", None)],
                         ids=["full", "freeze", "lora"])
def test_memory_ppo_counts_its_reference_copy(write, extra, reference):
    """stage ppo's reference is the starting model: a frozen copy beside a full / freeze policy, the policy with its
    adapters off under LoRA."""
    write("r.yaml", RECIPE + "stage: ppo\nreward_model: saves/rm\n" + extra)
    assert estimate_memory(resolve("r.yaml")).gpu.get("reference") == reference


@pytest.mark.parametrize("keys, vocab, trained", [
    # two tokens past GPT-2's 50,257 ids: the tied embedding grows to 50,304 rows (a multiple of 64) and trains in
    # full beside LoRA (LLaMA-Factory's resize_vocab: embed_tokens + lm_head, one matrix when tied)
    ("new_special_tokens: <think>,</think>\n", 50304, 50304 * 64),
    ("resize_vocab: true\n", 50257, 50257 * 64),  # no token added: the same rows, trained in full
    ("new_special_tokens: <|endoftext|>\n", 50257, 0),  # a token the tokenizer has: nothing grows or trains
    ("resize_vocab: true\nadditional_target: ln_f\n", 50257, 2 * 64),  # additional_target chooses instead
    ("resize_vocab: true\nstage: rm\n", 50257, 50257 * 64 + 64),  # a reward model: the embedding and its score head
])
def test_memory_counts_what_new_special_tokens_train(write, keys, vocab, trained):
    """plan's counts with new_special_tokens / resize_vocab under LoRA, by hand: they counted the adapter alone, so
    a Llama 3 8B run's optimizer estimate left out 2 x 525M trained parameters."""
    write("r.yaml", RECIPE + keys)
    mem = estimate_memory(resolve("r.yaml"))
    head = 64 if "stage: rm" in keys else 0  # rm: a score head (1 x 64); the LM head was the tied embedding
    assert mem.params_total == TINY_PARAMS + (vocab - 50257) * 64 + head + TINY_LORA_8
    assert mem.params_trainable == TINY_LORA_8 + trained
