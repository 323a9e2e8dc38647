"""The training log line's `eta` is the progress bar's own estimate (pipeline.runtime.log.progress_eta): under a
change of load the log said 0:03:05 while the bar said 10:12 at the same step, as the log took the mean time of
every step of the run and the bar (tqdm) a moving average of the recent ones. The loop runs on a stand-in engine
(tests/train/test_fp16.py) whose steps advance tqdm's clock by set durations."""
from __future__ import annotations

import io

import pytest
import tqdm.std
from tqdm import tqdm as Bar

from pipeline.recipe.args import train_args
from pipeline.runtime.log import progress_eta
from pipeline.train.checkpoint import TrainState
from pipeline.train.loop import Trainer
from tests.train.test_fp16 import StubEngine, StubLoader

DURATIONS = [1.0] * 4 + [5.0] * 6  # seconds per optimizer step: the load changes after step 4
# After step 6 (4 steps left): tqdm's rate is an exponential moving average (smoothing 0.3, bias-corrected, tqdm
# 4.70 std.py EMA) of each step's dn = 1 over dt. By hand: EMA(dt) = 0.3 * (0.7^5 + 0.7^4 + 0.7^3 + 0.7^2) * 1
# + 0.3 * (0.7 + 1) * 5 = 2.922351, over 1 - 0.7^6 = 0.882351; eta = 4 * 2.922351 / 0.882351 = 13.248 s.
# The mean over the run, 4 * 14 / 6 = 9.333 s, was what the log said.
ETA_AT_6 = 4 * 2.922351 / 0.882351


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TimedEngine(StubEngine):
    """Each optimizer step takes its DURATIONS entry on the clock the progress bar reads."""

    def __init__(self, clock: Clock):
        super().__init__([2.0] * 40)
        self.clock = clock

    def step(self):
        self.clock.now += DURATIONS[self.micro]
        super().step()


class Records:
    def __init__(self):
        self.lines: list[dict] = []

    def write(self, record: dict) -> None:
        self.lines.append(record)


class NoStop:
    def requested(self) -> bool:
        return False


def test_the_log_eta_is_the_bars_under_a_change_of_load(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(tqdm.std, "time", clock)  # the clock every bar reads (tqdm.std: from time import time)
    args = train_args({"gradient_accumulation_steps": 1, "l1_lambda": 0.0, "nan_policy": "stop", "fp16": False,
                       "total_steps": len(DURATIONS), "logging_steps": 1, "save_steps": 1000})
    log = Records()
    trainer = Trainer(TimedEngine(clock), args, TrainState(global_step=0), StubLoader(), evaluate=None,
                      save=lambda: None, log=log, stop=NoStop())
    assert trainer.train() == "done"
    etas = {line["step"]: line["eta"] for line in log.lines}
    assert etas[6] == pytest.approx(ETA_AT_6, abs=1e-3)
    assert etas[len(DURATIONS)] == 0  # the last step: nothing left, as the bar says


def test_progress_eta_is_what_the_bar_shows():
    clock = Clock()
    bar = Bar(total=10, file=io.StringIO())
    bar._time, bar.start_t, bar.last_print_t = clock, 0.0, 0.0
    for duration in DURATIONS[:6]:
        clock.now += duration
        bar.update(1)
    assert progress_eta(bar) == pytest.approx(ETA_AT_6)
    assert f"<{Bar.format_interval(ETA_AT_6)}," in str(bar)  # tqdm's own rendering: '[00:14<00:13, ...'
    bar.ncols = 8  # a narrow terminal (dynamic_ncols): tqdm cuts its line to 8 characters, the eta stays
    assert progress_eta(bar) == pytest.approx(ETA_AT_6)
    assert progress_eta(Bar(total=10, disable=True)) is None  # ranks past 0 show no bar
