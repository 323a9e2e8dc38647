"""The Hugging Face command line that the docs, the example recipes and the error messages tell a user to type is
the one the pinned huggingface_hub installs.

huggingface_hub 1.0 replaced `huggingface-cli` with `hf` (`hf download`, `hf auth login`); the pin in
requirements.txt installs only `hf`, so a copied `huggingface-cli download ...` ended in "command not found".
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLACES = ("README.md", "INTERNALS.md", "docs", "pipeline", "recipes", "bench")


def _texts() -> list[Path]:
    files = []
    for place in PLACES:
        path = ROOT / place
        files += [path] if path.is_file() else [p for p in path.rglob("*") if p.suffix in (".md", ".py", ".yaml", ".sh")]
    return files


def test_the_installed_cli_is_hf_with_download_and_auth_login():
    hf = Path(sys.executable).parent / "hf"
    assert hf.is_file(), f"{hf}: the pinned huggingface_hub installs no `hf`; the docs' commands need revising"
    for command in (["download", "--help"], ["auth", "login", "--help"]):
        done = subprocess.run([str(hf), *command], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, (command, done.stderr)
    assert "--local-dir" in subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True,
                                           timeout=60).stdout


def test_nothing_names_the_removed_huggingface_cli():
    named = [str(p.relative_to(ROOT)) for p in _texts() if "huggingface-cli" in p.read_text(encoding="utf-8")]
    assert not named, f"{named} tell the user to run `huggingface-cli`, which the pinned huggingface_hub lacks: use `hf`"


def test_the_suggested_download_command_keeps_every_pattern(tmp_path):
    """The pipeline's `hf download ... --include` suggestion, run by the real hf offline: it must get as far as the
    download without hf dropping the patterns ("Ignoring `--include` since filenames have been explicitly set")."""
    import os

    from pipeline.model.hub import ALLOW_PATTERNS, download_command

    command = download_command("Org/Not-Cached")
    assert all(f"--include '{p}'" in command for p in ALLOW_PATTERNS), command
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60, env=env)
    assert "Ignoring `--include`" not in done.stderr, done.stderr
    assert "offline mode is enabled" in done.stderr, done.stderr  # it reached the download itself
