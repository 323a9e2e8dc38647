"""In CI (CI=true) a missing optional test dependency fails the suite instead of skipping.

`pytest.importorskip("transformers")` is right on a laptop without the test extras, but in CI a skip there
silently drops every golden-value comparison of that file: the run goes green having checked much less.
This plugin turns such skips (at collection, module level, or inside a test) into failures when CI is set.
"""
from __future__ import annotations

import os

import pytest

MARK = "could not import"  # pytest.importorskip's skip reason


def _strict() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _missing_dependency(report: pytest.CollectReport | pytest.TestReport) -> bool:
    return bool(report.skipped) and MARK in str(report.longrepr)


def _fail(report: pytest.CollectReport | pytest.TestReport) -> None:
    reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
    report.outcome = "failed"
    report.longrepr = f"{reason} -- a test dependency is missing, and CI=true does not skip it: " \
                      "pip install -r requirements-test.txt"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    outcome = yield
    report = outcome.get_result()
    if _strict() and _missing_dependency(report):
        _fail(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if _strict() and _missing_dependency(report):
        _fail(report)
