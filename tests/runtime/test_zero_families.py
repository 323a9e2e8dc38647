"""The families added after GPT-2 / Llama / Qwen3-MoE under ZeRO-3: a LoRA run of 2 steps partitions every parameter
(DeepSpeed gathers each module's around its forward) and must log the losses of the same run at ZeRO 0; merge then
reads the ZeRO-3 run's adapter back and its merged/ loads in transformers computing the ZeRO-0 run's trained logits.
One process each (gloo on the CPU, as tests/train runs; ZeRO-3 on one rank partitions into one shard but runs
DeepSpeed's gather / release hooks and its prefetch trace all the same).

What each checkpoint reaches that the older families' ZeRO-3 tests (tests/train/test_multirank.py, test_dora_zero3,
test_checkpoint_resume) did not:
- qwen2_moe: sparse blocks whose experts are not all chosen on a step (the block one ZeRO-3 leaf: moe.
  zero_stage_policy), a shared expert and its sigmoid gate, the router's aux loss added (moe_aux_loss_coef). Mixtral
  is the same sparse block without the shared expert: its ZeRO-3 run is the two-rank one (test_zero_families_multirank)
- phi3: fused qkv_proj / gate_up_proj LoRA (one adapter per fused Linear), partial rotary, LongRoPE's switch of
  factors by the forward's length (rows past original_max_position_embeddings 16)
- gemma3: the tied head read from the partitioned embedding, the embedding scale sqrt(hidden), two RoPE tables
  (local / global layers), q / k norms. Gemma 1 is Gemma 3's embedding, norms and GeGLU in Llama's block: no path
  Gemma 3 does not run
- gemma2: tanh softcapping on the explicit attention path and of the logits
- granite: the four multipliers, the head's logits_scaling
- olmo2: post-branch norms, whole-projection q / k norms
- glm4: q / k / v biases, fused gate_up_proj, interleaved partial rotary, four norms per block. GLM (GlmForCausalLM) is
  the same block less two norms
And one full fine-tuning run at ZeRO-3 (gemma3: the tied embedding is one partitioned parameter trained by both its
uses).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline import merge
from pipeline.runtime.log import read_log
from pipeline.train.run import train
from tests.acceptance.harness import random_model, save_pretrained_small, trained_model
from tests.train.conftest import launch_env  # noqa: F401  (autouse here: one rank in this process, on the CPU)
from tests.train.helpers import BASE_SFT, check_two_ranks_follow_one_rank
from tests.train.test_resume_world_size import launch_two_ranks

transformers = pytest.importorskip("transformers")

SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)


def save_gemma(folder: Path, model_class: str, config_class: str, **config) -> None:
    """A random tiny Gemma `model_class` beside the Gemma-form tokenizer (tests/helpers/gemma_vocab.py)."""
    from tests.helpers.gemma_vocab import VOCAB_SIZE, write_gemma_tokenizer_dir

    write_gemma_tokenizer_dir(folder)
    random_model(getattr(transformers, model_class),
                 getattr(transformers, config_class)(**config, vocab_size=VOCAB_SIZE)).save_pretrained(folder)


def save_small(vocab: str, model_class: str, config_class: str, special: tuple[str, ...], **config):
    """A saver of a random tiny `model_class` with the small byte-level tokenizer of `vocab` (harness.
    save_pretrained_small, whose config takes the tokenizer's `special` ids)."""
    return lambda folder: save_pretrained_small(folder, vocab, model_class, config_class, special, **SHAPE, **config)


def save_qwen2_moe(folder: Path) -> None:
    from tests.acceptance.test_moe_families_cli import save_pretrained_qwen2_moe

    save_pretrained_qwen2_moe(folder)


GEMMA = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, query_pre_attn_scalar=12, sliding_window=6, max_position_embeddings=256)
CHECKPOINTS = {
    "qwen2_moe": save_qwen2_moe,
    "phi3": save_small("phi4", "Phi3ForCausalLM", "Phi3Config", ("bos_token_id", "eos_token_id", "pad_token_id"),
                       partial_rotary_factor=0.5,
                       original_max_position_embeddings=16, tie_word_embeddings=False,
                       rope_scaling={"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [2.0, 4.0]}),
    "gemma3": lambda folder: save_gemma(folder, "Gemma3ForCausalLM", "Gemma3TextConfig", **GEMMA,
                                        sliding_window_pattern=3, rope_theta=10000.0, rope_local_base_freq=100.0),
    "gemma2": lambda folder: save_gemma(folder, "Gemma2ForCausalLM", "Gemma2Config", **GEMMA,
                                        attn_logit_softcapping=2.0, final_logit_softcapping=3.0),
    "granite": save_small("granite3", "GraniteForCausalLM", "GraniteConfig", ("bos_token_id", "eos_token_id", "pad_token_id"), tie_word_embeddings=True,
                          embedding_multiplier=6.0, attention_multiplier=0.05, residual_multiplier=0.3,
                          logits_scaling=4.0),
    "olmo2": save_small("olmo2", "Olmo2ForCausalLM", "Olmo2Config", ("bos_token_id", "eos_token_id", "pad_token_id"), tie_word_embeddings=False),
    "glm4": save_small("glm4", "Glm4ForCausalLM", "Glm4Config", ("eos_token_id", "pad_token_id"), head_dim=8,
                       tie_word_embeddings=False),
}
# 2 steps of 2 micro-batches of 2 rows, every Linear adapted, no warmup: step 2's loss shows step 1's update
KEYS = dict(max_steps=2, warmup_steps=0, learning_rate=5e-2, per_device_train_batch_size=2, val_size=0,
            gradient_accumulation_steps=2, cutoff_len=256, lora_target="all")


@pytest.mark.parametrize("family,finetuning", [*((f, "lora") for f in CHECKPOINTS), ("gemma3", "full")])
def test_zero3_logs_the_zero0_losses_and_its_export_loads_in_transformers(make_recipe, workdir, family, finetuning):
    base = workdir / family
    CHECKPOINTS[family](base)
    keys = dict(KEYS, model_name_or_path=str(base), finetuning_type=finetuning,
                **({"moe_aux_loss_coef": 0.01} if family == "qwen2_moe" else {}))
    runs = {stage: train(make_recipe(BASE_SFT, name=f"zero{stage}", zero_stage=stage, **keys)) for stage in (0, 3)}
    logs = {stage: read_log(Path(run.output_dir) / "trainer_log.jsonl") for stage, run in runs.items()}
    for name in ("loss", *(("aux_loss",) if family == "qwen2_moe" else ())):
        assert [r[name] for r in logs[3] if "loss" in r] == pytest.approx([r[name] for r in logs[0] if "loss" in r],
                                                                          rel=1e-4), name
    merge.run(make_recipe(BASE_SFT, name="zero3", zero_stage=3, **keys))  # LoRA: folded in; full: re-exported
    exported = workdir / "saves" / "zero3" / "merged"
    assert json.loads((exported / "config.json").read_text())["architectures"] == \
        json.loads((base / "config.json").read_text())["architectures"]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ours = trained_model(workdir / "zero0.yaml", workdir)  # the ZeRO-0 run's weights, as generate loads them
    x = torch.randint(0, theirs.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(x)
        torch.testing.assert_close(theirs(x).logits, want, rtol=0, atol=1e-4)
        # 12 positions: within Phi-3's LongRoPE window (its short factors; the 20 above and training: the long)
        torch.testing.assert_close(theirs(x[:, :12]).logits, ours(x[:, :12]), rtol=0, atol=1e-4)
        before = transformers.AutoModelForCausalLM.from_pretrained(base).eval()(x).logits
        assert (want - before).abs().max() > 1e-3  # the runs trained


@pytest.mark.multirank
@pytest.mark.parametrize("family", ["mixtral", "gemma3"])
def test_two_ranks_at_zero3_follow_one_rank_with_the_same_global_batch(make_recipe, workdir, family):
    """Full fine-tuning, 2 x GA 2 on each of two ranks (the deepspeed launcher, gloo) against 4 x GA 2 on one, as
    tests/train/test_multirank.py checks GPT-2 / Llama / Qwen3-MoE: the same losses, eval losses and final weights.
    Mixtral with 8 experts, top-1: the ranks' rows route to different experts, some chosen on one rank only (each
    sparse block one ZeRO-3 leaf: moe.zero_stage_policy; with it returning [] rank 1 died in gloo); adam_epsilon 1e-6 for an expert first chosen after step 1
    (test_multirank says why). No moe_aux_loss_coef: the logged loss counts its term times the ranks, as transformers'
    Trainer logs it (docs/models.md), each rank's over its own tokens (load_balancing_loss_func is a product of two
    means, not a sum the ranks split). Gemma 3: the tied, scaled embedding is one parameter partitioned over both ranks, its gradient from the
    embedding and the head reduced across them."""
    base = workdir / family
    if family == "mixtral":
        from tests.acceptance.test_moe_families_cli import save_pretrained_mixtral

        save_pretrained_mixtral(base, num_local_experts=8, num_experts_per_tok=1)
    else:
        CHECKPOINTS[family](base)
    keys = dict(model_name_or_path=str(base), finetuning_type="full", zero_stage=3, max_steps=2, warmup_steps=0,
                learning_rate=1e-2, adam_epsilon=1e-6, gradient_accumulation_steps=2, val_size=4, eval_steps=2,
                cutoff_len=256)
    one = train(make_recipe(BASE_SFT, name="one", per_device_train_batch_size=4, **keys))
    make_recipe(BASE_SFT, name="two", per_device_train_batch_size=2, **keys)  # writes two.yaml
    check_two_ranks_follow_one_rank(one.output_dir, workdir / "saves" / "two", launch_two_ranks(workdir, "two.yaml"),
                                    keys)
