"""Resume with a changed recipe, one test per class of docs/resume.md's table:

refuse (model, data, shapes: the saved state or the data position would not fit), apply and say so (the
learning rate, weight decay and schedule: the rate used from the resumed step on is the new recipe's schedule
at that step), keep with a notice (Adam's betas and epsilon live in the optimizer's saved state).
Expected learning rates come from the schedule's formula written out here, not from the trainer.
"""
from __future__ import annotations

import json
import math

import pytest

from pipeline.errors import UserError
from pipeline.runtime.log import read_log
from pipeline.train.run import train

FIRST = dict(max_steps=2, save_steps=2, warmup_steps=1, learning_rate=1e-3, lr_scheduler_type="cosine")


@pytest.fixture
def first_run(make_recipe):
    """A finished 2-step run in saves/run (its checkpoint-2 is what the tests resume from)."""
    result = train(make_recipe(name="run", **FIRST))
    assert result.exit_code == 0
    return result.output_dir


def resume(make_recipe, **changes):
    return train(make_recipe(name="run", **{**FIRST, **changes, "resume_from_checkpoint": "latest"}))


def cosine(step: int, total: int, warmup: int) -> float:
    """Hugging Face's cosine-with-warmup factor, written out: step is 0-based."""
    if step < warmup:
        return step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_a_lower_learning_rate_and_a_longer_schedule_are_applied_and_announced(make_recipe, first_run, capsys):
    capsys.readouterr()
    result = resume(make_recipe, max_steps=4, learning_rate=2e-4)
    err = capsys.readouterr().err
    assert "learning_rate changed from 0.001 to 0.0002: applied from step 2 on" in err, err
    assert "max_steps changed from 2 to 4: applied" in err
    lrs = {rec["step"]: rec["lr"] for rec in read_log(result.output_dir / "trainer_log.jsonl")}
    # optimizer step 3 is 0-based step 2 of the new 4-step cosine schedule with peak 2e-4
    assert lrs[3] == pytest.approx(2e-4 * cosine(2, 4, 1), rel=1e-6)
    assert lrs[4] == pytest.approx(2e-4 * cosine(3, 4, 1), rel=1e-6)


def test_a_new_weight_decay_is_applied_to_the_decayed_group_only(make_recipe, first_run, capsys):
    result = resume(make_recipe, max_steps=3, weight_decay=0.25)
    assert "weight_decay changed from 0.0 to 0.25: applied" in capsys.readouterr().err
    groups = result.engine.lr_scheduler.optimizer.param_groups
    assert [g["weight_decay"] for g in groups][0] == 0.25
    assert all(g["weight_decay"] == 0.0 for g in groups[1:])


def test_a_new_learning_rate_keeps_the_loraplus_ratio_of_every_group(make_recipe):
    """apply_changes set every group's base lr to learning_rate: LoRA+'s B group fell back to the A group's."""
    first = dict(FIRST, loraplus_lr_ratio=8.0, weight_decay=0.1)
    assert train(make_recipe(name="plus", **first)).exit_code == 0
    result = train(make_recipe(name="plus", **{**first, "max_steps": 4, "learning_rate": 2e-4,
                                               "resume_from_checkpoint": "latest"}))
    groups = result.engine.lr_scheduler.optimizer.param_groups
    # A (decayed), B (decayed, 8x), biases and norm gains (8x, not decayed; tiny's LoRA run trains none)
    assert [g["initial_lr"] for g in groups] == pytest.approx([2e-4, 1.6e-3])
    assert [g["weight_decay"] for g in groups] == [0.1, 0.1]
    lrs = {rec["step"]: rec["lr"] for rec in read_log(result.output_dir / "trainer_log.jsonl")}
    assert lrs[4] == pytest.approx(2e-4 * cosine(3, 4, 1), rel=1e-6)
    assert groups[1]["lr"] == pytest.approx(8 * groups[0]["lr"])


def test_adam_betas_are_kept_from_the_checkpoint_with_a_notice(make_recipe, first_run, capsys):
    result = resume(make_recipe, max_steps=3, adam_beta2=0.95)
    err = capsys.readouterr().err
    assert "adam_beta2 changed from 0.999 to 0.95: ignored, the checkpoint's optimizer state keeps its value" in err
    assert result.engine.lr_scheduler.optimizer.param_groups[0]["betas"][1] == 0.999


@pytest.mark.parametrize("changes, fragment", [
    (dict(model_name_or_path="mini"), "model_name_or_path is \"mini\" but"),
    (dict(dataset="tiny_pt", stage="pt"), "stage is \"pt\" but"),
    (dict(template="empty"), "template is \"empty\" but"),
    (dict(lora_alpha=64), "lora_alpha is 64 but"),
    (dict(loraplus_lr_ratio=16.0), "loraplus_lr_ratio is 16.0 but"),  # other optimizer groups than the saved ones
    (dict(use_muon=True), "use_muon is true but"),  # another optimizer: Muon's state is not AdamW's
    (dict(split_special_tokens=True), "split_special_tokens is true but"),  # other ids for the same rows
    (dict(optim="sgd"), "optim is \"sgd\" but"),  # another optimizer: SGD keeps no Adam moments
    # the checkpoint's param groups would bring back the old momentum, eps, ... (torch's load_state_dict)
    (dict(quantization_bit=4), "quantization_bit is 4 but"),  # the adapter trained beside another base (QLoRA)
], ids=["model", "data", "template", "shape", "loraplus", "muon", "split_special_tokens", "optim", "qlora"])
def test_model_data_and_shape_changes_are_refused(make_recipe, first_run, changes, fragment):
    with pytest.raises(UserError) as err:
        resume(make_recipe, **changes)
    assert any(fragment in m and "resume with the same value" in m for m in err.value.messages), err.value.messages


def test_another_name_of_adamw_resumes_without_a_word(make_recipe, first_run, capsys):
    """adamw_torch_fused (the default), adamw_torch and adamw_hf build the same AdamW: refusing the switch (it was, once
    `optim` became a refused key with SGD / Adafactor) would stop a user whose resume recipe spells it otherwise."""
    capsys.readouterr()
    assert resume(make_recipe, max_steps=3, optim="adamw_torch").exit_code == 0
    assert "optim" not in capsys.readouterr().err


def test_optim_args_are_compared_by_what_the_optimizer_gets(make_recipe, capsys):
    """A changed SGD momentum is refused (torch's load_state_dict would bring the saved one back without a word);
    spaces, order and the keys transformers' Trainer ignores (weight_decay: its groups set their own) are no change."""
    first = dict(FIRST, optim="sgd", optim_args="momentum=0.9,nesterov=True")
    assert train(make_recipe(name="sgd", **first)).exit_code == 0
    with pytest.raises(UserError) as err:
        train(make_recipe(name="sgd", **{**first, "optim_args": "momentum=0.5,nesterov=True",
                                         "resume_from_checkpoint": "latest"}))
    assert any('optim_args is "momentum=0.5,nesterov=True" but' in m for m in err.value.messages), err.value.messages
    capsys.readouterr()
    same = {**first, "max_steps": 3, "optim_args": "nesterov=True, momentum=0.9, weight_decay=0.1",
            "resume_from_checkpoint": "latest"}
    assert train(make_recipe(name="sgd", **same)).exit_code == 0


def test_a_changed_lora_rank_is_one_message_not_two(make_recipe, first_run):
    """lora_alpha, derived as 2 x lora_rank and never written by the user, was reported too."""
    with pytest.raises(UserError) as err:
        resume(make_recipe, lora_rank=8)
    assert len(err.value.messages) == 1 and "lora_rank is 8 but" in err.value.messages[0], err.value.messages


def test_max_steps_not_after_the_checkpoint_is_refused(make_recipe, first_run):
    """It said "max_steps changed from 2 to 1: applied from step 2 on", then "done" with nothing trained, exit 0."""
    with pytest.raises(UserError) as err:
        resume(make_recipe, max_steps=1)
    [message] = err.value.messages
    assert message.endswith(f": max_steps 1 is not after {first_run}/checkpoint-2's step 2: nothing to train; resume "
                            "with max_steps above 2 (it was 2)"), message


def test_resuming_a_finished_run_keeps_its_results(make_recipe, first_run):
    """A finished run resumed again (a job script that always passes resume_from_checkpoint=latest) trains no step;
    all_results.json was rewritten with train_loss, eval_loss, epoch and train_runtime_s null."""
    before = json.loads((first_run / "all_results.json").read_text(encoding="utf-8"))
    assert None not in (before["train_loss"], before["eval_loss"], before["epoch"]), before
    assert resume(make_recipe).exit_code == 0
    assert json.loads((first_run / "all_results.json").read_text(encoding="utf-8")) == before


def test_a_schedule_from_epochs_that_ends_before_the_checkpoint_is_refused(make_recipe, first_run):
    """num_train_epochs 0.25 is 1 step of 4 per epoch: the loop ran nothing, the step-2 checkpoint's weights were
    exported over the finished adapter, the log lost its later lines, and the run said "done", exit 0."""
    adapter = (first_run / "adapter" / "adapter_model.safetensors").read_bytes()
    log = (first_run / "trainer_log.jsonl").read_text()
    with pytest.raises(UserError) as err:
        resume(make_recipe, max_steps=None, num_train_epochs=0.25)
    [message] = err.value.messages
    assert "num_train_epochs: the schedule now ends at step 1 (num_train_epochs 0.25), which is not after" in message
    assert "nothing to train" in message, message
    assert (first_run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (first_run / "trainer_log.jsonl").read_text() == log


def test_rebuilt_training_data_is_refused(make_recipe, first_run, workdir):
    raw = workdir / "data" / "raw" / "sft.jsonl"
    with open(raw, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"instruction": "one more", "input": "", "output": "row"}) + "\n")
    with pytest.raises(UserError) as err:
        # make_recipe rebuilds the data, as `make data` would; the same folder, named as another recipe might
        resume(make_recipe, max_steps=3, dataset_dir=str(workdir / "data"))
    assert "the built training rows of 'tiny_sft' are not the ones" in err.value.messages[0]
    # the built folder under the recipe's dataset_dir (the message said data/build/ whatever dataset_dir was)
    assert f"({workdir / 'data'}/build/tiny_sft/train.json was rebuilt" in err.value.messages[0], err.value.messages


def test_an_eval_dataset_that_makes_the_val_split_train_is_refused(make_recipe, first_run, workdir):
    """With eval_dataset naming another dataset, tiny_sft's val split trains too: 36 rows became 40 under the same
    train.json, and the resume went on at the saved batch index of another shuffle, without a word."""
    registry = workdir / "data" / "dataset_info.json"
    entries = json.loads(registry.read_text())
    registry.write_text(json.dumps({**entries, "held": entries["tiny_sft"]}))
    with pytest.raises(UserError) as err:
        resume(make_recipe, max_steps=3, eval_dataset="held")
    [message] = err.value.messages
    assert "eval_dataset: " in message and "was trained on tiny_sft/train.json, the recipe now trains on " \
        "tiny_sft/train.json, tiny_sft/val.json" in message, message


# (recipe values the checkpoint records, the resume's overrides on 2 ranks, what its one message says; None:
# resharded)
RANK_REFUSALS = [
    # 1 rank x 4 x GA 2 = 8, resumed on 2 ranks as it is: 16. (The message said "world_size is 2 but ... trained
    # with 1; resume with the same value", a key no recipe sets; then "resume with 1 rank(s)" whatever the batch.)
    ({}, [], ["was trained on 1, and the global batch (per_device_train_batch_size x gradient_accumulation_steps x "
              "ranks) is now 16 (2 rank(s) x 4 x GA 2), not its 8 (1 rank(s) x 4 x GA 2)",
              "set gradient_accumulation_steps: 1 to keep it on 2 rank(s) (run.yaml:11: gradient_accumulation_steps)",
              # the recipe's own command (it said a bare `make train NPROC=1`: the Makefile's default recipe)
              "resume with 1 rank(s) (`python -m pipeline train run.yaml --retrain-finished`, or "
              "NPROC x NNODES = 1)"]),
    # the global batch kept and the optimizer state offloaded to the CPU: DeepSpeed writes the same per-rank
    # partitions as without offload, resharded alike (the run: test_resume_world_size.py; it was refused: "the
    # optimizer state offloaded to cpu (offload_optimizer) is not rebuilt")
    (dict(zero_stage=3, offload_optimizer="cpu"), ["gradient_accumulation_steps=1", "zero_stage=3",
                                                   "offload_optimizer=cpu"], None),
    # group_by_length's mega-batches are 50 global micro-batches: 4 x 1 rank then, 4 x 2 ranks now
    (dict(group_by_length=True), ["gradient_accumulation_steps=1", "group_by_length=true"],
     ["group_by_length sorts the examples inside mega-batches", "set per_device_train_batch_size 2 and "
      "gradient_accumulation_steps 2",
      # the resume on 1 rank with the overrides typed, the batch key among them the checkpoint's (GA 1 on 1 rank
      # would change the global batch again)
      "resume with 1 rank(s) (`python -m pipeline train run.yaml --retrain-finished group_by_length=true "
      "gradient_accumulation_steps=2`, or NPROC x NNODES = 1)"]),
    # group_by_length (the default) where the train loader groups nothing: disable_shuffling reads the built order
    # (and pt's windows have no lengths: STAGE_RESHARDING). Refused by the message above (found resuming a pt run of
    # the default keys with `python -m pipeline.launch --num_gpus 2`)
    (dict(group_by_length=True, disable_shuffling=True), ["gradient_accumulation_steps=1", "group_by_length=true",
                                                          "disable_shuffling=true"], None),
]


def test_another_number_of_ranks_is_resharded_or_refused_by_the_global_batch(make_recipe, first_run, tmp_path):
    """2 ranks x 4 x GA 1 = 1 rank x 4 x GA 2: accepted, said in one line (the runs themselves:
    test_resume_world_size.py, test_multinode.py). RANK_REFUSALS: exit 2, one message saying what to set.
    (One training run for all: first_run's checkpoint, its recorded recipe values edited in a copy.)"""
    import os
    import shutil

    from pipeline.recipe import resolve
    from pipeline.train import checkpoint

    make_recipe(name="run", **FIRST, resume_from_checkpoint="latest")  # writes run.yaml
    env = {**os.environ, "WORLD_SIZE": "2"}
    two = resolve("run.yaml", ["gradient_accumulation_steps=1"], command="plan", env=env)
    assert checkpoint.check_compatible(two, first_run / "checkpoint-2") == [
        "resume: world_size: 1 -> 2 (global batch 8 kept: 1 rank(s) x 4 x GA 2 -> 2 rank(s) x 4 x GA 1): resharded"]
    for index, (saved, overrides, fragments) in enumerate(RANK_REFUSALS):
        path = tmp_path / str(index) / "checkpoint-2"
        shutil.copytree(first_run / "checkpoint-2", path)
        state = json.loads((path / "trainer_state.json").read_text())
        state["recipe"].update(saved)
        (path / "trainer_state.json").write_text(json.dumps(state))
        resumed = resolve("run.yaml", overrides, command="plan", env=env)
        if fragments is None:
            assert checkpoint.check_compatible(resumed, path) == [
                "resume: world_size: 1 -> 2 (global batch 8 kept: 1 rank(s) x 4 x GA 2 -> 2 rank(s) x 4 x GA 1): "
                "resharded"]
            continue
        with pytest.raises(UserError) as err:
            checkpoint.check_compatible(resumed, path)
        [message] = err.value.messages
        assert message.startswith(f"this job has 2 rank(s) but {path} was trained on 1"), message
        assert all(f in message for f in fragments), message


# (stage, recipe values, batch layout after 2 ranks x 2 x GA 1, what the one message says; None: resharded). dpo and rm
# average their loss per micro-batch (a mean over its pairs, step_scale 1), so the same micro-batches give the same
# update (the runs: test_resume_world_size.py for dpo; rm by hand, docs/resume.md); kto's KL estimate and the BCO
# baseline take every rank's micro-batch of one accumulation step at once, so ranks x accumulation change them
GROUPED_DPO = ("stage dpo's loss is a mean over each micro-batch's pairs, so per_device_train_batch_size must stay 2, "
               "and group_by_length sorts the examples inside mega-batches of 50 global micro-batches of "
               "per_device_train_batch_size x ranks = 4 examples, so that product must stay 4 too: no layout on 1 "
               "rank(s) keeps both; resume with 2 rank(s)")
STAGE_RESHARDING = [
    ("dpo", {}, (1, 2, 2), None),
    ("rm", {}, (1, 2, 2), None),
    ("dpo", {}, (1, 4, 1), "per_device_train_batch_size is 4, not 2: stage dpo's loss is a mean over each "
                           "micro-batch's pairs, so other micro-batches are another objective; keep "
                           "per_device_train_batch_size 2 (gradient_accumulation_steps 2)"),
    ("rm", {}, (1, 4, 1), "stage rm's loss is a mean over each micro-batch's pairs"),
    ("dpo", {"bco": True}, (1, 2, 2), "pref_bco_weight's reward baseline is a running mean that takes every rank's "
                                      "micro-batch mean at once"),
    ("kto", {}, (1, 2, 2), "supported for stage pt, sft, dpo, rm (stage kto's KL estimate is the mean over every "
                           "rank's micro-batch of one accumulation step"),
    ("ppo", {}, (1, 2, 2), "(stage ppo's rollouts and PPO epochs are not checked against the uninterrupted run)"),
    # group_by_length (the default) keeps per_device_train_batch_size x ranks, dpo's mean per micro-batch keeps
    # per_device_train_batch_size: no layout on 1 rank keeps both. Each message sent to the other's fix ("set
    # per_device_train_batch_size 4 and gradient_accumulation_steps 1", then "keep per_device_train_batch_size 2"),
    # found resuming a dpo run on 2 ranks with `python -m pipeline.launch --num_gpus 2`
    ("dpo", {"group_by_length": True}, (1, 2, 2), GROUPED_DPO),
    ("pt", {"group_by_length": True}, (1, 2, 2), None),  # pt's windows are never grouped (it was refused for it)
    ("dpo", {"group_by_length": True}, (1, 4, 1), GROUPED_DPO),
]


@pytest.mark.parametrize("stage, keys, after, said", STAGE_RESHARDING)
def test_preference_stages_resume_on_another_rank_count_where_the_update_is_the_same(stage, keys, after, said):
    """2 ranks x 2 x GA 1 -> 1 rank (world_change.problems on plain values, no run). Failed before: every stage but
    pt and sft was refused ("supported for stage pt and sft")."""
    from pathlib import Path

    from pipeline.train import world_change

    change = world_change.WorldChange((2, 2, 1), after)
    out = world_change.problems(change, Path("ckpt"), 0, stage=stage, asft=False,
                                **{"group_by_length": False, "offload_optimizer": "none", **keys})
    if said is None:
        assert out == []
    else:
        assert len(out) == 1 and said in out[0] and out[0].startswith("this job has 1 rank(s) but ckpt was "
                                                                       "trained on 2"), out


@pytest.mark.parametrize("offload, refused", [("none", False), ("cpu", False), ("nvme", True)])
def test_only_nvme_offload_is_refused_on_another_rank_count(offload, refused):
    """offload_optimizer: cpu leaves DeepSpeed's per-rank partition files as they are without offload (resharded:
    test_resume_world_size.py); NVMe swaps the optimizer state through DeepSpeed's own files, not rebuilt. Failed
    before for cpu: "the optimizer state offloaded to cpu (offload_optimizer) is not rebuilt"."""
    from pathlib import Path

    from pipeline.train import world_change

    out = world_change.problems(world_change.WorldChange((2, 2, 1), (1, 2, 2)), Path("ckpt"), 0, stage="sft",
                                asft=False, group_by_length=False, offload_optimizer=offload)
    assert out == ([] if not refused else [
        "this job has 1 rank(s) but ckpt was trained on 2: the optimizer state offloaded to NVMe (offload_optimizer: "
        "nvme) is swapped through DeepSpeed's own files, which are not rebuilt for another rank count "
        "(offload_optimizer: cpu is); resume with 2 rank(s) (`make train NPROC=2` (python -m pipeline.launch "
        "--num_gpus 2 --module pipeline train RECIPE), or NPROC x NNODES = 2), or start a "
        "new run from ckpt/adapter or ckpt/model"])


def test_the_documented_table_lists_exactly_the_classified_keys():
    from pathlib import Path

    from pipeline.train import checkpoint

    page = (Path(__file__).resolve().parents[2] / "docs" / "resume.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(): line.split("|")[3] for line in page.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in ("refuse", "apply", "keep")}
    for name, keys in (("refuse", checkpoint.REFUSE), ("apply", checkpoint.APPLY), ("keep", checkpoint.KEEP)):
        listed = [part.strip("` ") for part in rows[name].split(",") if part.strip().startswith("`")]
        assert listed == list(keys), name


def test_a_changed_sft_loss_is_said_with_its_step_and_kept_through_later_resumes(make_recipe, first_run, capsys):
    """A resume that changes the token loss (use_eaft_loss, eaft_alpha) trains it after the checkpoint's step: the
    plan says after which step and from what to what, the checkpoints carry the change, and all_results.json (which
    eval's report reads) lists it beside a later resume's; the last settings alone named the loss of every step."""
    capsys.readouterr()
    resume(make_recipe, max_steps=3, use_eaft_loss=True, eaft_alpha=0.5)
    assert ("loss: EAFT-weighted cross-entropy (use_eaft_loss, eaft_alpha 0.5): loss and eval_loss are that loss; no "
            "eval_perplexity; the loss changed after step 2 (a resume) from the plain cross-entropy to EAFT-weighted "
            "cross-entropy (use_eaft_loss, eaft_alpha 0.5)\n") in capsys.readouterr().err
    result = resume(make_recipe, max_steps=4, use_eaft_loss=True)  # eaft_alpha back to its default, 1
    eaft = {"use_eaft_loss": True, "eaft_alpha": 0.5}
    assert json.loads((result.output_dir / "all_results.json").read_text())["token_loss_changes"] == [
        {"step": 2, "from": {}, "to": eaft}, {"step": 3, "from": eaft, "to": {**eaft, "eaft_alpha": 1.0}}]


def test_a_checkpoint_from_before_the_token_mean_loss_is_announced(make_recipe, first_run):
    """Checkpoints written before the update's loss became the mean over all its trained tokens (2026-12-05) hold
    no LOSS_KEY: resuming one with accumulation (BASE_SFT: 2 steps) says the loss curve may shift there."""
    from pipeline.train import checkpoint

    r = make_recipe(name="run", **{**FIRST, "max_steps": 4, "resume_from_checkpoint": "latest"})
    path = first_run / "checkpoint-2"
    assert not any("earlier version" in n for n in checkpoint.check_compatible(r, path))
    state = json.loads((path / "trainer_state.json").read_text())
    del state["recipe"][checkpoint.LOSS_KEY]
    (path / "trainer_state.json").write_text(json.dumps(state))
    notices = checkpoint.check_compatible(r, path)
    assert any("was trained by an earlier version, whose sft loss was a mean per micro-batch" in n
               and "from step 2 on" in n for n in notices), notices


@pytest.mark.parametrize("stage, said", [("ppo", True), ("sft", False)])
def test_a_new_generation_setting_is_announced_where_ppo_rollouts_use_it(tmp_path, monkeypatch, stage, said):
    """Stage ppo generates the responses it trains on with max_new_tokens, do_sample, temperature, top_k, top_p and
    repetition_penalty: a resume that changes one trains on other responses from there (said, as an APPLY key);
    elsewhere they are eval's settings alone and change nothing trained (no word)."""
    from pipeline.train import checkpoint

    for files in ("training_data", "training_files", "reference_adapter_files"):  # the built data's records
        monkeypatch.setattr(checkpoint, files, lambda r: {})
    recipe = {"stage": stage, "max_new_tokens": 4, "do_sample": True, "temperature": 0.95, "top_k": 50, "top_p": 0.7,
              "repetition_penalty": 1.0}
    saved = {k: v for k, v in checkpoint.saved_recipe(recipe).items() if k in recipe}
    assert saved == recipe  # the checkpoint records them
    (tmp_path / checkpoint.STATE).write_text(json.dumps({"global_step": 1, "recipe": saved}), encoding="utf-8")
    notices = checkpoint.check_compatible({**recipe, "max_new_tokens": 3, "top_p": 0.9}, tmp_path)  # sampling
    expected = ["resume: max_new_tokens changed from 4 to 3: applied from step 1 on",
                "resume: top_p changed from 0.7 to 0.9: applied from step 1 on"]
    assert notices == (expected if said else [])
    greedy = checkpoint.check_compatible({**recipe, "do_sample": False, "temperature": 0.5}, tmp_path)
    # greedy from here: do_sample said, the temperature greedy rollouts never read not
    assert greedy == (["resume: do_sample changed from true to false: applied from step 1 on"] if said else [])


def test_train_loss_is_the_mean_step_loss_of_the_steps_this_call_trained(make_recipe):
    """all_results.json's train_loss was the last log line's loss. transformers' Trainer reports the mean of every
    optimizer step's loss over the steps its train() call ran (`_total_loss_scalar / (global_step -
    _initial_global_step)`: a resumed call's mean starts at the resumed step). Golden: the per-step losses of a
    logging_steps 1 run, averaged here by hand; the resumed run repeats them exactly (exact resume)."""
    keys = dict(FIRST, max_steps=3, save_steps=1)
    straight = train(make_recipe(name="straight", **keys))
    losses = [rec["loss"] for rec in read_log(straight.output_dir / "trainer_log.jsonl")]
    assert len(losses) == 3 and len(set(losses)) == 3, losses
    assert results(straight)["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-9)

    windows = train(make_recipe(name="windows", **keys, logging_steps=2))  # lines at step 2 (steps 1-2) and 3
    lines = {rec["step"]: rec["loss"] for rec in read_log(windows.output_dir / "trainer_log.jsonl")}
    assert results(windows)["train_loss"] == pytest.approx((2 * lines[2] + lines[3]) / 3, rel=1e-9)
    assert results(windows)["train_loss"] == pytest.approx(sum(losses) / 3, rel=1e-5)

    # from step 1: the line at step 2 also holds the saved step 1, which this call's mean leaves out
    resumed = train(make_recipe(name="windows", **keys, logging_steps=2,
                                resume_from_checkpoint="saves/windows/checkpoint-1"))
    assert resumed.exit_code == 0
    assert results(resumed)["train_loss"] == pytest.approx((losses[1] + losses[2]) / 2, rel=1e-5)


def results(result) -> dict:
    return json.loads((result.output_dir / "all_results.json").read_text(encoding="utf-8"))


def test_a_log_s_mean_loss_weighs_each_line_by_its_steps():
    """The fallback for a resume that trains no step: lines at steps 2 (mean of 2 steps) and 3 (1 step)."""
    from pipeline.train.run import logged_mean_loss

    records = [{"step": 2, "loss": 4.0}, {"step": 2, "eval_loss": 9.0}, {"step": 3, "loss": 1.0}]
    assert logged_mean_loss(records) == pytest.approx((2 * 4.0 + 1.0) / 3)
    assert logged_mean_loss([]) is None
