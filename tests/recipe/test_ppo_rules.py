"""Stage ppo's rules (pipeline.recipe.rules.ppo): reward_model required, the parts not implemented refused at their
key with the reason, the ppo keys only under stage ppo; val_size derived 0 (PPO evaluates nothing)."""
from __future__ import annotations

import shutil
from typing import Any

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
    (PPO, "train", "r.yaml:6:15: reward_model: directory 'saves/rm' does not exist here; if another recipe produces "
                   "it, run that one first"),  # under saves/: the hub is not asked (it said 'only if ... a hub id')
    ("stage: ppo\nreward_model: saves/llama/rm\n", "train",
     "r.yaml:6:15: reward_model: directory 'saves/llama/rm' does not exist here"),
    (PPO + "num_beams: 3\n", None, "r.yaml:7:12: num_beams: given 3 with stage ppo: stage ppo's rollouts are one "
                                    "response per prompt"),
    (PPO + "val_size: 0.2\n", None, "r.yaml:7:11: val_size: given 0.2, but it has no meaning for stage: ppo"),
    (PPO + "ref_model: tiny\n", None, "r.yaml:7:12: ref_model: is not implemented for stage ppo"),
    (PPO + "reward_model_type: api\n", None, "r.yaml:6:15: reward_model: given 'saves/rm' (no scheme) with "
                                             "reward_model_type api (did you mean 'http://saves/rm'?); expected the "
                                             "URL of a reward server, http:// or https://"),
    ("stage: ppo\nreward_model: ftp://h/score\nreward_model_type: api\n", "validate",
     "r.yaml:6:15: reward_model: given 'ftp://h/score' (scheme 'ftp') with reward_model_type api; expected"),
    ("stage: sft\nppo_epochs: 2\n", None, "r.yaml:6:13: ppo_epochs: is a stage ppo setting but stage is sft"),
    (PPO, "eval", "r.yaml:5:8: stage: ppo evaluates nothing (as in LLaMA-Factory): evaluate the tuned adapter with an "
                  "sft recipe whose adapter_name_or_path is this run's output_dir"),
    (PPO + "finetuning_type: freeze\n", "eval",
     "r.yaml:5:8: stage: ppo evaluates nothing (as in LLaMA-Factory): evaluate the tuned freeze policy "
     "(output_dir/model) with an sft recipe of finetuning_type freeze whose output_dir is this run's"),
], ids=["no-reward-model", "missing-at-train", "missing-folder-at-train", "beams", "val_size",
        "ref_model", "api-not-a-url", "api-not-http", "outside-ppo", "eval-command", "eval-command-freeze"])
def test_a_ppo_mistake_is_one_message_at_its_line(recipe, lines, command, said):
    found = messages(recipe(lines), command)
    assert any(m.startswith(said) for m in found), found


@pytest.mark.parametrize("kind", ["lora", "full", "freeze"])
def test_ppo_trains_lora_full_and_freeze_policies(recipe, kind):
    """As LLaMA-Factory: a LoRA policy, or a full / freeze one beside a frozen copy of the base as its reference (an
    OFT one: tests/recipe/test_oft_rules.py, on a Llama)."""
    assert resolve(recipe(PPO + f"finetuning_type: {kind}\n"))["finetuning_type"] == kind


@pytest.mark.parametrize("buffer, world", [(1, 1), (2, 1), (3, 2)])
def test_ppo_buffer_size_counts_steps_by_the_whole_buffer(recipe, monkeypatch, buffer, world):
    """It was refused. LLaMA-Factory 0.9.5's PPO step draws TRL's batch_size = micro x accumulation x
    ppo_buffer_size prompts a rank (train/ppo/trainer.py:99-104; TRL's DataLoader of that batch_size, drop_last,
    trl/trainer/ppo_trainer.py:416-422), so an epoch is floor(rows a rank / batch_size) steps and num_train_epochs
    x that in all (trainer.py:216-220). Golden, by hand: 50 rows, micro 2, accumulation 3 -> floor(50 / (2 x
    world)) micro-batches a rank (25; 12 on 2 ranks), floor(that / (3 x buffer)) steps an epoch (8, 4; 1 for a
    buffer of 3 on 2 ranks: 18 prompts a rank a step); 3 epochs.
    DeepSpeed's batch (total_train_batch_size) stays one update's rows."""
    from pipeline.recipe import derive_steps

    monkeypatch.setenv("WORLD_SIZE", str(world))
    r = derive_steps(resolve(recipe(PPO + f"ppo_buffer_size: {buffer}\nper_device_train_batch_size: 2\n"
                                          "gradient_accumulation_steps: 3\n")), 50)
    per_epoch = {1: 8, 2: 4, 3: 1}[buffer]
    assert (r["steps_per_epoch"], r["total_steps"]) == (per_epoch, 3 * per_epoch)
    assert r["total_train_batch_size"] == r.ds_config["train_batch_size"] == 2 * 3 * world


def test_a_buffer_the_data_cannot_fill_is_said_at_ppo_buffer_size(recipe, manifest):
    """8 rows make 8 micro-batches of 1; accumulation 2 fits, but a PPO step of 2 x ppo_buffer_size 8 = 16 does not:
    the message names the key that does not fit (it blamed gradient_accumulation_steps, which fits)."""
    manifest("alpaca_demo", train=8)
    found = messages(recipe(PPO + "per_device_train_batch_size: 1\ngradient_accumulation_steps: 2\n"
                                  "ppo_buffer_size: 8\n"))
    assert any(m.startswith("r.yaml:9:18: ppo_buffer_size: given 8, but the 8 training examples make only 8 "
                            "micro-batches per rank") and "x ppo_buffer_size = 16: no PPO step would happen" in m
               for m in found), found


@pytest.mark.parametrize("lines, said", [
    ("gradient_accumulation_steps: 2\nppo_buffer_size: 8\n",
     "r.yaml:9: ppo_buffer_size: no optimizer step fits: the train split gives 8 micro-batches per rank per epoch and "
     "gradient_accumulation_steps is 2 and ppo_buffer_size 8 (16 micro-batches a PPO step)"),
    ("gradient_accumulation_steps: 9\n",
     "r.yaml:8: gradient_accumulation_steps: no optimizer step fits: the train split gives 8 micro-batches per rank "
     "per epoch and gradient_accumulation_steps is 9"),
], ids=["buffer", "accumulation"])
def test_a_step_the_loader_cannot_fill_is_said_at_its_key(recipe, lines, said):
    """train's last check (pipeline.recipe.exact.exact_steps, on the loader's real count after the length policy) names
    the key that does not fit at its recipe line, as enough_batches does when the built split's count is known."""
    from pipeline.recipe.exact import exact_steps

    r = resolve(recipe(PPO + "per_device_train_batch_size: 1\n" + lines))
    loader = type("Loader", (), {"num_examples": 8, "__len__": lambda self: 8})()
    with pytest.raises(UserError) as exc:
        exact_steps(r, loader)
    assert str(exc.value).startswith(said), str(exc.value)


def test_ppo_trains_on_every_prompt(recipe):
    """val_size's default (0.1) would hold prompts out of a run that evaluates nothing: derived 0."""
    r = resolve(recipe(PPO))
    assert r["val_size"] == 0.0 and r["reward_model_type"] == "lora" and r["ppo_epochs"] == 4


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_ppo_runs_on_several_ranks_at_every_zero_stage(recipe, monkeypatch, zero_stage):
    """As LLaMA-Factory's PPO under DeepSpeed, ZeRO 3 included: the rollouts decode on the gathered weights
    (tests/compat/test_ppo_multirank.py trains on two ranks: LoRA under ZeRO 3, a full policy under ZeRO 1)."""
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


def test_the_reward_server_is_contacted_by_train_alone(recipe):
    """reward_model_type api: validate and plan check the URL's form and send nothing; train asks once, before
    anything loads, whether the server answers (a GET, answered 405 by the test's POST-only route), and a server that
    refuses the connection stops it at the reward_model line. No scoring request is sent before the first rollout."""
    from tests.helpers.reward_server import ScoringServer, refusing_url

    with ScoringServer() as server:
        path = recipe(f"stage: ppo\nreward_model: {server.url}\nreward_model_type: api\n")
        for command in ("validate", "plan"):
            assert resolve(path, command=command)["reward_model"] == server.url
        assert server.gets == [] and server.posts == []
        try:
            resolve(path, command="train")
        except UserError as err:  # the tiny preset's dataset is not built here: only that may be said
            assert not [m for m in err.messages if "reward_model" in m], err.messages
        assert server.gets == ["/score"] and server.posts == []
    with refusing_url() as url:
        path = recipe(f"stage: ppo\nreward_model: {url}\nreward_model_type: api\n")
        resolve(path, command="validate")
        found = [m for m in messages(path, "train") if "reward_model" in m]
        assert len(found) == 1 and found[0].startswith(f"r.yaml:6:15: reward_model: the reward server {url} does not "
                                                       "answer (ConnectionRefusedError"), found


def test_a_reward_server_is_no_upstream_and_holds_no_memory_here(recipe):
    """A URL is not a folder a recipe writes (make builds nothing first for it), and plan counts no reward model on
    the ranks: the server holds it."""
    from pipeline.recipe.deps import upstream_paths
    from pipeline.recipe.plan import reward_model_params

    url = "http://127.0.0.1:8000/score"
    assert upstream_paths({"stage": "ppo", "model_name_or_path": "tiny", "reward_model": url,
                           "reward_model_type": "api"}) == ["tiny"]
    r = resolve(recipe(f"stage: ppo\nreward_model: {url}\nreward_model_type: api\n"), command="plan")
    assert reward_model_params(r, None) == 0


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


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """The policy's base (a tiny Llama of 384 token ids, its tokenizer beside it) and reward models saved as
    transformers / PEFT save them: full ones of its vocabulary, of a padded one (448 rows, the same tokenizer), of
    another (300 ids); of 448 rows with tokenizer files beside them: the policy's (padded), or another tokenizer of
    448 ids (trained on the same texts: its ids 378-383 are merges where the policy's are its template markup);
    SEQ_CLS LoRA adapters on its base and on another base as wide (MLP 48 wide, not 64)."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from tests.acceptance.harness import write_hf_checkpoint
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    root = tmp_path_factory.mktemp("ppo_bases")
    write_hf_checkpoint(root / "llama", "llama", small_vocab=True)
    config = transformers.AutoConfig.from_pretrained(root / "llama", num_labels=1)
    def reward_model(**keys: Any) -> Any:
        return transformers.LlamaForSequenceClassification(type(config)(**{**config.to_dict(), **keys}))

    reward_model().save_pretrained(root / "rm_full")
    reward_model(vocab_size=448).save_pretrained(root / "rm_padded")
    reward_model(vocab_size=300, bos_token_id=None, eos_token_id=None).save_pretrained(root / "rm_other_vocab")
    for name in ("rm_padded_tokenizer", "rm_other_tokenizer"):
        reward_model(vocab_size=448).save_pretrained(root / name)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(root / "llama" / name, root / "rm_padded_tokenizer" / name)
    write_small_tokenizer_dir(root / "rm_other_tokenizer", "llama3", size=448)
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=2, target_modules=["q_proj", "down_proj"])
    peft.get_peft_model(reward_model(), lora).save_pretrained(root / "rm_lora")
    peft.get_peft_model(reward_model(intermediate_size=48), lora).save_pretrained(root / "rm_lora_other")
    return root


def ppo_recipe(write, bases, reward: str, kind: str) -> str:
    """A LoRA ppo recipe on the tiny Llama, reward_model on line 5; its dataset's rows built (validate reads them)."""
    write("datasets/build/d/manifest.json", {
        "schema_version": 1, "name": "d", "stage": "sft", "sources": [], "rows_read": 8, "rows_kept": 8,
        "removed": {}, "splits": {"train": 8, "val": 0}})
    return write("r.yaml", f"model_name_or_path: {bases / 'llama'}\ndataset: d\ntemplate: default\nstage: ppo\n"
                           f"reward_model: {bases / reward}\nreward_model_type: {kind}\n")


@pytest.mark.parametrize("reward, kind, said", [
    ("rm_other_vocab", "full", "its vocabulary has 300 token ids (vocab_size in config.json), expected at least the "
                               "384 of the policy's tokenizer"),
    ("rm_lora_other", "lora", "has shape [2, 48] but"),
    ("rm_other_tokenizer", "full", "token ids another token (the first, id 378: "),
    ("rm_full", "full", None), ("rm_padded", "full", None), ("rm_padded_tokenizer", "full", None),
    ("rm_lora", "lora", None),
], ids=["full-other-vocabulary", "lora-other-base", "full-other-tokenizer", "full", "full-padded-vocabulary",
        "full-padded-same-tokenizer", "lora"])
@pytest.mark.parametrize("command", ["validate", "plan", "train"])
def test_a_reward_model_of_another_base_stops_at_its_line(write, bases, reward, kind, said, command):
    """It went on: a full reward model of a smaller vocabulary stopped the run at its first reward with an index
    error (the responses' ids index its embedding), a LoRA adapter of another base as wide when its tensors loaded.
    Golden: the sizes the fixtures were saved with (300 and 384 ids; down_proj's LoRA A of rank 2 over 48 inputs
    where the policy's has 64). A larger vocabulary (a padded one of the same tokenizer) is not refused, unless the
    folder's tokenizer files give the policy's ids other tokens (it was accepted unchecked: the reward model read
    the policy's template markup as other words)."""
    path = ppo_recipe(write, bases, reward, kind)
    try:
        found = resolve(path, command=command).values and []
    except UserError as err:
        found = err.messages
    mine = [m for m in found if "reward_model" in m]
    if said is None:
        assert mine == [], mine
    else:
        assert len(mine) == 1 and mine[0].startswith("r.yaml:5:15: reward_model: ") and said in mine[0], found


def test_a_reward_model_of_another_tokenizer_is_named_by_its_first_other_token(write, bases):
    """Golden from transformers: the ids below the policy tokenizer's 384 that the two AutoTokenizers map to other
    tokens, and the first of them as each decodes it (skip_special_tokens=False)."""
    transformers = pytest.importorskip("transformers")

    policy, theirs = (transformers.AutoTokenizer.from_pretrained(bases / name) for name in ("llama",
                                                                                           "rm_other_tokenizer"))
    differ = [i for i in range(len(policy)) if policy.convert_ids_to_tokens(i) != theirs.convert_ids_to_tokens(i)]
    assert len(policy) == 384 and differ  # the fixture is what the test needs: some ids differ
    found = [m for m in messages(ppo_recipe(write, bases, "rm_other_tokenizer", "full"), "validate")
             if "reward_model" in m]
    assert found == [f"r.yaml:5:15: reward_model: {bases / 'rm_other_tokenizer' / 'tokenizer.json'}: its tokenizer "
                     f"gives {len(differ)} of the policy tokenizer's 384 token ids another token (the first, id "
                     f"{differ[0]}: {theirs.decode([differ[0]])!r} there, {policy.decode([differ[0]])!r} in the "
                     "policy's): a reward model of another base model. It is given the policy's token ids as they "
                     "are, so it must share the policy's tokenizer (LLaMA-Factory requires that too: its PPO feeds "
                     "the policy's token ids to the reward model); train the reward model (stage rm) on "
                     "model_name_or_path or a model of its family, or set reward_model_type: lora with an adapter "
                     "trained on model_name_or_path"], found


def test_validate_refuses_a_reward_model_of_another_vocabulary_as_typed(write, bases, tmp_path):
    """`python -m pipeline validate` as a user types it: exit 2, one error at the reward_model line saying what was
    given (300 ids), what was expected (the policy tokenizer's 384) and what to do, no traceback."""
    from tests.acceptance.harness import refused

    stderr = refused("validate", ppo_recipe(write, bases, "rm_other_vocab", "full"), cwd=tmp_path)
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    assert errors[0].startswith(f"error: r.yaml:5:15: reward_model: {bases / 'rm_other_vocab'}: its vocabulary has "
                                "300 token ids (vocab_size in config.json), expected at least the 384 of the policy's "
                                "tokenizer"), errors
    assert "LLaMA-Factory requires that too" in errors[0] and "train the reward model (stage rm) on " \
        "model_name_or_path" in errors[0], errors
