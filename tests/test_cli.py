"""The CLI: --help lists the commands, user mistakes exit 2 without a traceback, unbuilt commands say so."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pipeline.__main__ as cli

REPO = Path(__file__).resolve().parents[1]
GOOD = "model_name_or_path: tiny\ndataset: alpaca_demo\nmax_steps: 2\ncutoff_len: 64\n"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # no launcher variables: an in-process run elsewhere in this worker may still hold its MASTER_PORT
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


# The commands the user contract names (../shared/DESIGN.md, README): written here, not read from the code.
CONTRACT = ("build", "validate", "inspect", "plan", "train", "merge", "eval", "generate")


def test_help_lists_every_command_of_the_contract_and_each_one_exists(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    listed = {}
    section = proc.stdout.split("commands:\n", 1)[1].split("\n\n", 1)[0]
    for line in section.splitlines():
        name, _, help_ = line.strip().partition(" ")
        listed[name] = help_.strip()
    assert set(CONTRACT) <= set(listed), listed
    assert all(listed.values()), "a command without its one-line help"
    for name in listed:  # every listed command is a module that exists, not a promise
        module = {**cli.COMMANDS, **cli.TOOLS}[name][0]
        assert importlib.util.find_spec(module) is not None, (name, module)


def test_validate_good_recipe_on_built_data_exits_0(tmp_path):
    from tests.reliability.rel_helpers import make_project

    root = make_project(tmp_path / "proj")
    assert run_cli("build", "r.yaml", cwd=root).returncode == 0
    proc = run_cli("validate", "r.yaml", "lora_rank=4", cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith("recipe: OK (r.yaml; stage sft, lora, model tiny, dataset a)")
    assert "data: OK" in proc.stdout


def test_validate_before_the_build_says_to_build(tmp_path):
    from tests.reliability.rel_helpers import make_project

    root = make_project(tmp_path / "proj")
    proc = run_cli("validate", "r.yaml", cwd=root)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "dataset 'a' is not built; run `python -m pipeline build r.yaml`" \
        in proc.stderr  # the recipe as typed (no Makefile in this folder: no make form, pipeline.rerun)


def test_user_error_exit_2_no_traceback(tmp_path):
    (tmp_path / "r.yaml").write_text(GOOD + "lora_rnak: 4\n")
    proc = run_cli("plan", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "error: r.yaml:5:1: lora_rnak: unknown key (did you mean 'lora_rank'?)\n"


def test_missing_recipe_exit_2(tmp_path):
    proc = run_cli("plan", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: nope.yaml: recipe not found")
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "a.yaml").write_text("stage: sft\n")
    proc = run_cli("validate", "recipes", cwd=tmp_path)  # the folder, not a recipe in it
    assert proc.returncode == 2 and proc.stderr == ("error: recipes: is a directory, not a recipe file; give one of "
                                                    "its recipes, e.g. recipes/a.yaml (1 there)\n")


def test_unknown_command_is_one_line_with_the_closest_command(tmp_path):
    proc = run_cli("trian", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == ("python -m pipeline: error: argument command: invalid choice: "
                                                    "'trian' (did you mean 'train'?)\n"), proc.stderr


def test_every_command_module_exists():
    import importlib.util

    for name, (module_name, _, _) in cli.COMMANDS.items():
        assert importlib.util.find_spec(module_name) is not None, f"{name}: {module_name} does not exist"
def test_plan_prints_each_value_with_its_source(tmp_path):
    (tmp_path / "r.yaml").write_text(GOOD)
    proc = run_cli("plan", "r.yaml", "learning_rate=5e-5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line.strip()}
    assert rows["model_name_or_path"] == ['"tiny"', "r.yaml:1"]  # from the file, with its line
    assert rows["max_steps"] == ["2", "r.yaml:3"]
    assert rows["learning_rate"] == ["5e-05", "cli"]  # the override wins and says so
    assert rows["lora_rank"] == ["8", "default"]


def test_deps_prints_what_make_reads(tmp_path):
    (tmp_path / "r.yaml").write_text(GOOD)
    proc = run_cli("deps", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    values = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert values["RECIPE_FILES"] == "r.yaml" and values["OUTPUT_DIR"] == "saves/r"
    assert values["DATASETS"] == "alpaca_demo" and values["STAGE"] == "sft"


def test_deepspeed_launcher_local_rank_argument_is_accepted(tmp_path):
    # `deepspeed --module pipeline ...` runs `python -m pipeline --local_rank=N <command> ...`
    (tmp_path / "r.yaml").write_text(GOOD)
    proc = run_cli("--local_rank=0", "deps", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("RECIPE_FILES=r.yaml\n")


def test_a_misspelt_recipe_path_gets_its_closest_sibling(tmp_path):
    """`validate recipes/demo_sf.yaml` said only "recipe not found"; the closest recipe beside it is suggested."""
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "demo_sft.yaml").write_text(GOOD)
    proc = run_cli("validate", "recipes/demo_sf.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr == (
        f"error: recipes/demo_sf.yaml: recipe not found (looked in {tmp_path / 'recipes' / 'demo_sf.yaml'}) "
        "(did you mean 'recipes/demo_sft.yaml'?)\n")


def test_an_option_of_another_command_is_refused(tmp_path):
    """`validate r.yaml --num 3` ran validate and ignored --num without a word; the message names the command with
    the user's recipe, overrides and value (it said `make inspect NUM=5`: the Makefile's default recipe). Here, with
    no Makefile, the python -m form alone (the make form: test_make_variables)."""
    proc = run_cli("validate", "r.yaml", "seed=7", "--num", "3", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.endswith(
        "error: --num is an option of `inspect`, not of `validate`: run `python -m pipeline inspect r.yaml seed=7 --num"
        " 3`\n"), proc.stderr
    proc = run_cli("train", "r.yaml", "--prompt=hi there", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.endswith("error: --prompt is an option of `generate`, not of `train`:"
                                                         " run `python -m pipeline generate r.yaml --prompt 'hi there'`\n")
    proc = run_cli("chat", "r.yaml", "--prompt", "hi", cwd=tmp_path)  # LLaMA-Factory's name for generate
    assert "is an option of" not in proc.stderr and "r.yaml: recipe not found" in proc.stderr
