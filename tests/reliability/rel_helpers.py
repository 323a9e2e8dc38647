"""Shared pieces of the reliability suite: a tiny project in a folder, the CLI in-process or as a subprocess,
and a snapshot of a folder tree so that "nothing was written" is checked byte for byte."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
DEEPSPEED = str(Path(sys.executable).with_name("deepspeed"))

# A valid recipe of 7 lines: text appended to it starts on line 8.
BASE = ("model_name_or_path: tiny\ndataset: a\ndataset_dir: data\nmax_steps: 2\ncutoff_len: 64\nval_size: 0.1\n"
        "output_dir: out\n")
WORDS = ("red green blue apple river stone cloud seven little happy bright night morning garden window paper "
         "music light water small").split()


def rows(n: int = 20) -> list[dict[str, str]]:
    return [{"instruction": f"Repeat: {WORDS[i % 20]} {WORDS[(3 * i) % 20]}", "input": "",
             "output": f"{WORDS[i % 20]} {WORDS[(3 * i) % 20]} ({i})"} for i in range(n)]


def jsonl(records: Iterable[Any]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def make_project(root: Path, recipe: str = BASE, n_rows: int = 20) -> Path:
    """root/r.yaml + root/data/{dataset_info.json, raw/a.jsonl}: a project that builds, validates and trains."""
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (root / "data" / "raw" / "a.jsonl").write_text(jsonl(rows(n_rows)), encoding="utf-8")
    (root / "data" / "dataset_info.json").write_text(json.dumps({"a": {"file_name": "raw/a.jsonl"}}, indent=2),
                                                     encoding="utf-8")
    (root / "r.yaml").write_text(recipe, encoding="utf-8")
    return root


def write(root: Path, name: str, content: str | bytes | dict | list) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, (dict, list)):
        path.write_text(json.dumps(content, indent=2), encoding="utf-8")
    else:
        path.write_text(content, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- snapshots

def snapshot(root: Path) -> dict[str, str]:
    """relative path -> 'dir' or the sha256 of the file; __pycache__ ignored. Equal snapshots: nothing changed,
    nothing was added (no temp file, no half-written output) and nothing was removed."""
    out: dict[str, str] = {}
    for path in sorted(Path(root).rglob("*")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts:
            continue
        if path.is_symlink():
            out[str(rel)] = "link:" + os.readlink(path)
        elif path.is_dir():
            out[str(rel)] = "dir"
        else:
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def data_snapshot(root: Path) -> dict[str, str]:
    """snapshot of a data folder without the step counts kept beside its builds (pipeline.data.counts): a cache whose
    file names hold the built files' inode and mtime, which differ between two folders of the same data."""
    from pipeline.data.kept import FOLDER

    return {rel: value for rel, value in snapshot(root).items() if FOLDER not in Path(rel).parts[2:3]}


def diff(before: dict[str, str], after: dict[str, str]) -> list[str]:
    changes = [f"+ {k}" for k in after if k not in before] + [f"- {k}" for k in before if k not in after]
    return changes + [f"~ {k}" for k in before if k in after and before[k] != after[k]]


# ---------------------------------------------------------------------------------------------- running

ERROR_PREFIXES = ("error: ", "python -m pipeline: error: ")  # ours, and argparse's for command-line mistakes


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def errors(self) -> list[str]:
        return [line.split("error: ", 1)[1] for line in self.err.splitlines() if line.startswith(ERROR_PREFIXES)]


@contextlib.contextmanager
def process_state(argv: list[str], cwd: Path, env: dict[str, str] | None) -> Iterator[None]:
    """The process-wide state a command line starts from, put back afterwards: cwd, sys.argv, os.environ (`env`
    for the call's duration; None: left as it is), warnings filters, the root logger's handlers and level.

    Why: a pytest-xdist worker runs many files one after another; a command run in-process must not leave a
    chdir, an environment variable or a warnings filter behind for the next test (and must not see a launcher
    variable an in-process training test left in this worker, which a user's shell would not have)."""
    import logging
    import warnings

    root = logging.getLogger()
    saved = (os.getcwd(), sys.argv, dict(os.environ), root.handlers[:], root.level)
    try:
        with warnings.catch_warnings():
            os.chdir(cwd)
            sys.argv = [str(REPO / "pipeline" / "__main__.py"), *argv]
            if env is not None:
                os.environ.clear()
                os.environ.update(env)
            yield
    finally:
        cwd_before, sys.argv, env_before, root.handlers[:], level = saved
        root.setLevel(level)
        os.chdir(cwd_before)
        if env is not None:
            os.environ.clear()
            os.environ.update(env_before)


def run_main(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> Result:
    """`python -m pipeline ...` in this process (no interpreter start-up): stdout/stderr captured; the process
    state it ran in is put back afterwards (process_state; `env`: the environment it runs in, None: this one)."""
    from pipeline.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with process_state(argv, cwd, env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code if isinstance(exc.code, int) else 1
    return Result(int(code), out.getvalue(), err.getvalue())


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no launcher variables left over from other tests."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    # CPU pinned (DeepSpeed's accelerator too): the trials compare weights bitwise with a CPU reference
    env.update(PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", **extra)
    return env


def run_cli(argv: list[str], cwd: Path, timeout: float = 300, **env: str) -> Result:
    """`python -m pipeline ...` as a user runs it: a fresh interpreter."""
    proc = subprocess.run([PYTHON, "-m", "pipeline", *argv], cwd=cwd, env=clean_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_user_error(result: Result, *fragments: str, strict_lines: bool = True, max_line: int = 1500,
                      kind: str = "bad input") -> None:
    """Exit 2, no traceback, an `error:` line holding every fragment, no line flooding the terminal.

    strict_lines: every stderr line is an error line (commands that print nothing else on failure)."""
    assert result.code == 2, f"exit {result.code}\n{result.err[-3000:]}"
    assert "Traceback" not in result.err, result.err[-3000:]
    errors = result.errors
    assert errors, result.err[-3000:]
    if strict_lines:
        assert all(line.startswith((*ERROR_PREFIXES, "usage: ", "  ")) or not line.strip()
                   for line in result.err.splitlines()), result.err[-3000:]
    assert all(len(line) <= max_line for line in result.err.splitlines()), "a message floods the terminal"
    joined = "\n".join(errors)
    missing = [f for f in fragments if f not in joined]
    assert not missing, f"missing {missing} in:\n{joined[:3000]}"
    from tests.reliability import figures

    figures.record(kind)  # docs/guarantees.md's figures
