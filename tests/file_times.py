"""How long each test file takes, per tier, and the files handed out to the workers longest first.

Why: `make test` runs two pytest-xdist workers that take one whole file at a time (--dist loadfile, so a file's
module fixtures are made once). The run ends when its last file does: a three-minute file handed out last keeps one
core busy alone for three minutes while the other waits. Handing the files out longest first (the LPT rule) ends
both workers within about the shortest file of each other. The lengths come from a recorded run
(tests/file_times.json, written by `make test PYTEST_ARGS=--record-file-times`, merged into what is there); a file
missing from it counts as the average file. Stale numbers only change the order, never what runs.

The tiers are the pyproject.toml markers: a test marked `slow` is a long trial (`make test-slow`), any other is in
the everyday suite (`make test`); a file's time is kept for each tier, since most files hold tests of both.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

TIMES = Path(__file__).resolve().parent / "file_times.json"
TIERS = ("fast", "slow")


def tier(item_or_report: pytest.Item | pytest.TestReport) -> str:
    """The tier of a test: `slow` where the slow marker applies (on the test, its class, module or parameter)."""
    return "slow" if "slow" in item_or_report.keywords else "fast"


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-file-times", action="store_true",
                     help=f"write each file's time per tier into {TIMES.name} (merged with what is there)")


def load() -> dict[str, dict[str, list[float]]]:
    """{file: {tier: [seconds, tests]}}; an unreadable file is no data (the order falls back to collection order)."""
    try:
        data = json.loads(TIMES.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def dump(times: dict[str, dict[str, list[float]]]) -> None:
    """One file a line, sorted: a re-recording shows in a diff as the lines of the files whose times moved."""
    lines = [f"{json.dumps(path)}: {json.dumps(per_tier, sort_keys=True)}" for path, per_tier in sorted(times.items())]
    TIMES.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def expected_seconds(items: list[pytest.Item], times: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Each file's expected time in this run: its selected tests, each at its file's recorded average for its tier
    (a file or tier with no record: the average test of that tier over every recorded file)."""
    totals = {t: [0.0, 0] for t in TIERS}
    for per_tier in times.values():
        for t, (seconds, count) in per_tier.items():
            if t in totals:
                totals[t][0] += seconds
                totals[t][1] += count
    default = {t: (s / n if n else 1.0) for t, (s, n) in totals.items()}
    expected: dict[str, float] = defaultdict(float)
    for item in items:
        path, t = file_of(item.nodeid), tier(item)
        seconds, count = times.get(path, {}).get(t, (0.0, 0))
        expected[path] += seconds / count if count else default[t]
    return expected


@pytest.hookimpl(trylast=True)  # after `-m` deselected: the order is for the tests that run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist, the files longest first; within a file the order stays as written. Every worker computes
    the same order from the same data (xdist requires it). A plain `pytest` run keeps pytest's order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    expected = expected_seconds(items, load())
    first_seen: dict[str, int] = {}
    for i, item in enumerate(items):
        first_seen.setdefault(file_of(item.nodeid), i)
    items.sort(key=lambda item: (-expected[p := file_of(item.nodeid)], first_seen[p]))


class Recorder:
    """Sums each test's setup + call + teardown time per file and tier, in the process that sees every report
    (xdist's controller, or the only process)."""

    def __init__(self) -> None:
        self.seconds: dict[str, dict[str, list[float]]] = defaultdict(lambda: {t: [0.0, 0] for t in TIERS})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        entry = self.seconds[file_of(report.nodeid)][tier(report)]
        entry[0] += report.duration
        entry[1] += report.when == "call"

    def pytest_sessionfinish(self) -> None:
        times = load()
        for path, per_tier in self.seconds.items():
            recorded = times.setdefault(path, {})
            for t, (seconds, count) in per_tier.items():
                if count:
                    recorded[t] = [round(seconds, 1), count]
        dump(times)


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("record_file_times") and not hasattr(config, "workerinput"):
        config.pluginmanager.register(Recorder(), "file-times-recorder")
