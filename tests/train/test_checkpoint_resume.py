"""Checkpoints: layout, manifest, atomicity, retention, damage detection; exact resume mid-epoch."""
from __future__ import annotations

import json
import os
import signal
from typing import Any

import pytest
import torch
from safetensors import safe_open

from pipeline.errors import UserError
from pipeline.train import checkpoint
from pipeline.runtime.log import read_log
from pipeline.train.loop import Trainer
from pipeline.train.run import train
from tests.train.helpers import BASE_PT, BASE_SFT


def find_resume(r):
    """The checkpoint a resolved recipe resumes from, as train finds it."""
    return checkpoint.find_resume(r["resume_from_checkpoint"], r["output_dir"],
                                  checkpoint.where(r, "resume_from_checkpoint"))


def interrupt_after(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Deliver a real SIGTERM to this process right after optimizer step `step`."""
    original = Trainer.optimizer_step

    def wrapped(self, window):
        norm = original(self, window)
        if self.state.global_step + 1 == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return norm
    monkeypatch.setattr(Trainer, "optimizer_step", wrapped)


def straight_and_resumed(make: Any, stop: int = 2, **keys: Any) -> tuple[list[dict], list[dict]]:
    """trainer_log.jsonl of one uninterrupted run and of one stopped by SIGTERM after step `stop` and resumed
    (`make(name=..., **keys)` gives each run's recipe)."""
    from pipeline.runtime.log import read_log
    from pipeline.train.run import train

    straight = train(make(name="straight", **keys))
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, stop)
        first = train(make(name="resumed", **keys))
    assert first.exit_code == 143 and first.state.global_step == stop
    resumed = train(make(name="resumed", resume_from_checkpoint="latest", **keys))
    return (read_log(straight.output_dir / "trainer_log.jsonl"), read_log(resumed.output_dir / "trainer_log.jsonl"))


def tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


# 9 micro-batches per epoch, accumulation 2 -> 4 steps per epoch: stopping after step 3 is mid-epoch (batch 6),
# and steps 5..6 run in the second epoch. Dropout makes the RNG state matter.
RESUME = dict(max_steps=6, warmup_steps=1, gradient_accumulation_steps=2, dropout=0.1, eval_steps=2)


@pytest.mark.parametrize("base, keys, final", [
    # ZeRO-3 + bf16: partitioned fp32 masters and optimizer state, bf16 module weights
    (BASE_SFT, dict(finetuning_type="lora", lora_dropout=0.1, zero_stage=3, bf16=True),
     "adapter/adapter_model.safetensors"),
    # no ZeRO, pure_bf16: DeepSpeed keeps the client optimizer's state in its model-states file and hands it back
    # through its load_state_dict; here optim adafactor (transformers' Adafactor: per-tensor row / column means in
    # float32 on the bf16 weights, RMS and an integer step, GPT-2's Conv1D weights factored transposed; ZeRO-0
    # fp32 AdamW's state is the sft-varied case's)
    (BASE_PT, dict(finetuning_type="full", optim="adafactor", pure_bf16=True), "model/model.safetensors"),
    # answers of 1-12 words, one log line per 4 steps: the stop after step 3 falls inside a log window, whose sums
    # (each update's mean over its trained tokens) the checkpoint keeps; NEFTune's noise comes from the saved RNG
    (BASE_SFT, dict(finetuning_type="lora", dataset="varied_sft", per_device_train_batch_size=2, logging_steps=4,
                    neftune_noise_alpha=5.0), "adapter/adapter_model.safetensors"),
    # use_muon (LoRA's A and B by Muon, the rest by its AdamW): its momentum buffers, moments and step counts
    # (~40 s: slow, the others cover the resume machinery)
    pytest.param(BASE_SFT, dict(finetuning_type="lora", lora_dropout=0.1, use_muon=True),
                 "adapter/adapter_model.safetensors", marks=pytest.mark.slow),
], ids=["lora-zero3-bf16", "full-pure-bf16-adafactor", "sft-varied-log-window-neftune", "lora-muon"])
def test_interrupted_and_resumed_run_equals_uninterrupted_bitwise(make_recipe, base, keys, final):
    straight = train(make_recipe(base, name="straight", **RESUME, **keys))

    with pytest.MonkeyPatch.context() as patch:
        interrupt_after(patch, 3)
        first = train(make_recipe(base, name="resumed", **RESUME, **keys))
    assert first.exit_code == 143 and first.state.global_step == 3
    ckpt = first.output_dir / "checkpoint-3"
    assert checkpoint.problems_with(ckpt) == []
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (3, 0, 6)
    assert not (first.output_dir / final).exists()  # an interrupted run is not a finished one

    with pytest.MonkeyPatch.context() as patch:  # resuming never unpickles: torch.load is not even called
        patch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called while resuming"))
        second = train(make_recipe(base, name="resumed", resume_from_checkpoint="latest", **RESUME, **keys))
    assert second.exit_code == 0 and second.state.global_step == 6
    ours = dict(second.engine.module.named_parameters())
    for name, p in straight.engine.module.named_parameters():
        assert torch.equal(ours[name], p), name
    a, b = tensors(straight.output_dir / final), tensors(second.output_dir / final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = read_log(straight.output_dir / "trainer_log.jsonl"), read_log(second.output_dir / "trainer_log.jsonl")
    every = (keys.get("logging_steps", 1), RESUME["eval_steps"])  # a line: train metrics or eval metrics due
    assert [r["step"] for r in log_b] == [s for s in range(1, 7) if s == 6 or any(s % n == 0 for n in every)]
    assert [r.get("loss") for r in log_b] == [r.get("loss") for r in log_a]  # one run's log, no repeats
    assert [r.get("eval_loss") for r in log_b] == [r.get("eval_loss") for r in log_a]
    assert second.state.tokens_seen == straight.state.tokens_seen


def test_checkpoint_layout_manifest_and_retention(make_recipe):
    r = make_recipe(max_steps=5, save_steps=2, save_total_limit=2, warmup_steps=0)
    result = train(r)
    out = result.output_dir
    assert [p.name for p in checkpoint.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-5"]  # 2 deleted
    ckpt = out / "checkpoint-4"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    listed = set(manifest["files"])
    on_disk = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    assert {"trainer_state.json", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
            "rng/rank-0.safetensors", "deepspeed/mp_rank_00_model_states.pt"} <= listed
    # no pickle anywhere: DeepSpeed's files are safetensors too
    for rel in listed:
        if rel.endswith((".pt", ".safetensors")):
            with safe_open(str(ckpt / rel), framework="pt"):
                pass
    # the checkpoint's DeepSpeed state holds only the trainable (LoRA) weights
    from pipeline.train.safestate import load_state
    module = load_state(ckpt / "deepspeed" / "mp_rank_00_model_states.pt")["module"]
    assert module and all(".lora." in k for k in module)
    assert not list(out.glob(".checkpoint-*"))  # no temp directories left


def damage(path) -> None:
    target = path / "adapter" / "adapter_model.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))


def test_latest_skips_a_damaged_checkpoint_and_an_explicit_one_is_refused(make_recipe, capsys):
    r = make_recipe(max_steps=4, save_steps=2, warmup_steps=0)
    out = train(r).output_dir
    damage(out / "checkpoint-4")
    found = find_resume(make_recipe(max_steps=4, save_steps=2, warmup_steps=0,
                                               resume_from_checkpoint="latest"))
    assert found == out / "checkpoint-2"
    assert "checkpoint-4" in capsys.readouterr().err
    with pytest.raises(UserError) as err:
        find_resume(make_recipe(max_steps=4, resume_from_checkpoint=str(out / "checkpoint-4")))
    message = err.value.messages[0]
    assert "run.yaml:" in message and "resume_from_checkpoint" in message  # where the value came from
    assert "adapter_model.safetensors does not match its sha256" in message
    (out / "checkpoint-2" / "manifest.json").unlink()
    with pytest.raises(UserError, match="every checkpoint .* is damaged"):
        find_resume(make_recipe(max_steps=4, resume_from_checkpoint="latest"))


def test_resume_needs_a_checkpoint_and_a_compatible_recipe(make_recipe):
    with pytest.raises(UserError, match="holds no checkpoint"):
        train(make_recipe(max_steps=2, resume_from_checkpoint="latest"))
    train(make_recipe(max_steps=2, warmup_steps=0))
    with pytest.raises(UserError) as err:
        train(make_recipe(max_steps=2, lora_rank=8, resume_from_checkpoint="latest"))
    assert "lora_rank is 8 but" in err.value.messages[0] and "trained with 4" in err.value.messages[0]


def test_a_crash_while_saving_leaves_no_checkpoint(make_recipe, monkeypatch):
    from pipeline.train import export

    def broken(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(export.Exporter, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        train(make_recipe(max_steps=2, save_steps=1, warmup_steps=0))
    out = make_recipe(max_steps=2).get("output_dir")
    from pathlib import Path
    assert checkpoint.list_checkpoints(Path(out)) == []  # only the temp directory, never checkpoint-1
    assert list(Path(out).glob(".checkpoint-1.tmp-*"))
    checkpoint.clean_stale(out)
    assert not list(Path(out).glob(".checkpoint-*"))


def _fake_checkpoint(path, step: int) -> None:
    """A checkpoint directory whose manifest matches its files, built by hand (no training needed)."""
    import hashlib
    import json

    path.mkdir(parents=True)
    state = json.dumps({"global_step": step}).encode()
    (path / "trainer_state.json").write_bytes(state)
    files = {"trainer_state.json": {"sha256": hashlib.sha256(state).hexdigest(), "bytes": len(state)}}
    (path / "manifest.json").write_text(json.dumps({"format": "pipeline-checkpoint", "version": 1, "step": step,
                                                    "files": files}))


def test_a_kill_between_the_renames_of_a_resave_keeps_the_old_checkpoint(tmp_path):
    # save() replaces an existing checkpoint-N by renaming it to .checkpoint-N.old, then the new one in place
    _fake_checkpoint(tmp_path / ".checkpoint-4.old", 4)  # killed between the renames: no checkpoint-4
    _fake_checkpoint(tmp_path / ".checkpoint-6.old", 6)  # killed after both renames: checkpoint-6 is the new one
    _fake_checkpoint(tmp_path / "checkpoint-6", 6)
    _fake_checkpoint(tmp_path / ".checkpoint-8.old", 8)
    (tmp_path / ".checkpoint-8.old" / "trainer_state.json").write_text("{}")  # damaged: not restored
    checkpoint.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert checkpoint.problems_with(tmp_path / "checkpoint-4") == []
    assert checkpoint.read_state(tmp_path / "checkpoint-4") == {"global_step": 4}


def test_a_signal_during_a_periodic_save_stops_at_that_checkpoint(make_recipe, monkeypatch):
    """SIGTERM while checkpoint-2 is being written (save_steps 2): the run trained step 3 and saved checkpoint-3
    before stopping; the step just saved is where it stops."""
    from pipeline.train import checkpoint

    original = checkpoint.save

    def save(engine, train_args, state, *rest):
        path = original(engine, train_args, state, *rest)
        if state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return path
    monkeypatch.setattr(checkpoint, "save", save)
    result = train(make_recipe(max_steps=4, save_steps=2))
    assert result.exit_code == 143 and result.state.global_step == 2
    assert [p.name for p in checkpoint.list_checkpoints(result.output_dir)] == ["checkpoint-2"]
