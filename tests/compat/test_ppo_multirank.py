"""Stage ppo on two ranks under ZeRO 3, as a LLaMA-Factory user launches its llama3_lora_ppo.yaml on two GPUs
(`deepspeed --num_gpus 2` with a ZeRO-3 config; gloo on CPU): a tiny transformers-written Llama, a
transformers-saved reward model (reward_model_type full) and four different prompts, one per row, so each rank
answers its own two. ZeRO 3 rather than 2 (this launch ran under ZeRO 2 before ZeRO 3 was implemented; everything
it checks holds at either stage, and the suite has no time for a second launch): each rank holds half of every
weight matrix (only those under stage3_param_persistence_threshold, norms and the LoRA factors, stay whole), so step
1's responses are transformers' only if the rollouts decode on the weights gathered from both ranks
(pipeline.runtime.deepspeed_compat.gathered_for_generation). Responses here all run to max_new_tokens, so ranks
decoding different numbers of tokens (what the gather before decoding makes safe) are not exercised.

One launch (tests/train/test_multirank.py's way); the checks on its outputs are separate tests. Golden, computed
here without the code under test:
- step 1 against the one-rank golden of tests/compat/test_ppo_example.py: the policy is its base (LoRA B = 0, the
  rollout comes before any update), so each row's response is transformers' greedy continuation of its
  prompt, its score the reward model's (transformers) score of prompt + response, and the KL 0. The logged reward
  is the mean over both ranks of each rank's mean (TRL's gather_stats), which with two rows a rank is the mean of
  the four scores: it is so only if the ranks answered different prompts (the loader's shards) and the mean was
  gathered.
- the KL coefficient: TRL's AdaptiveKLController (trl/trainer/utils.py:65-69, re-typed in adaptive_kl) from 0.2
  by each step's logged (gathered) KL, with n_steps = batch_size x num_processes (ppo_trainer.py:872-876): 2 rows
  a rank x 2 ranks. Step 2's KL (the policy moved at step 1: warmup_ratio 0) is within 20 % of ppo_target, so
  rank 0's coefficient after it, which its checkpoint keeps, is the golden only from the ranks' mean KL.
- ppo_score_norm's moments after step 1 (rank 0's checkpoint): TRL's RunningMoments over all four scores
  (get_global_statistics, trl/trainer/utils.py:634-649: count 4, not one rank's 2).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.acceptance.harness import cli_env
from tests.compat.test_ppo_example import NEW_TOKENS, PPO, PPO_RUN, checkout, greedy_sequence
from tests.model.test_ppo_math import trl_score_norm
from tests.ports import run_on_free_port

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.multirank

PROMPTS = ("Say hi", "Name a color", "Count to three", "What is rain")
RANKS, ROWS = 2, 2  # rows a rank a PPO step: per_device_train_batch_size 1 x gradient_accumulation_steps 2
INIT_KL_COEF, HORIZON = 0.2, 10000  # TRL 0.9.6 PPOConfig's init_kl_coef and horizon
# ppo_target near step 2's KL (3.66 here), so its update is not clipped to -20 %: rank 0's coefficient then
# depends on the KL's value, and only the ranks' mean gives the golden (each rank's own KL differs)
TARGET = 4.0


def adaptive_kl(kls: list[float], n_steps: int) -> list[float]:
    """TRL 0.9.6's AdaptiveKLController.update (trl/trainer/utils.py:65-69), re-typed: the coefficient before
    each step, then after the last."""
    values = [INIT_KL_COEF]
    for kl in kls:
        error = min(max(kl / TARGET - 1, -0.2), 0.2)
        values.append(values[-1] * (1 + error * n_steps / HORIZON))
    return values


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, object]:
    """The two-rank run of the LLaMA-Factory example (2 PPO steps, a checkpoint each) and the step-1 scores."""
    root = tmp_path_factory.mktemp("ppo2")
    base, work = checkout(root)
    rows = [{"instruction": prompt, "input": "", "output": "ok"} for prompt in PROMPTS]
    (work / "data/four_prompts.json").write_text(json.dumps(rows), "utf-8")
    registry = json.loads((work / "data/dataset_info.json").read_text("utf-8"))
    registry["four_prompts"] = {"file_name": "four_prompts.json"}
    (work / "data/dataset_info.json").write_text(json.dumps(registry), "utf-8")
    torch.manual_seed(0)
    scorer = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).eval()
    scorer.save_pretrained(root / "rm_full")
    with torch.no_grad():
        scores = [float(scorer(greedy_sequence(base, prompt)).logits[0, 0]) for prompt in PROMPTS]
    used = ["max_steps=2", "dataset=four_prompts", f"max_new_tokens={NEW_TOKENS}", "logging_steps=1",
            f"gradient_accumulation_steps={ROWS}", "ppo_epochs=1", "save_steps=1", "ppo_score_norm=true",
            "learning_rate=1e-2", "warmup_ratio=0", f"ppo_target={TARGET}", f"reward_model={root / 'rm_full'}",
            "reward_model_type=full", "zero_stage=3", "bf16=false", "dataloader_num_workers=0", "overwrite_cache=true"]
    launcher = str(Path(os.sys.executable).with_name("deepspeed"))
    proc = run_on_free_port(lambda port: [launcher, "--num_gpus", str(RANKS), "--master_port", port, "--module",
                                          "pipeline", "train", PPO, *used], cwd=work, env=cli_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    run = work / PPO_RUN
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text("utf-8").splitlines()]
    return {"base": base, "run": run, "log": log, "scores": scores, "stderr": proc.stderr}


def objective(run: Path, step: int) -> dict[str, object]:
    return json.loads((run / f"checkpoint-{step}/trainer_state.json").read_text("utf-8"))["objective"]


def test_step_one_is_the_one_rank_golden_over_both_ranks_prompts(launched):
    log = launched["log"]
    assert [rec["step"] for rec in log] == [1, 2]  # one writer
    assert launched["stderr"].count("ppo: reward_model") == 1  # rank 0 describes the run
    ds_config = json.loads((launched["run"] / "ds_config.json").read_text("utf-8"))
    assert ds_config["zero_optimization"]["stage"] == 3  # the weights partitioned: the rollouts decode gathered ones
    first = log[0]
    assert first["kl"] == 0.0 and first["policy/approxkl"] == pytest.approx(0.0, abs=1e-10)
    assert len(set(launched["scores"])) == len(PROMPTS)  # four different scores: the mean tells the rows apart
    assert first["reward"] == pytest.approx(sum(launched["scores"]) / len(PROMPTS), abs=1e-5)


@pytest.mark.parametrize("where", ["log", "checkpoint"])
def test_the_kl_coefficient_moves_by_the_gathered_kl_and_both_ranks_rows(launched, where):
    log = launched["log"]
    golden = adaptive_kl([rec["kl"] for rec in log], ROWS * RANKS)
    if where == "log":  # the coefficient each step used
        assert [rec["kl_coef"] for rec in log] == pytest.approx(golden[:-1], rel=1e-9)
    else:  # rank 0's after each step, kept for a resume
        assert [objective(launched["run"], step)["kl_coef"] for step in (1, 2)] == pytest.approx(golden[1:],
                                                                                                   rel=1e-9)
    assert golden[1] != pytest.approx(adaptive_kl([0.0], ROWS)[1], rel=1e-9)  # one rank's rows would differ


def test_the_score_moments_are_both_ranks_scores(launched):
    moments = objective(launched["run"], 1)["score_moments"]
    assert moments == pytest.approx(trl_score_norm([launched["scores"]])[1], rel=1e-5)
    assert moments["count"] == pytest.approx(ROWS * RANKS)


def test_outputs_load_in_peft_with_per_rank_state(launched):
    from safetensors.torch import load_file

    run = launched["run"]
    assert {p.name for p in (run / "checkpoint-2" / "rng").iterdir()} == {"rank-0.safetensors", "rank-1.safetensors"}
    assert set(load_file(run / "adapter" / "value_head.safetensors")) == {"v_head.summary.weight",
                                                                         "v_head.summary.bias"}
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(launched["base"]),
                                           run / "adapter")
    trained = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # step 2 moved the adapter (lr 1e-2)
