"""`make` builds every recipe output a recipe starts from, as a user types it, and a second `make` does nothing.

Only model_name_or_path and adapter_name_or_path used to name an upstream: a dpo recipe whose ref_model was the sft
recipe's merged model, or a recipe training from another recipe's export_dir (LLaMA-Factory: train, export, train
from the export), stopped at train with "directory not found", however the user had ordered the recipes.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.acceptance.harness import (DPO, cli_env, make, make_stages, refused_before_any_stage, scratch_repo,
                                      write_data, write_ranking_data, write_recipe)


def _repo(tmp_path: Path) -> tuple[Path, str]:
    root = scratch_repo(tmp_path / "repo")
    write_data(root / "datasets")
    (root / "recipes").mkdir()
    return root, f"VENV={root / 'venv'}"


def _stages(proc) -> list[tuple[str, str]]:
    """(command, recipe name) of every `python -m pipeline` line make ran, in order."""
    return [(command, Path(recipe).stem) for command, recipe in make_stages(proc)]


def _make(root: Path, *args: str, expect: int | None = 0):
    return make(*args, cwd=root, env=cli_env(MAKEFLAGS="", MAKELEVEL=""), expect=expect)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> tuple[Path, dict[str, subprocess.CompletedProcess]]:
    """One repo where an sft recipe is upstream of two others, and what each `make train` ran, in this order: a
    recipe training from the sft run's export (down.yaml; LLaMA-Factory: train, export, train from the export), the
    same again, a dpo recipe whose ref_model is the sft run's merged model, the same again, and down.yaml once more
    after an edit of the export recipe. The two claims share the sft run, which each test trained for itself."""
    root, venv = _repo(tmp_path_factory.mktemp("upstreams"))
    write_ranking_data(root / "datasets")
    write_recipe(root / "recipes" / "sft.yaml", model_name_or_path="tiny", output_dir="saves/sft", max_steps=1)
    # a LLaMA-Factory merge recipe (examples/merge_lora's keys): no dataset, the sft run's adapter (its output_dir, as
    # LLaMA-Factory's users name it) onto the same base, written to export_dir; make makes it with `make export`
    export = write_recipe(root / "recipes" / "export.yaml", {"model_name_or_path": "tiny", "seed": 7,
                                                            "template": "alpaca"},
                          adapter_name_or_path="saves/sft", export_dir="saves/sft_export", export_device="cpu",
                          export_legacy_format=False)
    write_recipe(root / "recipes" / "down.yaml", model_name_or_path="saves/sft_export", output_dir="saves/down",
                 max_steps=1)
    write_recipe(root / "recipes" / "dpo.yaml", DPO, model_name_or_path="tiny", ref_model="saves/sft/merged",
                 output_dir="saves/dpo", max_steps=1)
    runs = {}
    for name, recipe in (("down", "down"), ("down again", "down"), ("dpo", "dpo"), ("dpo again", "dpo")):
        runs[name] = _make(root, "train", f"RECIPE=recipes/{recipe}.yaml", venv)
    export.write_text(export.read_text() + "export_size: 4\n")
    runs["down after an export edit"] = _make(root, "train", "RECIPE=recipes/down.yaml", venv)
    return root, runs


def test_a_dpo_ref_model_from_the_sft_recipe_is_made_first(made):
    root, runs = made
    stages = _stages(runs["dpo"])
    assert stages.index(("merge", "sft")) < stages.index(("train", "dpo")), runs["dpo"].stdout
    assert ("train", "sft") not in stages  # trained already, for down.yaml
    assert (root / "saves/sft/merged/model.safetensors").is_file()
    assert _stages(runs["dpo again"]) == []


def test_train_from_an_export_makes_the_export_and_its_training_first(made):
    root, runs = made
    assert [s for s in _stages(runs["down"]) if s[0] in ("train", "export")] == [
        ("train", "sft"), ("export", "export"), ("train", "down")], runs["down"].stdout
    assert (root / "saves/sft_export/model.safetensors").is_file()
    verification = json.loads((root / "saves/sft_export/verification.json").read_text("utf-8"))
    assert verification["source"].endswith("saves/sft/adapter")
    assert _stages(runs["down again"]) == []
    # an edit upstream re-runs everything after it, and nothing before it
    assert [s for s in _stages(runs["down after an export edit"]) if s[0] in ("train", "export")] == [
        ("export", "export"), ("train", "down")]
    # the sft run, made already, is silent: it was "make[2]: Nothing to be done for 'train'." before down's own train
    assert "Nothing to be done" not in runs["down after an export edit"].stdout + runs["down after an export edit"].stderr


def test_two_recipes_sharing_an_export_dir_are_refused_with_one_message(tmp_path):
    root, venv = _repo(tmp_path)
    for name in ("a", "b"):
        write_recipe(root / "recipes" / f"{name}.yaml", {"model_name_or_path": "tiny", "template": "alpaca"},
                     adapter_name_or_path="saves/sft", export_dir="saves/merged")
    refused = make("export", "RECIPE=recipes/a.yaml", venv, cwd=root, env=cli_env(MAKEFLAGS="", MAKELEVEL=""),
                   expect=2)  # found before any stage: our message, make's stop line (test_make_bad_recipe.py)
    errors = refused_before_any_stage(refused)
    assert len(errors) == 1 and errors[0].startswith("error:"), refused.stderr
    assert "recipes/a.yaml:4:13: export_dir: saves/merged is also written by" in errors[0]
    assert "recipes/b.yaml has export_dir: saves/merged" in errors[0] and "export_dir: saves/a_export" in errors[0]
    assert not (root / "saves").exists()


def test_two_recipes_named_as_the_merge_recipe_writing_its_adapter_are_not_told_to_take_that_name(tmp_path):
    """LLaMA-Factory's layout with the training recipe also copied into recipes/ (the porting steps' step 2): the
    merge_lora recipe's adapter folder is written by two recipes both named as it is. The message told the user to
    "name it qwen3_lora_sft.yaml as this recipe is named (make then takes it)": both already were, and make took
    neither."""
    root, venv = _repo(tmp_path)
    for folder in ("examples/train_lora", "recipes"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        write_recipe(root / folder / "qwen3_lora_sft.yaml", model_name_or_path="tiny",
                     output_dir="saves/qwen3-4b/lora/sft")
    (root / "examples/merge_lora").mkdir()
    write_recipe(root / "examples/merge_lora/qwen3_lora_sft.yaml", {"model_name_or_path": "tiny",
                                                                    "template": "alpaca"},
                 adapter_name_or_path="saves/qwen3-4b/lora/sft", export_dir="saves/qwen3_lora_sft_export")
    refused = make("export", "RECIPE=examples/merge_lora/qwen3_lora_sft.yaml", venv, cwd=root,
                   env=cli_env(MAKEFLAGS="", MAKELEVEL=""), expect=2)
    [error] = refused_before_any_stage(refused)
    assert error.startswith("error: examples/merge_lora/qwen3_lora_sft.yaml:3:23: adapter_name_or_path: "
                            "saves/qwen3-4b/lora/sft is written by 2 recipes"), error
    assert "name it qwen3_lora_sft.yaml as this recipe is named" not in error
    assert error.endswith("or leave one of them named qwen3_lora_sft.yaml as this recipe is (make then takes it): 2 "
                          "are now (examples/train_lora/qwen3_lora_sft.yaml, recipes/qwen3_lora_sft.yaml), so rename "
                          "the other"), error
    assert not (root / "saves").exists()


def test_make_export_of_a_recipe_without_export_dir_refuses_before_training_its_upstream(tmp_path):
    """`make export` on a merge recipe that forgot export_dir trained the sft recipe it names first, then refused:
    minutes (or GPU hours) spent before a message that needed none of them."""
    root, venv = _repo(tmp_path)
    write_recipe(root / "recipes" / "sft.yaml", model_name_or_path="tiny", output_dir="saves/sft", max_steps=1)
    write_recipe(root / "recipes" / "export.yaml", {"model_name_or_path": "tiny", "template": "alpaca"},
                 adapter_name_or_path="saves/sft")
    refused = make("export", "RECIPE=recipes/export.yaml", venv, cwd=root, env=cli_env(MAKEFLAGS="", MAKELEVEL=""),
                   expect=2)
    assert "export needs export_dir" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert _stages(refused) == [("export", "export")] and not (root / "saves/sft").exists(), refused.stdout


def test_a_recipe_added_beside_this_one_becomes_its_upstream_and_an_unrelated_edit_changes_nothing(tmp_path):
    """deps.mk (which names the upstreams) was remade only when the recipe itself changed: a user whose first
    `make train RECIPE=recipes/down.yaml` stopped on "directory not found", who then wrote the recipe that trains that
    directory beside it, got the same stop again. A sibling edit that changes no upstream must not make this
    recipe's stages stale."""
    root, venv = _repo(tmp_path)
    write_recipe(root / "recipes" / "down.yaml", model_name_or_path="saves/up", output_dir="saves/down", max_steps=1)
    # stamps of the layout before (.stamps/<file name>/) are moved to the recipe's path, not left to retrain it
    (root / ".stamps/down").mkdir(parents=True)
    (root / ".stamps/down/deps.mk").write_text("RECIPE_FILES=./recipes/down.yaml\n")
    (root / ".stamps/down/train").touch()
    _make(root, "plan", "RECIPE=recipes/down.yaml", venv, expect=None)
    assert (root / ".stamps/recipes/down/train").is_file() and not (root / ".stamps/down").exists()
    deps = root / ".stamps/recipes/down/deps.mk"
    assert "UPSTREAMS=\n" in deps.read_text()
    write_recipe(root / "recipes" / "up.yaml", model_name_or_path="tiny", output_dir="saves/up", max_steps=1)
    _make(root, "plan", "RECIPE=recipes/down.yaml", venv, expect=None)
    assert "UPSTREAMS=recipes/up.yaml:train\n" in deps.read_text()
    before = deps.stat().st_mtime_ns
    write_recipe(root / "recipes" / "other.yaml", model_name_or_path="tiny", output_dir="saves/other", max_steps=1)
    _make(root, "plan", "RECIPE=recipes/down.yaml", venv, expect=None)
    assert deps.stat().st_mtime_ns == before


def _listing(root: Path) -> dict[str, int]:
    """Every path under the scratch repo but its venv, with its mtime: what a dry run must leave as it is."""
    return {str(p.relative_to(root)): p.lstat().st_mtime_ns for p in sorted(root.rglob("*"))
            if p.relative_to(root).parts[0] != "venv"}


def test_make_n_changes_nothing_on_disk_and_prints_the_chain(tmp_path):
    """`make -n` moved stamps of the layout before to the recipe's path, and wrote deps.mk, scope.mk and args.new for
    this recipe and its upstream (GNU make runs the rule remaking an included makefile under -n, and expands the
    recipes it prints). The real run still moves the stamps."""
    root, venv = _repo(tmp_path)
    write_recipe(root / "recipes" / "up.yaml", model_name_or_path="tiny", output_dir="saves/up", max_steps=1,
                 finetuning_type="full")
    write_recipe(root / "recipes" / "down.yaml", model_name_or_path="saves/up", output_dir="saves/down", max_steps=1)
    (root / ".stamps/down").mkdir(parents=True)
    (root / ".stamps/down/deps.mk").write_text("RECIPE_FILES=./recipes/down.yaml\n")
    (root / ".stamps/down/train").touch()
    before = _listing(root)
    dry = _make(root, "-n", "train", "RECIPE=recipes/down.yaml", venv)
    assert _listing(root) == before
    assert [s for s in _stages(dry) if s[0] == "train"] == [("train", "up"), ("train", "down")], dry.stdout
    _make(root, "plan", "RECIPE=recipes/down.yaml", venv, expect=None)
    assert (root / ".stamps/recipes/down/train").is_file() and not (root / ".stamps/down").exists()


def test_a_recipe_in_a_folder_created_after_the_last_make_is_seen_by_the_next(tmp_path):
    """deps ran again only when a recipe in a folder it had searched was added or edited: an upstream put in a new
    folder was seen at the next edit of some recipe, and make stopped on the missing model until then."""
    root, venv = _repo(tmp_path)
    write_recipe(root / "recipes" / "down.yaml", model_name_or_path="saves/up", output_dir="saves/down", max_steps=1)
    _make(root, "plan", "RECIPE=recipes/down.yaml", venv, expect=None)
    deps = root / ".stamps/recipes/down/deps.mk"
    assert "UPSTREAMS=\n" in deps.read_text()
    (root / "more/up").mkdir(parents=True)
    write_recipe(root / "more/up/up.yaml", model_name_or_path="tiny", output_dir="saves/up", max_steps=1,
                 finetuning_type="full")
    dry = _make(root, "-n", "train", "RECIPE=recipes/down.yaml", venv)
    assert ("train", "up") in _stages(dry), dry.stdout
    _make(root, "plan", "RECIPE=recipes/down.yaml", venv, expect=None)
    assert "UPSTREAMS=more/up/up.yaml:train\n" in deps.read_text()
