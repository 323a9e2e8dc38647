"""Messages a newcomer met on a walk-through, each driven as typed (`python -m pipeline ...`) in a scratch folder:
a missing local folder named like a hub id (`saves/sft`) is reported as missing here, with the recipe that writes
it: under saves/ or models/ the hub is not asked at all; beside a folder of that first name (`Qwen/...`) the hub
comes second; a real hub id (Org/Name) keeps the hub's message. Each: exit 2, no traceback.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.acceptance.harness import link_makefile, refused, write_data, write_recipe


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """recipes/sft.yaml writes saves/sft (not trained); recipes/next.yaml continues its adapter; saves/ exists; the
    Makefile linked, as in a newcomer's checkout (its messages give the make form there: pipeline.rerun)."""
    link_makefile(tmp_path)
    write_data(tmp_path / "datasets")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "saves").mkdir()
    write_recipe(tmp_path / "recipes" / "sft.yaml", model_name_or_path="tiny", output_dir="saves/sft")
    write_recipe(tmp_path / "recipes" / "next.yaml", model_name_or_path="tiny", adapter_name_or_path="saves/sft",
                 output_dir="saves/next")
    return tmp_path


# the upstream's own command, as rerun.run_this says every "run this" (hand-written before: "run `make train
# RECIPE=recipes/sft.yaml` first"), without this command's overrides (they set next.yaml's values; make runs an
# upstream with ARGS= too)
WRITER = ("(recipes/sft.yaml writes it: run `make train RECIPE=recipes/sft.yaml` (python -m pipeline train "
          "recipes/sft.yaml) first)")


def test_a_missing_local_folder_shaped_like_a_hub_id_is_missing_here_first(workdir: Path):
    """saves/sft is a folder of this machine: the message is that it is missing here and which recipe writes it. It
    was looked up on the hub first (a network call, or a long wait offline) and went on 'only if 'saves/sft' is meant
    as a hub id: ... run `hf download saves/sft ...`'."""
    err = refused("train", "recipes/next.yaml", "output_dir=saves/other", cwd=workdir)
    line = next(x for x in err.splitlines() if "adapter_name_or_path" in x)
    assert line.startswith("error: recipes/next.yaml:"), err
    assert line.endswith(f"adapter_name_or_path: directory 'saves/sft' does not exist here {WRITER}"), line
    assert "hub" not in err and "hf download" not in err, err


@pytest.mark.parametrize("override, said", [
    # model_name_or_path the same way
    (("model_name_or_path=saves/sft", "adapter_name_or_path=null"),
     f"model_name_or_path: directory 'saves/sft' does not exist here {WRITER}\n"),
    # no recipe writes it: under saves/ still missing here alone
    (("adapter_name_or_path=saves/other",),
     "adapter_name_or_path: directory 'saves/other' does not exist here; if another recipe produces it, run that one "
     "first\n"),
    # models/, where checkpoints are downloaded to (docs/training.md), before models/ exists: no hub repository
    (("model_name_or_path=models/gpt2", "adapter_name_or_path=null"),
     "model_name_or_path: directory 'models/gpt2' does not exist here; if another recipe produces it, run that one "
     "first\n"),
    # ./ is never a hub id: no hub hint at all, but the writer (an adapter folder was said to hold no config)
    (("adapter_name_or_path=./saves/sft",),
     f"adapter_name_or_path: directory 'saves/sft' does not exist here {WRITER}; expected an adapter directory"),
    # a first part that is merely a folder here (Qwen/ beside the recipes) may still be a hub id: missing here
    # first, the hub second, as before
    (("model_name_or_path=Qwen/Missing", "adapter_name_or_path=null"),
     "model_name_or_path: directory 'Qwen/Missing' does not exist here; if another recipe produces it, run that one "
     "first; only if 'Qwen/Missing' is meant as a hub id: 'Qwen/Missing' is neither a local directory nor a cached "
     "hub snapshot"),
], ids=["model", "under-saves", "under-models", "dot-slash", "beside-a-folder"])
def test_other_local_looking_paths(workdir: Path, override: tuple[str, ...], said: str, monkeypatch):
    import huggingface_hub

    asked, real = [], huggingface_hub.snapshot_download  # who asks the hub (or its cache)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: asked.append(a) or real(*a, **k))
    (workdir / "Qwen").mkdir()
    err = refused("train", "recipes/next.yaml", *override, cwd=workdir, as_typed=False)
    assert said in err, err
    hub = "Qwen/" in said  # the hub is asked (and said) for that one alone
    assert ("hub id" in err) == hub and err.count("hf download") == hub and bool(asked) == hub, (err, asked)


def test_a_real_hub_id_keeps_the_hub_message(workdir: Path):
    err = refused("train", "recipes/next.yaml", "model_name_or_path=Org/Name", "adapter_name_or_path=null",
                  cwd=workdir, as_typed=False)
    assert "model_name_or_path: 'Org/Name' is neither a local directory nor a cached hub snapshot" in err, err
    assert "does not exist here" not in err, err


@pytest.mark.parametrize("argv, said", [
    (("trian", "recipes/sft.yaml"), "argument command: invalid choice: 'trian' (did you mean 'train'?)"),
    (("trian",), "argument command: invalid choice: 'trian' (did you mean 'train'?)"),  # before 'recipe: required'
    (("xyz", "recipes/sft.yaml"), "argument command: invalid choice: 'xyz' (commands: build, validate, inspect, "),
], ids=["typo", "typo-alone", "nothing-close"])
def test_a_mistyped_command_is_one_line_with_the_closest_one(workdir: Path, argv: tuple[str, ...], said: str):
    """In this process: tests/test_cli.py runs `python -m pipeline trian r.yaml` as typed."""
    err = refused(*argv, cwd=workdir, as_typed=False)
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(f"python -m pipeline: error: {said}"), err


def test_every_message_names_a_command_line_override_as_typed(workdir: Path):
    """The helper that names where a key was set (recipe.args.key_at / where, as the lock, the registry and the
    bf16 notice use it) and the recipe rules say the same for the command line; key_at said `cli: output_dir: ...`."""
    err = refused("train", "recipes/sft.yaml", "output_dir=/proc/x", cwd=workdir, as_typed=False)  # the lock's
    assert err.startswith("error: command line override output_dir=/proc/x: output_dir: /proc/x cannot be created"), err
    err = refused("validate", "recipes/sft.yaml", "lora_rank=0", cwd=workdir, as_typed=False)  # a rule's
    assert err.startswith("error: command line override lora_rank=0: lora_rank: "), err
    assert "cli:" not in err, err


def test_the_upstream_of_a_deleted_adapter_is_trained_again_with_retrain_finished(workdir: Path):
    """recipes/sft.yaml's run finished (resolved.yaml's lines, all_results.json: written by hand as train writes
    them) but its adapter/ was deleted: the command to run first trains that finished run again, which train does
    only with --retrain-finished (failed before: `python -m pipeline train recipes/sft.yaml`, which train refuses:
    "holds a finished run"). Not `make train RECIPE=recipes/sft.yaml`: its train stamp, current since that run,
    makes it say "Nothing to be done for 'train'" and leave the adapter missing (failed before: printed first)."""
    run = workdir / "saves" / "sft"
    run.mkdir()
    (run / "resolved.yaml").write_text(f"# resolved recipe: recipes/sft.yaml\n# started in: {workdir}\n", "utf-8")
    (run / "all_results.json").write_text("{}", encoding="utf-8")
    err = refused("train", "recipes/next.yaml", "adapter_name_or_path=saves/sft/adapter", cwd=workdir,
                  as_typed=False)
    assert ("adapter_name_or_path: directory 'saves/sft/adapter' does not exist here (recipes/sft.yaml writes it, "
            "and its finished run in saves/sft is there without it: run `python -m pipeline train recipes/sft.yaml "
            "--retrain-finished` first; `make train` leaves a finished run as it is until the recipe or its ARGS "
            "change)") in err, err
