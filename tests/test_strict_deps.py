"""CI=true turns a skipped import of a test dependency into a failure (tests/strict_deps.py); locally it skips."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FILES = {
    "test_module_level.py": "import pytest\nmod = pytest.importorskip('no_such_module_xyz')\ndef test_a(): pass\n",
    "test_in_a_test.py": "import pytest\ndef test_b():\n    pytest.importorskip('no_such_module_xyz')\n"
                         "def test_c(): pass\n",
}


@pytest.mark.parametrize("name", sorted(FILES))
@pytest.mark.parametrize("ci, codes", [("true", (1, 2)), ("", (0, 5))], ids=["ci", "local"])  # 5: all skipped
def test_a_missing_test_dependency_fails_only_in_ci(tmp_path: Path, name: str, ci: str, codes: tuple[int, ...]):
    (tmp_path / name).write_text(FILES[name])
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.strict_deps", "-q", "-p", "no:cacheprovider",
                           str(tmp_path / name)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode in codes, proc.stdout[-2000:]
    if ci:
        assert "a test dependency is missing, and CI=true does not skip it" in proc.stdout
    else:
        assert "skipped" in proc.stdout
