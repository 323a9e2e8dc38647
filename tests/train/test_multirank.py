"""Two ranks through the deepspeed launcher (gloo on CPU) follow the one-rank loss curve of the same global batch.

pt at ZeRO 2 is checked the same way in tests/train/test_multinode.py, whose two-ranks-on-one-node run is also the
bitwise reference of its two one-rank nodes: one launch less."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.train.run import train
from tests.acceptance.harness import write_hf_checkpoint
from tests.ports import run_on_free_port
from tests.train.helpers import BASE_SFT, check_resumed_run_is_the_uninterrupted_one, check_two_ranks_follow_one_rank

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.multirank
@pytest.mark.parametrize("base, stage_keys", [
    # answers of 1-12 words: the ranks' micro-batches carry different numbers of trained tokens, and the update
    # still weighs every token the same (at learning_rate 1e-3 a mean per rank, averaged, gave 11.96876 against
    # 11.96974); on ZeRO-3, whose gradients are reduced and partitioned by DeepSpeed's own path. eval_accuracy
    # (compute_accuracy; ZeRO-3 partitions the head, so its argmax comes from one head call) is the mean over both
    # ranks' examples: 5 held out, so rank 1 evaluates a padding copy that must not count; learning_rate 3e-2 gets
    # some answer tokens right by step 2, so the accuracies are not all 0
    # The model is a Qwen3MoeForCausalLM of 16 experts, top-1: the two ranks' rows route to different experts,
    # which ZeRO-3 gathers per module unless each sparse block is one leaf module (pipeline.model.moe.
    # zero_stage_policy, as LLaMA-Factory's add_z3_leaf_module): without it gloo fails on mismatched collectives
    # (NCCL would hang). adam_epsilon 1e-6: an expert first chosen after step 1 starts its moments afresh there, where a
    # gradient element within a few eps of zero turns the ranks' rounding into a step of lr x d / eps (as BAdam's
    # switches, check_two_ranks_follow_one_rank; at 1e-8 an expert-14 element moved 1.8e-4 against 1.5e-4 allowed)
    (BASE_SFT, dict(dataset="varied_sft", val_size=5, finetuning_type="full", zero_stage=3, compute_accuracy=True,
                    learning_rate=3e-2, warmup_steps=0, moe=True, adam_epsilon=1e-6)),
    # BAdam (use_badam) at ZeRO 0: both ranks switch to the same layer after the same steps, and DeepSpeed averages
    # the gradients of the layer that requires them (every switch after step 1, 3: both layers train); adam_epsilon
    # 1e-6: each switch restarts the moments, where rounding near a zero gradient counts (check_two_ranks_follow_one_rank)
    # (a Llama: BAdam's blocks are the `layers.<i>.` of transformers' names, which the GPT-2 preset has not)
    # With use_asft_loss (LLaMA-Factory's ASFT: a mean per micro-batch, against a frozen copy of the starting
    # model), whose update averages micro-batch means, so the one-rank run takes the same micro-batches of 2 rows
    # (twice the accumulation): each rank's reference copy scores its own rows; eval batches of 2 rows likewise
    # Its checkpoint-2 is then resumed on one rank, 2 x GA 4 (pipeline.train.world_change at ZeRO 0: the optimizer
    # state, BAdam's block bookkeeping included, is whole in the checkpoint; the data position, RNG and log window
    # move), and steps 3-4 are the two-rank run's (failed before: exit 2, "resume with 2 rank(s)")
    (BASE_SFT, dict(finetuning_type="full", zero_stage=0, use_badam=True, badam_switch_interval=2, llama=True,
                    adam_epsilon=1e-6, use_asft_loss=True, per_device_eval_batch_size=2, save_steps=2,
                    resume_on_one_rank=True)),
    # ASFT at ZeRO 3: the frozen reference is a DeepSpeed engine of its own, partitioned over the ranks and gathered
    # in each forward (preference._place), whose scores must be the whole starting model's on both ranks. The one-rank
    # run, at ZeRO 0 (a plain frozen copy; ZeRO 3 on one rank partitions nothing), is itself checked against
    # LLaMA-Factory's asft_loss_func (check_one_rank_asft); no warmup and learning_rate 1e-2: step 1 moves the policy
    # enough for step 2's KL term to count; 2 steps, one eval
    (BASE_SFT, dict(finetuning_type="full", zero_stage=3, llama=True, use_asft_loss=True, per_device_eval_batch_size=2,
                    max_steps=2, warmup_steps=0, learning_rate=1e-2, one_rank=dict(zero_stage=0, save_steps=1))),
], ids=["sft-varied-lengths-zero3", "sft-badam-asft-zero0", "sft-asft-zero3"])
def test_two_ranks_match_one_rank_with_the_same_global_batch(make_recipe, workdir, base, stage_keys):
    keys = {**dict(max_steps=4, warmup_steps=1, gradient_accumulation_steps=2, eval_steps=2), **stage_keys}
    one_rank = keys.pop("one_rank", {})  # the one-rank run's own keys
    resume_on_one_rank = keys.pop("resume_on_one_rank", False)
    if keys.pop("llama", False):
        write_hf_checkpoint(workdir / "llama", "llama", small_vocab=True)
        keys.update(model_name_or_path=str(workdir / "llama"), cutoff_len=256)
    if keys.pop("moe", False):
        from tests.acceptance.test_qwen3_moe_cli import save_pretrained_moe

        save_pretrained_moe(workdir / "moe", num_experts=16, num_experts_per_tok=1, norm_topk_prob=False)
        keys.update(model_name_or_path=str(workdir / "moe"), cutoff_len=256)
    # a loss summed over the update's tokens: one rank takes each global micro-batch whole; a mean per micro-batch
    # (ASFT): the two ranks' micro-batches one after another
    batch = dict(per_device_train_batch_size=2, gradient_accumulation_steps=4) if keys.get("use_asft_loss") else \
        dict(per_device_train_batch_size=4)
    recipe = make_recipe(base, name="one", **{**keys, **batch, **one_rank})
    one = train(recipe)
    if keys.get("use_asft_loss") and one_rank:
        check_one_rank_asft(recipe, workdir / "llama", workdir / "step1")
    make_recipe(base, name="two", per_device_train_batch_size=2, **keys)  # writes two.yaml, builds data
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "PYTHONWARNINGS"):
        env.pop(key, None)
    launcher = str(Path(os.sys.executable).with_name("deepspeed"))
    proc = run_on_free_port(lambda port: [launcher, "--num_gpus", "2", "--master_port", port, "--module",
                                          "pipeline", "train", "two.yaml"], cwd=workdir, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    check_two_ranks_follow_one_rank(one.output_dir, workdir / "saves" / "two", proc.stderr, keys)
    if resume_on_one_rank:
        shutil.copytree(workdir / "saves" / "two" / "checkpoint-2", workdir / "saves" / "resumed" / "checkpoint-2")
        train(make_recipe(base, name="resumed", **{**keys, **batch, "resume_from_checkpoint": "latest"}))
        # BAdam's fresh moments at its switch before step 3 make rounding count more (the comment of
        # check_two_ranks_follow_one_rank: 4.9e-7 seen between one and two ranks); measured here 2.2e-8
        check_resumed_run_is_the_uninterrupted_one(workdir / "saves" / "two", workdir / "saves" / "resumed",
                                                   "model/model.safetensors", atol=2e-6)
    # both ranks install deepspeed_compat.quiet_deprecated_collectives: no torch FutureWarning on DeepSpeed's
    # ZeRO-3 collectives (two per rank before)
    assert not [line for line in proc.stderr.splitlines() if "FutureWarning" in line or "deprecated" in line]


def check_one_rank_asft(recipe: Any, base: Path, scratch: Path) -> None:
    """The one-rank ASFT run's logged losses against LLaMA-Factory's asft_loss_func over transformers' logits
    (tests/acceptance/test_asft_cli.lf_losses): each step logs the mean of its micro-batches' losses; the policy of
    step 1 is the starting checkpoint `base`, that of step 2 checkpoint-1's weights; the reference is `base` both
    times. Makes the one-rank run an independent golden for the two-rank one."""
    from pipeline.data.loaders import make_loader
    from pipeline.model.weights import load_model, save_hf
    from pipeline.recipe.args import data_args
    from tests.acceptance.harness import log_losses
    from tests.acceptance.test_asft_cli import hf_logits, lf_losses

    accumulation, alpha = recipe.gradient_accumulation_steps, recipe.asft_alpha
    batches = make_loader(data_args(recipe), "train", rank=0, world_size=1, epoch=0, shuffle=True).iter_from(0)
    first, second = [[next(batches) for _ in range(accumulation)] for _ in range(2)]
    start = hf_logits(base, first + second)  # each checkpoint loaded once
    moved = hf_logits(save_hf(load_model(Path(recipe.output_dir) / "checkpoint-1" / "model"), scratch), second)
    logged = log_losses(recipe.output_dir)
    assert logged[1] == pytest.approx(sum(lf_losses(start, start, first, alpha)) / accumulation, rel=1e-5)
    losses = lf_losses(moved, start[accumulation:], second, alpha)
    assert abs(sum(losses) - sum(lf_losses(moved, moved, second, alpha))) > 1e-3 * sum(losses)  # the KL term counts
    assert logged[2] == pytest.approx(sum(losses) / accumulation, rel=1e-5)
