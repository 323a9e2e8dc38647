"""neftune_noise_alpha reaches the model `train` optimises: its training forwards are noisy, nothing else changes
(the model-level formula and transformers parity are tests/model/test_neftune.py; exact resume with it is
tests/train/test_checkpoint_resume.py)."""
from __future__ import annotations

from pipeline.runtime.log import read_log
from pipeline.train.run import train


def test_the_first_training_loss_has_the_noise(make_recipe):
    keys = {"max_steps": 1, "logging_steps": 1, "dropout": 0.0, "lora_dropout": 0.0}
    plain = train(make_recipe(name="plain", **keys))
    noisy = train(make_recipe(name="noisy", neftune_noise_alpha=15.0, **keys))
    assert (plain.engine.module.neftune_noise_alpha, noisy.engine.module.neftune_noise_alpha) == (None, 15.0)
    first = [read_log(run.output_dir / "trainer_log.jsonl")[0]["loss"] for run in (plain, noisy)]
    assert first[0] != first[1]  # step 1's forward saw the same weights and batch, and the noise
