"""The CLI: --help lists the commands, user mistakes exit 2 without a traceback, unbuilt commands say so."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.__main__ as cli

REPO = Path(__file__).resolve().parents[1]
GOOD = "model_name_or_path: tiny\ndataset: alpaca_demo\nmax_steps: 2\ncutoff_len: 64\n"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=60)


def test_help_lists_every_command_with_one_line(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for name, (_, _, help_) in cli.COMMANDS.items():
        assert f"  {name:<9} {help_}" in proc.stdout
    for command in ("build", "validate", "inspect", "plan", "train", "merge", "eval", "generate"):
        assert command in cli.COMMANDS


def test_validate_good_recipe_exits_0(tmp_path):
    (tmp_path / "r.yaml").write_text(GOOD)
    proc = run_cli("validate", "r.yaml", "lora_rank=4", cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith("recipe: OK (r.yaml; stage sft, lora, model tiny, dataset alpaca_demo)")
    # until the data is built the data check (once it exists) reports a user error, never a crash
    assert proc.returncode in (0, 2)


def test_user_error_exit_2_no_traceback(tmp_path):
    (tmp_path / "r.yaml").write_text(GOOD + "lora_rnak: 4\n")
    proc = run_cli("plan", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == "error: r.yaml:5:1: lora_rnak: unknown key (did you mean 'lora_rank'?)\n"


def test_missing_recipe_exit_2(tmp_path):
    proc = run_cli("plan", "nope.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith("error: nope.yaml: recipe not found")


def test_unknown_command_is_an_argparse_error(tmp_path):
    proc = run_cli("trian", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "invalid choice: 'trian'" in proc.stderr


def test_every_command_module_exists():
    import importlib.util

    for name, (module_name, _, _) in cli.COMMANDS.items():
        assert importlib.util.find_spec(module_name) is not None, f"{name}: {module_name} does not exist"
@pytest.mark.parametrize("name", ["plan", "deps"])
def test_plan_and_deps_print_to_stdout(tmp_path, name):
    (tmp_path / "r.yaml").write_text(GOOD)
    proc = run_cli(name, "r.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_deepspeed_launcher_local_rank_argument_is_accepted(tmp_path):
    # `deepspeed --module pipeline ...` runs `python -m pipeline --local_rank=N <command> ...`
    (tmp_path / "r.yaml").write_text(GOOD)
    proc = run_cli("--local_rank=0", "deps", "r.yaml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("RECIPE_FILES=r.yaml\n")
