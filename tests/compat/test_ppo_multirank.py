"""Stage ppo on two ranks, as a LLaMA-Factory user launches its llama3_lora_ppo.yaml on two GPUs (`deepspeed
--num_gpus 2` with a ZeRO config; gloo on CPU): a tiny transformers-written Llama, a transformers-saved reward model
(reward_model_type full; a reward server in one launch) and four different prompts, one per row, so each rank
answers its own two. Three launches, shared by the checks (tests/train/test_multirank.py's way; the checks on their
outputs are separate tests):

- `zero3`: the LoRA example under ZeRO 3, 2 PPO steps, a checkpoint each. Each rank holds half of every weight
  matrix (only those under stage3_param_persistence_threshold, norms and the LoRA factors, stay whole), so step 1's
  responses are transformers' only if the rollouts decode on the weights gathered from both ranks, and the ranks'
  responses end at different lengths: the checkpoint's tokenizer_config.json names among its
  additional_special_tokens (where LLaMA-Factory's rollouts also stop: Template.ppo_stop_ids) a token that exactly
  one prompt's greedy response holds early (picked here from transformers' responses), so one rank decodes fewer
  tokens than the other. Only the one gather of the whole policy before decoding
  (pipeline.runtime.deepspeed_compat.gathered_for_generation) lets them: with DeepSpeed's per-layer gathers in the
  decoding forwards, the rank that stops first goes on to its next forward's gathers while the other still decodes.
  Measured with gathered_for_generation yielding the hooked module: gloo sees the mismatched collectives ("Received
  data size doesn't match expected size"), a rank aborts and the launch fails with its stack (before this fixture
  stopped one response early, the same change passed). Where ranks wait instead (NCCL can), LAUNCH_S turns the
  hang into a failure with both ranks' stacks (tests.ports.run_to_end).
- `resumed`: that run killed after its step-1 checkpoint and resumed on two ranks to step 2: every file of its
  step-2 checkpoint (both ranks' RNG, the adapter, the value head, the ZeRO-3 partitions of the optimizer, the KL
  coefficient and the score moments) and every logged value are the uninterrupted run's, bitwise.
- `zero1_full`: the example with finetuning_type full (a frozen copy of the base as the reference) under ZeRO 1,
  with ppo_buffer_size 2: each rank's two rows a step are two backward batches of one row, an update each, so the
  ranks' updates, statistics and collectives run per buffer slice. It keeps the example's warmup (step 1's learning
  rate 0), so both updates of step 1 see the base, as the LoRA run's one update does. Its reward model is a server
  (reward_model_type api: a thread of the test process on 127.0.0.1 answering transformers' scores of the texts
  LLaMA-Factory posts), which records the rank each request came from.

Golden, computed here without the code under test, for both training launches:
- step 1 against the one-rank golden of tests/compat/test_ppo_example.py: the policy is its base (LoRA B = 0, full:
  not yet updated; the rollout comes before any update), so each row's response is transformers' greedy
  continuation of its prompt, its score the reward model's (transformers) score of prompt + response (zero1_full:
  the server's for that text), and the KL 0.
  The logged reward is the mean over both ranks of each rank's mean (TRL's gather_stats), which with two rows a rank
  is the mean of the four scores: it is so only if the ranks answered different prompts (the loader's shards) and
  the mean was gathered. The logged response tokens are the four responses' lengths: one stopped early.
- the KL coefficient: TRL's AdaptiveKLController (trl/trainer/utils.py:65-69, re-typed in adaptive_kl) from 0.2
  by each step's logged (gathered) KL, with n_steps = batch_size x num_processes (ppo_trainer.py:872-876): 2 rows
  a rank x 2 ranks (zero1_full: TRL's batch_size 1 x 1 x ppo_buffer_size 2, so a step that counted one update's
  rows, 1 x 2 ranks, is told apart as one rank's). zero3's step-2 KL (its policy moved at step 1: warmup_ratio 0)
  is within 20 % of ppo_target, so rank 0's coefficient after it, which its checkpoint keeps, is the golden only
  from the ranks' mean KL; zero1_full's KL is 0 at both steps (its policy first moves in step 2).
- ppo_score_norm's moments after step 1 (rank 0's checkpoint): TRL's RunningMoments over all four scores
  (get_global_statistics, trl/trainer/utils.py:634-649: count 4, not one rank's 2).
A one-rank run of the same four rows is no further golden past these: it whitens the advantages over its four rows,
where each of two ranks whitens over its own two (TRL's per-process masked_whiten), so its losses differ by design.
What else of step 1 involves no dropout (the policy loss, its clip fraction and approximate KL: the base's
log-probabilities, the value head's eval-mode values) is the same in the LoRA ZeRO-3 and the full ZeRO-1 run: the
latter's two updates of one row are the former's one of two rows only if the advantages were whitened over the
rank's whole buffer (TRL's compute_advantages over its batch_size rows), not per update.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.acceptance.harness import assert_same_run, cli_env, crash_copy
from tests.compat.test_ppo_example import (NEW_TOKENS, PPO, PPO_RUN, checkout, checkpoint_files, greedy_sequence,
                                           logged, policy_recipe, prompt_ids)
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
LAUNCH_S = 240  # a launch takes 20-40 s here; past this the ranks are taken as hung (run_to_end: their stacks)
# each launch's own keys, ROWS rows a rank a PPO step in both: the LoRA one updates once a step (accumulating its 2
# rows) from step 1 on; the full one takes them as ppo_buffer_size 2 backward batches of 1 row (2 updates a step, TRL's
# batch_size 1 x 1 x 2, n_steps 2 x RANKS) with the example's warmup_ratio 0.1 (1 of 2 steps): step 1's learning rate
# is 0, so both of its updates see the base, as the LoRA run's one does
ZERO3 = ("zero_stage=3", f"gradient_accumulation_steps={ROWS}", "warmup_ratio=0")
ZERO1_FULL = ("zero_stage=1", "gradient_accumulation_steps=1", f"ppo_buffer_size={ROWS}")
TRAINED = ("zero3", "zero1_full")
NO_DROPOUT = ("reward", "kl", "kl_coef", "loss/policy", "policy/clipfrac", "policy/approxkl")


def adaptive_kl(kls: list[float], n_steps: int) -> list[float]:
    """TRL 0.9.6's AdaptiveKLController.update (trl/trainer/utils.py:65-69), re-typed: the coefficient before
    each step, then after the last."""
    values = [INIT_KL_COEF]
    for kl in kls:
        error = min(max(kl / TARGET - 1, -0.2), 0.2)
        values.append(values[-1] * (1 + error * n_steps / HORIZON))
    return values


def early_stop(responses: list[list[int]]) -> int:
    """The token at which exactly one of `responses` (transformers' greedy ones, all max_new_tokens long) ends
    earliest while no other holds it: as an EOS, one rank's response ends there and the other rank's run on."""
    assert all(len(r) == NEW_TOKENS for r in responses), responses  # the checkpoint's own stops never come
    only = [(r.index(t), t) for i, r in enumerate(responses) for t in r
            if not any(t in other for j, other in enumerate(responses) if j != i)]
    assert only, f"every token of the greedy responses is in two of them: {responses}"
    at, token = min(only)
    assert at < NEW_TOKENS - 1, responses  # early: that response ends shorter than the others
    return token


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, object]:
    """The checkout with the four prompts, its checkpoint stopping at early_stop's token, the reward model, and
    step 1's golden scores and response lengths (transformers)."""
    root = tmp_path_factory.mktemp("ppo2")
    base, work = checkout(root)
    rows = [{"instruction": prompt, "input": "", "output": "ok"} for prompt in PROMPTS]
    (work / "data/four_prompts.json").write_text(json.dumps(rows), "utf-8")
    registry = json.loads((work / "data/dataset_info.json").read_text("utf-8"))
    registry["four_prompts"] = {"file_name": "four_prompts.json"}
    (work / "data/dataset_info.json").write_text(json.dumps(registry), "utf-8")
    policy = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    starts = [prompt_ids(base, prompt).shape[1] for prompt in PROMPTS]
    stop = early_stop([greedy_sequence(base, p, policy)[0, s:].tolist() for p, s in zip(PROMPTS, starts)])
    sequences = [greedy_sequence(base, prompt, policy, stops=(stop,)) for prompt in PROMPTS]
    lengths = [seq.shape[1] - s for seq, s in zip(sequences, starts)]
    assert sorted(lengths)[1:] == [NEW_TOKENS] * 3 and lengths.count(NEW_TOKENS) == 3  # one ended early
    torch.manual_seed(0)
    scorer = transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1).eval()
    scorer.save_pretrained(root / "rm_full")
    with torch.no_grad():
        scores = [float(scorer(seq).logits[0, 0]) for seq in sequences]
    # what LLaMA-Factory posts to a reward server for each row (test_ppo_reward_models.py's reward server test)
    decode = transformers.AutoTokenizer.from_pretrained(base).batch_decode
    texts = [decode(seq, skip_special_tokens=False)[0] for seq in sequences]
    # where LLaMA-Factory's rollouts stop besides the template's EOS: the tokenizer's additional_special_tokens
    # (tokenizer_config.json; a vocabulary token by its byte-level text, which transformers gives its id)
    config = json.loads((base / "tokenizer_config.json").read_text("utf-8"))
    config["additional_special_tokens"] = [transformers.AutoTokenizer.from_pretrained(base).convert_ids_to_tokens(stop)]
    (base / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    used = ["max_steps=2", "dataset=four_prompts", f"max_new_tokens={NEW_TOKENS}", "logging_steps=1",
            "ppo_epochs=1", "save_steps=1", "ppo_score_norm=true", "learning_rate=1e-2", f"ppo_target={TARGET}",
            "bf16=false", "dataloader_num_workers=0", "overwrite_cache=true"]
    return {"base": base, "work": work, "used": used, "scores": scores, "lengths": lengths, "texts": texts,
            "reward_model": (f"reward_model={root / 'rm_full'}", "reward_model_type=full")}


def launch(prepared: dict[str, object], recipe: str, *overrides: str) -> dict[str, object]:
    """`deepspeed --num_gpus 2 --module pipeline train recipe` with the prepared overrides and `overrides`; the
    run folder, its log and stderr."""
    work = prepared["work"]
    launcher = str(Path(os.sys.executable).with_name("deepspeed"))
    proc = run_on_free_port(lambda port: [launcher, "--num_gpus", str(RANKS), "--master_port", port, "--module",
                                          "pipeline", "train", recipe, *prepared["used"], *overrides],
                            cwd=work, env=cli_env(), timeout=LAUNCH_S)
    assert proc.returncode == 0, proc.stderr[-6000:] + proc.stdout[-3000:]
    run = work / next(o.split("=", 1)[1] for o in overrides if o.startswith("output_dir="))
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text("utf-8").splitlines()]
    return {**prepared, "run": run, "log": log, "stderr": proc.stderr}


@pytest.fixture(scope="module")
def zero3(prepared) -> dict[str, object]:
    """The LoRA example under ZeRO 3: 2 PPO steps, a checkpoint each."""
    return {**launch(prepared, PPO, *ZERO3, *prepared["reward_model"], f"output_dir={PPO_RUN}"), "stage": 3}


@pytest.fixture(scope="module")
def zero1_full(prepared) -> dict[str, object]:
    """The example with finetuning_type full under ZeRO 1, ppo_buffer_size 2, its own warmup, the reward model
    behind a server: transformers' scores of the texts LLaMA-Factory posts (HTTP 500 for any other text)."""
    from tests.helpers.reward_server import ScoringServer, sending_rank

    known = dict(zip(prepared["texts"], prepared["scores"]))

    def reply(messages: list[str]) -> tuple[int, bytes]:
        if any(m not in known for m in messages):
            return 500, json.dumps({"unknown texts": [m for m in messages if m not in known]}).encode()
        return 200, json.dumps({"scores": [known[m] for m in messages]}).encode()

    recipe = policy_recipe(prepared["work"], "full")
    with ScoringServer(reply=reply, sender=sending_rank) as server:
        launched = launch(prepared, recipe, *ZERO1_FULL, f"reward_model={server.url}", "reward_model_type=api",
                          "output_dir=saves/full_zero1")
    return {**launched, "stage": 1, "posts": server.posts}


@pytest.fixture(scope="module")
def resumed(zero3) -> dict[str, object]:
    """zero3's run as killed after its step-1 checkpoint, resumed on two ranks."""
    crash_copy(zero3["run"], zero3["work"] / "saves/resumed", 1)
    return launch(zero3, PPO, *ZERO3, *zero3["reward_model"], "output_dir=saves/resumed",
                  "resume_from_checkpoint=latest")


def objective(run: Path, step: int) -> dict[str, object]:
    return json.loads((run / f"checkpoint-{step}/trainer_state.json").read_text("utf-8"))["objective"]


@pytest.mark.parametrize("name", TRAINED)
def test_step_one_is_the_one_rank_golden_over_both_ranks_prompts(request, name):
    launched = request.getfixturevalue(name)
    log = launched["log"]
    assert [rec["step"] for rec in log] == [1, 2]  # one writer
    assert launched["stderr"].count("ppo: reward_model") == 1  # rank 0 describes the run
    ds_config = json.loads((launched["run"] / "ds_config.json").read_text("utf-8"))
    assert ds_config["zero_optimization"]["stage"] == launched["stage"]
    first = log[0]
    assert first["kl"] == 0.0 and first["policy/approxkl"] == pytest.approx(0.0, abs=1e-10)
    assert len(set(launched["scores"])) == len(PROMPTS)  # four different scores: the mean tells the rows apart
    assert first["reward"] == pytest.approx(sum(launched["scores"]) / len(PROMPTS), abs=1e-5)
    assert first["trained_tokens_seen"] == sum(launched["lengths"])  # both ranks' responses, one ended early


def test_a_full_policy_on_zero1_takes_the_lora_zero3_step_one(zero3, zero1_full):
    """Step 1 decodes, scores and passes the base in both (LoRA B = 0; the full policy not yet updated): whatever
    no dropout enters (the update passes' value head draws dropout from each run's own RNG) is the same."""
    lora, full = zero3["log"][0], zero1_full["log"][0]
    for key in NO_DROPOUT:
        assert full[key] == pytest.approx(lora[key], rel=1e-5, abs=1e-7), key


def test_a_ppo_buffer_of_two_updates_once_a_row_on_both_ranks(zero1_full):
    """ppo_buffer_size 2 on two ranks: each rank's 2 rows a step are 2 backward batches of 1 row, an optimizer update
    each (TRL 0.9.6's step(): backward_batch_size = per_device_train_batch_size x gradient_accumulation_steps 1,
    trl/trainer/ppo_trainer.py:791-806), the ranks updating together (ZeRO 1's gradient all-reduce): DeepSpeed's
    update count is 2 after step 1 and 4 after step 2. The schedule steps once a PPO step (ppo_trainer.py:886-887):
    the warmup's 0 at step 1 (both of its updates, see the base: test_a_full_policy_on_zero1_takes_the_lora_zero3_
    step_one), the peak at step 2."""
    from pipeline.train.safestate import load_state

    run = zero1_full["run"]
    updates = [load_state(run / f"checkpoint-{step}/deepspeed/mp_rank_00_model_states.pt")["global_steps"]
               for step in (1, 2)]
    assert updates == [ROWS, 2 * ROWS]
    assert [rec["lr"] for rec in zero1_full["log"]] == [0.0, 1e-2]


def test_a_reward_server_is_asked_each_row_once_by_the_rank_that_holds_it(zero1_full):
    """reward_model_type api on two ranks: each rank posts its own rows, one request per mini-batch of 1 row
    (LLaMA-Factory's get_rewards on every process), so a step is 4 requests, 2 from each rank, and their texts are
    the four rows' (transformers' decode of prompt + greedy response) each once: neither rank asks for the other's
    rows. Step 2 asks for the same four texts (the policy has not moved before its rollout: step 1's learning rate
    is 0), shared out anew (the loader reshuffles each epoch). The logged reward is the mean of the served scores at
    both steps (step 1: also test_step_one_is_the_one_rank_golden_over_both_ranks_prompts)."""
    posts = zero1_full["posts"]
    assert len(posts) == 2 * RANKS * ROWS, posts
    assert all(post["body"]["model"] == "model" and len(post["body"]["messages"]) == 1 for post in posts), posts
    for step in (posts[:RANKS * ROWS], posts[RANKS * ROWS:]):  # step 2's rollout follows step 1's updates
        asked = {rank: [p["body"]["messages"][0] for p in step if p["sender"] == rank] for rank in range(RANKS)}
        assert [len(texts) for texts in asked.values()] == [ROWS] * RANKS, step
        assert sorted(asked[0] + asked[1]) == sorted(zero1_full["texts"])
    assert [rec["reward"] for rec in zero1_full["log"]] == pytest.approx([sum(zero1_full["scores"]) / len(PROMPTS)] * 2,
                                                                         abs=1e-5)


@pytest.mark.parametrize("name", TRAINED)
@pytest.mark.parametrize("where", ["log", "checkpoint"])
def test_the_kl_coefficient_moves_by_the_gathered_kl_and_both_ranks_rows(request, name, where):
    launched = request.getfixturevalue(name)
    log = launched["log"]
    golden = adaptive_kl([rec["kl"] for rec in log], ROWS * RANKS)
    if where == "log":  # the coefficient each step used
        assert [rec["kl_coef"] for rec in log] == pytest.approx(golden[:-1], rel=1e-9)
    else:  # rank 0's after each step, kept for a resume
        assert [objective(launched["run"], step)["kl_coef"] for step in (1, 2)] == pytest.approx(golden[1:],
                                                                                                   rel=1e-9)
    assert golden[1] != pytest.approx(adaptive_kl([0.0], ROWS)[1], rel=1e-9)  # one rank's rows would differ


@pytest.mark.parametrize("name", TRAINED)
def test_the_score_moments_are_both_ranks_scores(request, name):
    launched = request.getfixturevalue(name)
    moments = objective(launched["run"], 1)["score_moments"]
    assert moments == pytest.approx(trl_score_norm([launched["scores"]])[1], rel=1e-5)
    assert moments["count"] == pytest.approx(ROWS * RANKS)


def test_outputs_load_in_peft_with_per_rank_state(zero3):
    from safetensors.torch import load_file

    run = zero3["run"]
    assert {p.name for p in (run / "checkpoint-2" / "rng").iterdir()} == {"rank-0.safetensors", "rank-1.safetensors"}
    assert set(load_file(run / "adapter" / "value_head.safetensors")) == {"v_head.summary.weight",
                                                                         "v_head.summary.bias"}
    model = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(zero3["base"]),
                                           run / "adapter")
    trained = [p for name, p in model.named_parameters() if "lora_B" in name]
    assert trained and any(p.abs().sum() > 0 for p in trained)  # step 2 moved the adapter (lr 1e-2)


def test_a_two_rank_run_resumed_after_step_one_is_the_uninterrupted_one(zero3, resumed):
    """Bitwise: both ranks' RNG (the value head's dropout), the loader's position (each rank's shard), the adapter
    and value head, both ranks' ZeRO-3 optimizer partitions, the KL coefficient and the score moments all come back
    (step 2's KL is not 0: its rollout is the policy step 1 moved, which the resume must load)."""
    assert resumed["log"][1]["kl"] != 0.0
    assert_same_run(zero3["run"], resumed["run"], "adapter/value_head.safetensors")
    assert checkpoint_files(resumed["run"] / "checkpoint-2") == checkpoint_files(zero3["run"] / "checkpoint-2")
    assert logged(resumed["run"]) == logged(zero3["run"])
