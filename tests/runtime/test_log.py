"""trainer_log.jsonl, the console line, the loss plot."""
from __future__ import annotations

import json
import math

from pipeline.runtime.log import (TrainLog, format_record, plot_curve, plot_loss, read_log, running_mean,
                                  write_results)


def test_log_appends_json_lines_and_a_resumed_run_drops_lines_past_its_step(tmp_path, capsys):
    log = TrainLog(tmp_path, enabled=True)
    for step in (1, 2, 3, 4):
        log.write({"step": step, "loss": 1.0 / step, "grad_norm": math.inf if step == 4 else 0.5})
    lines = (tmp_path / "trainer_log.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[3])["grad_norm"] == "inf"  # still valid JSON
    assert "step 2 | loss 0.5000 | grad_norm 0.500" in capsys.readouterr().err
    with open(tmp_path / "trainer_log.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # a line torn by a kill
    assert [r["step"] for r in read_log(tmp_path / "trainer_log.jsonl")] == [1, 2, 3, 4]
    TrainLog(tmp_path, enabled=True, resume_step=2)
    assert [r["step"] for r in read_log(tmp_path / "trainer_log.jsonl")] == [1, 2]


def test_other_ranks_write_nothing(tmp_path):
    TrainLog(tmp_path, enabled=False).write({"step": 1, "loss": 2.0})
    assert not (tmp_path / "trainer_log.jsonl").exists()


def test_console_line():
    line = format_record({"step": 10, "epoch": 0.5, "loss": 2.34567, "lr": 1e-4, "grad_norm": 0.8766,
                          "loss_scale": 65536.0, "tokens_per_s": 1234.4, "eta": 3725})
    assert line == ("step 10 | epoch 0.50 | loss 2.3457 | lr 1.000e-04 | grad_norm 0.877 | loss_scale 65536 | "
                    "tokens_per_s 1234 | eta 1:02:05")


def test_running_mean():
    assert running_mean([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]


def test_plot_and_results(tmp_path):
    records = [{"step": s, "loss": 3.0 - s / 50} for s in range(1, 41)] + [{"step": 40, "eval_loss": 2.5}]
    path = plot_loss(records, tmp_path / "training_loss.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert plot_loss([], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    dpo = [{"step": s, "loss": 0.69, "rewards/accuracies": s / 10} for s in range(1, 6)] + \
        [{"step": 5, "eval_loss": 0.6, "eval_rewards/accuracies": 0.75}]
    acc = plot_curve(dpo, "rewards/accuracies", tmp_path / "acc.png", title="reward accuracy")
    assert acc.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_curve(records, "rewards/accuracies", tmp_path / "no.png", title="") is None  # an sft log
    write_results(tmp_path, {"train_loss": 1.5, "eval_loss": math.nan})
    assert json.loads((tmp_path / "all_results.json").read_text()) == {"train_loss": 1.5, "eval_loss": "nan"}
