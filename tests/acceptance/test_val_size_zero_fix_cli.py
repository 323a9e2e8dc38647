"""The val_size 0 refusal's fix, typed as printed where `make` reads no pipeline Makefile (a folder of the user's own):
`python -m pipeline train` reads the data built before, and refuses a build made with another val_size ("built with
other settings than the recipe's"), as it refuses every stale build (pipeline.data.load.build_problem); so the message
there gives the build with val_size=0.1 first, then the command typed (rerun.run_after_build). Under make the one
make command stays (tests/acceptance/test_run_this_named_cli.py): the Makefile's args stamp rebuilds the data.

Failed before: the message gave `python -m pipeline train r.yaml --retrain-finished val_size=0.1` alone, which, typed,
exited 2 with "data/build/tiny_sft: built with other settings than the recipe's (val_size 0 -> 0.1)".
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path

from tests.acceptance.harness import pipeline, refused, write_recipe


def test_the_val_size_zero_fix_typed_as_printed_trains_and_evaluates(workdir: Path):
    write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r", val_size=0,
                 eval_strategy="steps", eval_steps=1, max_steps=1)
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    err = refused("train", "r.yaml", cwd=workdir, as_typed=False)
    fix = "`python -m pipeline build r.yaml val_size=0.1 && python -m pipeline train r.yaml val_size=0.1`"
    assert f"set val_size (a fraction such as 0.1, or a number of rows), e.g. {fix}, or name an eval_dataset" in err, err
    build, train = (shlex.split(command) for command in fix.strip("`").split(" && "))
    assert build[:3] == train[:3] == ["python", "-m", "pipeline"]
    pipeline(*build[3:], cwd=workdir, as_typed=False)
    pipeline(*train[3:], cwd=workdir)  # as typed
    manifest = json.loads((workdir / "data/build/tiny_sft/manifest.json").read_text(encoding="utf-8"))
    assert manifest["splits"]["val"] == 3  # ceil(24 x 0.1), as HF datasets' train_test_split (LLaMA-Factory's) holds out
    log = [json.loads(line) for line in (workdir / "saves/r/trainer_log.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [rec["step"] for rec in log if "eval_loss" in rec] == [1], log
