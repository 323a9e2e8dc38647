"""tests.ports.run_to_end, the multi-rank launches' guard against a hang: a job past its timeout ends as a failure
that holds what every process of it wrote, each Python process's stack included, and leaves none running
(subprocess.run's own timeout kills only the top process and raises TimeoutExpired without the output: measured
with HUNG, its child kept running)."""
from __future__ import annotations

import contextlib
import re
import sys

import psutil

from tests.ports import run_to_end

# a parent and the child it started, both asleep once the child has said so (what a launcher and a hung rank look like)
CHILD = "import sys, time; print('up', flush=True); time.sleep(600)"
HUNG = ("import subprocess, sys, time; "
        f"child = subprocess.Popen([sys.executable, '-c', {CHILD!r}], stdout=subprocess.PIPE, text=True); "
        "print('child', child.pid, child.stdout.readline().strip(), file=sys.stderr, flush=True); time.sleep(600)")


def test_a_job_past_its_timeout_is_killed_whole_with_every_stack():
    proc = run_to_end([sys.executable, "-c", HUNG], timeout=3)
    assert proc.returncode < 0, proc
    child = re.search(r"child (\d+) up", proc.stderr)  # the job's output up to the timeout
    assert child, proc.stderr
    with contextlib.suppress(psutil.NoSuchProcess):  # gone, or only waiting to be reaped
        assert psutil.Process(int(child[1])).status() == psutil.STATUS_ZOMBIE
    assert proc.stderr.count("Fatal Python error") == 2, proc.stderr  # faulthandler: both processes' stacks (their
    # writes may interleave: "Fatal Python error: Fatal Python error: Aborted" was seen on a loaded machine)
    assert proc.stderr.rstrip().endswith("timed out after 3 s; every process of the job was killed]")


def test_a_job_that_ends_is_subprocess_runs_result():
    proc = run_to_end([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"],
                      timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "out\n", "err\n")


# the same, the child in a session of its own, as pipeline.launch starts DeepSpeed's runner (make train NPROC=2)
ESCAPED = HUNG.replace("stdout=subprocess.PIPE, text=True)", "stdout=subprocess.PIPE, text=True, start_new_session=True)")


def test_a_job_whose_launcher_starts_its_own_session_is_killed_whole():
    """A signal to the job's session alone misses a child that left it; that child, alive, also holds the job's
    stderr open, so the job never ends: every process below the launcher is signalled too."""
    assert ESCAPED != HUNG
    proc = run_to_end([sys.executable, "-c", ESCAPED], timeout=3)
    child = re.search(r"child (\d+) up", proc.stderr)
    assert child, proc.stderr
    with contextlib.suppress(psutil.NoSuchProcess):
        assert psutil.Process(int(child[1])).status() == psutil.STATUS_ZOMBIE
    assert proc.stderr.count("Fatal Python error") == 2, proc.stderr
