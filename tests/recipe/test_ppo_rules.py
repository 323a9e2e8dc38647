"""Stage ppo's rules (pipeline.recipe.rules.ppo): reward_model required, the parts not implemented refused at their
key with the reason, the ppo keys only under stage ppo; val_size derived 0 (PPO evaluates nothing)."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.recipe import resolve


def messages(path: str, command: str | None = None) -> list[str]:
    with pytest.raises(UserError) as exc:
        resolve(path, command=command)
    return exc.value.messages


PPO = "stage: ppo\nreward_model: saves/rm\n"


@pytest.mark.parametrize("lines, command, said", [
    ("stage: ppo\n", None, "r.yaml:5:8: stage: ppo needs reward_model: a stage rm run's output_dir"),
    (PPO, "train", "r.yaml:6:15: reward_model: 'saves/rm' is neither a local directory nor a cached hub snapshot"),
    ("stage: ppo\nreward_model: saves/llama/rm\n", "train",
     "r.yaml:6:15: reward_model: directory 'saves/llama/rm' not found"),
    (PPO + "ppo_buffer_size: 2\n", None, "r.yaml:7:18: ppo_buffer_size: given 2 with stage ppo: only 1"),
    (PPO + "num_beams: 3\n", None, "r.yaml:7:12: num_beams: given 3 with stage ppo: stage ppo's rollouts are one "
                                    "response per prompt"),
    (PPO + "val_size: 0.2\n", None, "r.yaml:7:11: val_size: given 0.2, but it has no meaning for stage: ppo"),
    (PPO + "ref_model: tiny\n", None, "r.yaml:7:12: ref_model: is not implemented for stage ppo"),
    (PPO + "reward_model_type: api\n", None, "r.yaml:7:20: reward_model_type: given 'api', expected one of lora, "
                                             "full"),
    ("stage: sft\nppo_epochs: 2\n", None, "r.yaml:6:13: ppo_epochs: is a stage ppo setting but stage is sft"),
    (PPO, "eval", "r.yaml:5:8: stage: ppo evaluates nothing (as in LLaMA-Factory): evaluate the tuned adapter with an "
                  "sft recipe whose adapter_name_or_path is this run's output_dir"),
    (PPO + "finetuning_type: freeze\n", "eval",
     "r.yaml:5:8: stage: ppo evaluates nothing (as in LLaMA-Factory): evaluate the tuned freeze policy "
     "(output_dir/model) with an sft recipe of finetuning_type freeze whose output_dir is this run's"),
], ids=["no-reward-model", "missing-at-train", "missing-folder-at-train", "buffer", "beams", "val_size",
        "ref_model", "api", "outside-ppo", "eval-command", "eval-command-freeze"])
def test_a_ppo_mistake_is_one_message_at_its_line(recipe, lines, command, said):
    found = messages(recipe(lines), command)
    assert any(m.startswith(said) for m in found), found


@pytest.mark.parametrize("kind", ["lora", "full", "freeze"])
def test_ppo_trains_lora_full_and_freeze_policies(recipe, kind):
    """As LLaMA-Factory: a LoRA policy, or a full / freeze one beside a frozen copy of the base as its reference (an
    OFT one: tests/recipe/test_oft_rules.py, on a Llama)."""
    assert resolve(recipe(PPO + f"finetuning_type: {kind}\n"))["finetuning_type"] == kind


def test_ppo_trains_on_every_prompt(recipe):
    """val_size's default (0.1) would hold prompts out of a run that evaluates nothing: derived 0."""
    r = resolve(recipe(PPO))
    assert r["val_size"] == 0.0 and r["reward_model_type"] == "lora" and r["ppo_epochs"] == 4


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_ppo_runs_on_several_ranks_at_every_zero_stage(recipe, monkeypatch, zero_stage):
    """As LLaMA-Factory's PPO under DeepSpeed, ZeRO 3 included: the rollouts decode on the gathered weights
    (tests/compat/test_ppo_multirank.py trains it on two ranks under ZeRO 3)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    r = resolve(recipe(PPO + f"zero_stage: {zero_stage}\n"))
    assert (r["world_size"], r["zero_stage"]) == (2, zero_stage)


def test_the_reward_model_run_is_an_upstream_of_stage_ppo_only(write):
    """make trains the rm recipe whose output_dir the ppo recipe's reward_model names, before the ppo one."""
    from pipeline.recipe.deps import lines, upstream_paths

    assert upstream_paths({"stage": "ppo", "model_name_or_path": "tiny", "reward_model": "saves/rm"}) == [
        "tiny", "saves/rm"]
    assert upstream_paths({"stage": "sft", "model_name_or_path": "tiny", "reward_model": "saves/rm"}) == ["tiny"]
    write("recipes/rm.yaml", "model_name_or_path: tiny\ndataset: x\nstage: rm\noutput_dir: saves/rm\n")
    write("recipes/ppo.yaml", "model_name_or_path: tiny\ndataset: x\nstage: ppo\nreward_model: saves/rm\n")
    assert "UPSTREAMS=recipes/rm.yaml:train" in lines(resolve("recipes/ppo.yaml", command="deps"))


def test_overwrite_output_dir_never_empties_the_reward_model():
    """A ppo recipe whose output_dir is (or holds) its reward_model run, with overwrite_output_dir, would delete it."""
    from pathlib import Path

    from pipeline.runtime import guard

    Path("saves/rm/adapter").mkdir(parents=True)
    named = guard.protected({key: "saves/rm" if key == "reward_model" else None for key in guard.INPUT_KEYS})
    with pytest.raises(UserError, match="saves/rm is reward_model, which this command would delete"):
        guard.refuse_to_clear(Path("saves/rm"), "r.yaml:9:13: output_dir", "output_dir", named)


def test_a_lora_policy_training_whole_modules_is_refused_under_zero3(recipe):
    """The adapters-off reference needs the additional_target modules' starting weights, which train keeps as a copy
    of the whole modules: under ZeRO 3 those are partitions (as for dpo, pipeline.train.run.preflight)."""
    from pipeline.train.run import preflight

    r = resolve(recipe(PPO + "zero_stage: 3\nadditional_target: lm_head\n"))
    with pytest.raises(UserError, match="under zero_stage 3 their starting weights cannot be kept for the ppo "
                                        "reference"):
        preflight(r)
    preflight(resolve(recipe(PPO + "zero_stage: 3\n")))  # without them: trains
