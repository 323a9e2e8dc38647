"""A newcomer's first hour, followed literally: README.md, then docs/coming-from-llama-factory.md, each command typed
as the page shows it. What went wrong on that walk (2026-12-06) and is checked here, each as the user types it:

- the LLaMA-Factory page writes its verbs `python -m pipeline chat x.yaml`; typed with a Python that lacks the
  pipeline's packages (the system's: a user coming from LLaMA-Factory runs its CLI from wherever it is installed), it
  ended in a traceback about `tiktoken` or `yaml`. Now: one line naming the environment to use, exit 2.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.acceptance.harness import PYTHON, _run

DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.mark.parametrize("argv", [("chat", "x.yaml", "--prompt", "hi"),
                                  ("expand", "--model", "X", "--output-dir", "Y", "--num-expand", "2")],
                         ids=["chat", "expand"])
def test_python_without_the_packages_names_the_environment_to_run_in(tmp_path: Path, argv: tuple[str, ...]):
    """`python -m pipeline chat x.yaml` and `... expand` as the LLaMA-Factory page types them, run by a Python without
    the pipeline's packages: the test's own interpreter with -S (no site-packages, and sys.prefix is then the base
    installation's, as a system Python's). Before: a traceback ending `ModuleNotFoundError: No module named 'yaml'`
    (`'torch'` for expand), exit 1."""
    page = (DOCS / "coming-from-llama-factory.md").read_text(encoding="utf-8")
    assert f"`python -m pipeline {argv[0]} " in page
    done = _run([PYTHON, "-S", "-m", "pipeline", *argv], cwd=tmp_path, expect=2, timeout=60, env=None)
    assert "Traceback" not in done.stderr and done.stdout == "", done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: this Python (") and "has no module '" in line, line
    assert "`.venv/bin/python -m pipeline ...`" in line and "source .venv/bin/activate" in line, line
