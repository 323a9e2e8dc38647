"""Stage ppo as a LLaMA-Factory user runs it: its llama3_lora_reward.yaml (stage rm, LoRA) trains the reward model,
then its llama3_lora_ppo.yaml (reward_model: that run's output_dir, reward_model_type lora by default) trains the
policy 3 PPO steps (ppo_buffer_size 2, ppo_score_norm on, a checkpoint each step) through `python -m pipeline
train`, on a tiny transformers-written Llama (the two recipes: tests/compat/lf_examples_removed/NOTICE.md). Its
epochs, optimizer updates, KL coefficients and score moments count the whole buffer, as TRL 0.9.6 does. The PPO run's adapter loads in PEFT and gives our trained model's
logits; value_head.safetensors lies beside it with LLaMA-Factory's keys. reward_model_type full (the rm adapter
merged by PEFT, saved by transformers) loads as the same reward model as the lora form the run used. The score
moments saved at step 3 are TRL's RunningMoments over the logged scores; the run killed after step 2 and resumed
ends bitwise as the uninterrupted one.

Golden for step 1, computed here with transformers and PEFT: every row has one prompt (so the rows of step 1 are
known whatever the order), the policy is the base (LoRA starts at B = 0) and step 1's learning rate is 0 (the
example's warmup), so: the response is transformers' greedy continuation of the prompt written out in
LLaMA-Factory's llama3 template, stopped where LLaMA-Factory's rollouts stop (its EOS and the tokenizer's
additional special tokens, not at the token stop_in_generation_config adds to generation_config.json's eos
list), the logged reward is the reward model's score of prompt + response (the base with the rm run's adapter, in
PEFT), the KL to the reference (the same model) is 0, and the policy loss is 0
(ratio 1 on whitened advantages of identical rows, whose mean is 0). Full, freeze and OFT policies take the same
step 1; the OFT run's step-3 KL (the first after its policy moved) is PEFT's: the checkpoint-2 adapter's greedy
response scored with the adapter on and off.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.harness import assert_close, assert_same_run, crash_copy, pipeline, trained_model
from tests.compat.test_lf_examples import tiny_model
from tests.compat.test_lf_recipes import lf_checkout
from tests.model.test_ppo_math import trl_score_norm
from tests.reliability.rel_helpers import run_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

REMOVED = Path(__file__).with_name("lf_examples_removed")
RM, PPO = "examples/train_lora/llama3_lora_reward.yaml", "examples/train_lora/llama3_lora_ppo.yaml"
RM_RUN, PPO_RUN = "saves/llama3-8b/lora/reward", "saves/llama3-8b/lora/ppo"
PROMPT = "Say hi"
NEW_TOKENS = 5
IDS = torch.tensor([[3, 17, 42, 99, 120, 7]])  # a row the trained models are compared on
CLOCK = ("tokens_per_s", "trained_tokens_per_s", "elapsed", "eta")


def checkout(tmp_path: Path) -> tuple[Path, Path]:
    """The tiny Llama, a LLaMA-Factory-like working copy with the two removed examples pointed at it, and an sft
    dataset whose rows all ask PROMPT."""
    base = tiny_model(tmp_path / "llama", "llama")
    work = lf_checkout(tmp_path / "lf", str(base))
    for name in (Path(RM).name, Path(PPO).name):
        text = (REMOVED / name).read_text("utf-8")
        lines = [f"model_name_or_path: {base}" if line.startswith("model_name_or_path:") else line
                 for line in text.splitlines()]
        (work / "examples/train_lora" / name).write_text("\n".join(lines) + "\n", "utf-8")
    rows = [{"instruction": PROMPT, "input": "", "output": f"hi {i}"} for i in range(8)]
    (work / "data/one_prompt.json").write_text(json.dumps(rows), "utf-8")
    registry = json.loads((work / "data/dataset_info.json").read_text("utf-8"))
    registry["one_prompt"] = {"file_name": "one_prompt.json"}
    (work / "data/dataset_info.json").write_text(json.dumps(registry), "utf-8")
    return base, work


def prompt_ids(base: Path, prompt: str = PROMPT) -> torch.Tensor:
    """(1, P): `prompt` written out in LLaMA-Factory's llama3 template, the assistant header included."""
    tok = transformers.AutoTokenizer.from_pretrained(base)
    text = (f"<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\n")  # LLaMA-Factory's llama3 template
    return torch.tensor([tok(text, add_special_tokens=False).input_ids])


def greedy_sequence(base: Path, prompt: str = PROMPT, policy: Any = None, stops: tuple[int, ...] = ()) -> torch.Tensor:
    """(1, T): `prompt` in LLaMA-Factory's llama3 template + the greedy response of `policy` (transformers / PEFT;
    the base by default), the sequence LLaMA-Factory's PPO scores at step 1 (the policy is its base there); `stops`:
    token ids it also stops at (kept as its last token, as transformers keeps the EOS)."""
    tok = transformers.AutoTokenizer.from_pretrained(base)
    policy = transformers.AutoModelForCausalLM.from_pretrained(base).eval() if policy is None else policy
    stops = [tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id, *stops]
    with torch.no_grad():
        return policy.generate(input_ids=prompt_ids(base, prompt), max_new_tokens=NEW_TOKENS, do_sample=False,
                               eos_token_id=stops, pad_token_id=tok.eos_token_id)


def stop_in_generation_config(base: Path) -> int:
    """The first token of the base's greedy response to PROMPT added to generation_config.json's eos_token_id, as
    Llama 3 Instruct lists <|end_of_text|> there beside <|eot_id|>; returns it. transformers' generate with the
    model's own config (and eval, generate here) would stop there, after one token; LLaMA-Factory's rollouts do not
    (eos_token_id=[tokenizer.eos_token_id] + tokenizer.additional_special_tokens_ids replaces that list,
    llamafactory/train/ppo/trainer.py:159-163), so step 1's response is greedy_sequence's, all NEW_TOKENS long."""
    response = greedy_sequence(base)[0, prompt_ids(base).shape[1]:].tolist()
    assert len(response) == NEW_TOKENS, response  # no stop of LLaMA-Factory's comes
    path = base / "generation_config.json"
    config = json.loads(path.read_text("utf-8"))
    config["eos_token_id"] = [*config["eos_token_id"], response[0]]
    path.write_text(json.dumps(config), "utf-8")
    return response[0]


def rollout_kl(base: Path, adapter: Path) -> float:
    """TRL's KL of a rollout (kl_penalty "kl": the response tokens' summed log p_policy - log p_ref) of the policy
    `adapter` on the base (PEFT) against the base itself with that adapter off (PEFT's disable_adapter), on its own
    greedy response to PROMPT: what LLaMA-Factory's PPO logs as objective/kl for rows that all ask PROMPT."""
    policy = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    sequence = greedy_sequence(base, policy=policy)
    start = prompt_ids(base).shape[1]
    with torch.no_grad():
        logp = torch.log_softmax(policy(sequence).logits[0, start - 1:-1], -1)
        with policy.disable_adapter():
            ref = torch.log_softmax(policy(sequence).logits[0, start - 1:-1], -1)
    tokens = sequence[0, start:, None]
    return float((logp.gather(-1, tokens) - ref.gather(-1, tokens)).sum())


def step_one(base: Path, rm_adapter: Path) -> float:
    """The reward model's score of PROMPT + the base's greedy response, as LLaMA-Factory's PPO computes it."""
    sequence = greedy_sequence(base)
    with torch.no_grad():
        scorer = peft.PeftModel.from_pretrained(
            transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1), rm_adapter).eval()
        return float(scorer(sequence).logits[0, 0])


def reward_models(work: Path, used: list[str], full: Path) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Our reward model as the PPO run loads it (reward_model_type lora, the rm run's output_dir) and from `full`."""
    import os

    from pipeline.recipe import resolve
    from pipeline.recipe.args import recipe_args
    from pipeline.train.ppo import load_reward_model
    from tests.acceptance.harness import cli_env

    here = os.getcwd()
    os.chdir(work)
    try:
        base = recipe_args(resolve(Path(PPO), used, command="generate", env=cli_env(WORLD_SIZE="1"))).model
        return tuple(load_reward_model(path, kind, base, "cpu", torch.float32, pad_id=0).model
                     for path, kind in ((RM_RUN, "lora"), (str(full), "full")))
    finally:
        os.chdir(here)


def test_rm_then_ppo_examples_through_the_cli(tmp_path):
    base, work = checkout(tmp_path)
    fast = ["bf16=false", "dataloader_num_workers=0", "overwrite_cache=true"]  # the example's bf16: emulated on CPU
    pipeline("train", RM, "max_steps=2", "gradient_accumulation_steps=1", "max_samples=16", "val_size=0", *fast,
             cwd=work)
    stop_in_generation_config(base)  # LLaMA-Factory's rollouts run on past it: so must ours (step 1's reward)
    used = ["max_steps=3", "dataset=one_prompt", f"max_new_tokens={NEW_TOKENS}", "logging_steps=1",
            "gradient_accumulation_steps=2", "ppo_buffer_size=2", "ppo_epochs=2", "save_steps=1", "ppo_score_norm=true",
            "learning_rate=1e-2", *fast]  # 2 epochs x 2 updates a step: time; the policy moves (other scores each step)
    done = pipeline("train", PPO, *used, cwd=work, timeout=600)
    assert f"ppo: reward_model {RM_RUN} (lora)" in done.stderr, done.stderr
    run = work / PPO_RUN
    log = logged_steps(run, 3, step_one(base, work / RM_RUN / "adapter"))
    # ppo_buffer_size 2: LLaMA-Factory's PPO step takes TRL's batch_size = 1 x 2 x 2 prompts and updates once per
    # backward batch of 1 x 2 (llamafactory/train/ppo/trainer.py:99-106), so its loader of that batch size gives
    # floor(8 / 4) = 2 steps an epoch (trainer.py:216-220); each step's 2 ppo_epochs pass over 2 backward batches:
    # 4 optimizer updates a step (trl/trainer/ppo_trainer.py:791-806), Adam's step count 4 after step 1, 12 after 3
    assert [rec["epoch"] for rec in log] == [0.5, 1.0, 1.5]
    assert adam_steps(run / "checkpoint-1") == 4 and adam_steps(run / "checkpoint-3") == 12
    # the KL controller moves by n_steps = batch_size x processes = 4 rows (ppo_trainer.py:872-876; AdaptiveKL
    # Controller.update, trl/trainer/utils.py:65-69): steps 1 and 2 have KL 0 (the policy is its reference until
    # step 1's updates at learning rate 0 are done), the clipped error -0.2
    assert log[0]["kl"] == log[1]["kl"] == 0.0
    assert [rec["kl_coef"] for rec in log] == pytest.approx([0.2 * (1 - 0.2 * 4 / 10000) ** k for k in range(3)],
                                                            rel=1e-12)
    # the example's plot_loss: LLaMA-Factory's ppo workflow plots the keys loss and reward
    assert (run / "training_loss.png").is_file() and (run / "training_reward.png").is_file()

    from safetensors.torch import load_file

    head = load_file(run / "adapter" / "value_head.safetensors")
    assert {k: tuple(v.shape) for k, v in head.items()} == {"v_head.summary.weight": (1, 32),
                                                            "v_head.summary.bias": (1,)}
    ids = IDS
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                run / "adapter").eval()
        assert_close(theirs(ids).logits, trained_model(PPO, work, used)(ids))
        scorer = peft.PeftModel.from_pretrained(
            transformers.AutoModelForSequenceClassification.from_pretrained(base, num_labels=1),
            work / RM_RUN / "adapter").eval()
        expected = scorer(ids).logits[0, 0]
        scorer.merge_and_unload().save_pretrained(tmp_path / "rm_full")
        for model in reward_models(work, used, tmp_path / "rm_full"):
            assert float(model(ids)[0, -1, 0]) == pytest.approx(float(expected), abs=1e-5)

    # the scores' running moments (ppo_score_norm) are TRL's over every score so far: a step's rows are one prompt
    # answered by one policy, so each step's four scores (its whole buffer, ppo_trainer.py:676-682) are its reward
    moments = json.loads((run / "checkpoint-3/trainer_state.json").read_text("utf-8"))["objective"]["score_moments"]
    trl = trl_score_norm([[rec["reward"]] * 4 for rec in log])[1]
    assert moments == pytest.approx(trl, rel=1e-5), (moments, trl)

    # killed after its step-2 checkpoint and resumed: the same run, bitwise (adapter, value head, optimizer, KL
    # coefficient, running moments, RNG and data position: every file of the step-3 checkpoint and every log value).
    # Step 2, not 1: step 1's learning rate is 0, so checkpoint-1's adapter and value head are the initial ones and a
    # resume that loaded neither would pass; checkpoint-2's have moved, and one step after it is all a resume needs
    crashed = crash_copy(run, work / "saves/crashed", 2)
    pipeline("train", PPO, *used, f"output_dir={crashed.relative_to(work)}", "resume_from_checkpoint=latest",
             cwd=work, timeout=600)
    assert_same_run(run, crashed, "adapter/value_head.safetensors")
    assert checkpoint_files(crashed / "checkpoint-3") == checkpoint_files(run / "checkpoint-3")
    assert logged(crashed) == logged(run)

    # full and freeze policies, as LLaMA-Factory trains them: the example with its LoRA lines swapped for
    # finetuning_type, and a full reward model (LLaMA-Factory requires one there). The reference is a frozen copy of
    # the base, so step 1 is the LoRA run's step 1; model/ holds the value head beside the weights, and `merge`'s
    # merged/ loads in transformers and gives our trained model's logits (moved from the base's)
    policy = ["dataset=one_prompt", f"max_new_tokens={NEW_TOKENS}", "logging_steps=1", "gradient_accumulation_steps=2",
              "ppo_epochs=1", f"reward_model={tmp_path / 'rm_full'}", "reward_model_type=full", *fast]
    for kind in ("full", "freeze"):
        recipe = policy_recipe(work, kind)
        tuned = ["max_steps=2", *policy, f"output_dir=saves/{kind}"]
        done = pipeline("train", recipe, *tuned, cwd=work, timeout=600)
        assert "reference: the starting model (a frozen copy)" in done.stderr, done.stderr
        logged_steps(work / "saves" / kind, 2, log[0]["reward"])
        model = work / "saves" / kind / "model"
        assert set(load_file(model / "value_head.safetensors")) == set(head)
        merged = run_main(["merge", recipe, *tuned], work)  # in this process: no second interpreter start
        assert merged.code == 0, merged.err[-4000:]
        with torch.no_grad():
            theirs = transformers.AutoModelForCausalLM.from_pretrained(model.with_name("merged")).eval()(ids).logits
            assert_close(theirs, trained_model(recipe, work, tuned)(ids))
            assert not torch.equal(theirs, transformers.AutoModelForCausalLM.from_pretrained(base)(ids).logits)
        if kind == "full":
            same_under_zero3(work, recipe, tuned, model, theirs)

    # an OFT policy, as LLaMA-Factory trains one (its get_peft_model's OFT adapter on lora_target, a full reward
    # model as it requires): the reference is the policy with its adapter off, so step 1 is the LoRA run's again;
    # step 3's rollout is the policy of checkpoint-2 (step 2 moved it), whose KL against the adapters-off base PEFT
    # gives; adapter/ is a PEFT OFT adapter with the value head beside it
    recipe = policy_recipe(work, "oft")
    tuned = ["max_steps=3", "save_steps=2", "learning_rate=1e-2", *policy, "output_dir=saves/oft"]
    done = pipeline("train", recipe, *tuned, cwd=work, timeout=600)
    assert "reference: the starting model (the policy with its adapters switched off)" in done.stderr, done.stderr
    oft = work / "saves/oft"
    kl = logged_steps(oft, 3, log[0]["reward"])[2]["kl"]
    assert kl == pytest.approx(rollout_kl(base, oft / "checkpoint-2/adapter"), abs=1e-5) and abs(kl) > 1e-4, kl
    assert json.loads((oft / "adapter/adapter_config.json").read_text("utf-8"))["peft_type"] == "OFT"
    assert set(load_file(oft / "adapter/value_head.safetensors")) == set(head)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base),
                                                oft / "adapter").eval()(ids).logits
        assert_close(theirs, trained_model(recipe, work, tuned)(ids))
        assert not torch.allclose(theirs, transformers.AutoModelForCausalLM.from_pretrained(base)(ids).logits)


def same_under_zero3(work: Path, recipe: str, used: list[str], zero0: Path, logits: torch.Tensor) -> None:
    """The full policy's run again under ZeRO 3 on one rank (in this process: no interpreter start) equals the
    ZeRO-0 run: the rollouts decode on the gathered weights, the frozen reference is an engine of its own. Golden:
    the ZeRO-0 run, itself checked above against transformers. Not bitwise: DeepSpeed's ZeRO-3 optimizer steps one
    flat fp32 partition and clips by a norm summed in another order (its grad_norm is a double), so step 2's weights
    differ in the last bits (measured: 1.2e-6 at most, losses 2e-7 relative); rel 1e-5 on every logged value and
    2e-6 on every weight (the weights are O(1), the step's update lr x O(1)) hold that and nothing larger.
    Its merged/ loads in transformers and gives `logits`, the ZeRO-0 run's merged model's."""
    from safetensors.torch import load_file

    out = zero0.parent.with_name("full_zero3")
    used = [*used, "zero_stage=3", f"output_dir={out.relative_to(work)}"]
    done = run_main(["train", recipe, *used], work)
    assert done.code == 0, done.err[-4000:]
    assert "reference: the starting model (a frozen copy)" in done.err
    ours, theirs = logged(out), logged(zero0.parent)
    assert ours.keys() == theirs.keys() == {1, 2}
    for step, record in theirs.items():
        assert ours[step].keys() == record.keys()
        for key in ("loss", "loss/policy", "loss/value", "reward", "kl", "kl_coef", "policy/clipfrac", "val/clipfrac"):
            assert ours[step][key] == pytest.approx(record[key], rel=1e-5, abs=1e-7), (step, key)
    for name in ("model.safetensors", "value_head.safetensors"):
        mine, golden = load_file(out / "model" / name), load_file(zero0 / name)
        assert mine.keys() == golden.keys()
        for key, tensor in golden.items():
            torch.testing.assert_close(mine[key], tensor, rtol=0, atol=2e-6, msg=key)
    merged = run_main(["merge", recipe, *used], work)
    assert merged.code == 0, merged.err[-4000:]
    with torch.no_grad():
        mine = transformers.AutoModelForCausalLM.from_pretrained(out / "merged").eval()(IDS).logits
    assert_close(logits, mine, rel=1e-5)


def policy_recipe(work: Path, kind: str) -> str:
    """The LoRA example with finetuning_type `kind`: full / freeze drop the LoRA keys, OFT keeps lora_target (the
    modules LLaMA-Factory's OFT takes) and drops lora_rank."""
    recipe = f"examples/train_full/llama3_{kind}_ppo.yaml"
    dropped = "lora_rank" if kind == "oft" else "lora_"
    lines = (work / PPO).read_text("utf-8").splitlines()
    (work / recipe).write_text("\n".join(f"finetuning_type: {kind}" if line.startswith("finetuning_type:") else line
                                          for line in lines if not line.startswith(dropped)) + "\n")
    return recipe


def logged_steps(run: Path, steps: int, reward: float) -> list[dict[str, float]]:
    """The run's log lines, one per step, checked against step 1's golden: the policy is its reference (the
    warmup's learning rate 0), so the KL and the policy loss are 0 and the reward is `reward`."""
    log = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text("utf-8").splitlines()]
    assert [rec["step"] for rec in log] == list(range(1, steps + 1))
    first = log[0]
    assert first["lr"] == 0.0 and first["kl"] == 0.0
    assert first["reward"] == pytest.approx(reward, abs=1e-4)
    assert first["loss/policy"] == pytest.approx(0.0, abs=1e-6)
    assert first["policy/approxkl"] == pytest.approx(0.0, abs=1e-10)
    assert all(k in rec for rec in log for k in ("loss", "loss/value", "reward", "kl", "kl_coef"))
    return log


def adam_steps(checkpoint: Path) -> int:
    """The optimizer updates made up to a checkpoint: the step count of AdamW's state (one per parameter; all
    equal), read from DeepSpeed's saved state."""
    from pipeline.train.safestate import load_state

    state = load_state(checkpoint / "deepspeed/mp_rank_00_model_states.pt")["optimizer"]["state"]
    (steps,) = {int(entry["step"]) for entry in state.values()}
    return steps


def checkpoint_files(checkpoint: Path) -> dict[str, Any]:
    """Every file of a checkpoint (the manifest's list) -> its content: a safetensors file's metadata and tensors
    as bytes (the safetensors library writes the metadata keys in no fixed order, so the files' hashes may
    differ), trainer_state.json without its recipe values (the resumed run's output_dir differs), other files'
    bytes."""
    from safetensors import safe_open

    out: dict[str, Any] = {}
    for name in json.loads((checkpoint / "manifest.json").read_text("utf-8"))["files"]:
        path = checkpoint / name
        if name == "trainer_state.json":
            out[name] = {k: v for k, v in json.loads(path.read_text("utf-8")).items() if k != "recipe"}
        elif path.suffix in (".safetensors", ".pt"):  # DeepSpeed's state: safetensors under its .pt names
            with safe_open(str(path), framework="pt") as handle:
                out[name] = (handle.metadata(), {key: (str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(
                    torch.uint8).numpy().tobytes()) for key in handle.keys() for t in [handle.get_tensor(key)]})
        else:
            out[name] = path.read_bytes()
    return out


def logged(run: Path) -> dict[int, dict[str, float]]:
    """step -> every value its log line has but the clock's."""
    lines = (run / "trainer_log.jsonl").read_text("utf-8").splitlines()
    return {rec["step"]: {k: v for k, v in rec.items() if k not in CLOCK} for rec in map(json.loads, lines)}
