"""Review h191 of c807675..ccfeb08, through the CLI as typed, from a transformers-written GPT-2 checkpoint.

- A stale build met with command-line overrides: `python -m pipeline train r.yaml val_size=0.2` after a build of
  r.yaml as written. The message names the command that rebuilds the data this run reads, the overrides included
  (make passes them as ARGS, which `make data` hands to the build). Failed before: it said `make data RECIPE=r.yaml`
  (python -m pipeline build r.yaml), which rebuilds the recipe as written, val_size 0.1, so the run stopped on the same
  message again.
"""
from __future__ import annotations

import shlex

from tests.acceptance.harness import pipeline, refused, write_recipe


def test_a_stale_build_names_the_rebuild_with_the_runs_overrides(workdir, hf_checkpoint):
    write_recipe(workdir / "r.yaml", model_name_or_path=str(hf_checkpoint("gpt2")), dataset_dir="data",
                 output_dir="saves/r")
    pipeline("build", "r.yaml", cwd=workdir, as_typed=False)
    err = refused("train", "r.yaml", "val_size=0.2", cwd=workdir)
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: data/build/tiny_sft: built with other settings than the recipe's (val_size 0.1 -> 0.2); run `make data "
        "RECIPE=r.yaml ARGS=val_size=0.2` (python -m pipeline build r.yaml val_size=0.2), or set overwrite_cache: true"
        " so that train and eval rebuild it themselves"], err
    command = err.split("(python -m pipeline ", 1)[1].split(")", 1)[0]
    pipeline(*shlex.split(command), cwd=workdir, as_typed=False)  # what the message says, as it says it
    pipeline("validate", "r.yaml", "val_size=0.2", cwd=workdir, as_typed=False)  # the build is now the run's
