"""tests/tiers.py names tests that exist: a renamed or removed test would leave its entry matching nothing, and the
test it meant would silently move back into the everyday suite."""
from __future__ import annotations

import re

import pytest

from tests.tiers import LONG_TRIALS, is_long_trial

ENTRIES = [p for prefixes in LONG_TRIALS.values() for p in prefixes]


@pytest.mark.parametrize("entry", ENTRIES)
def test_each_long_trial_entry_names_a_test_that_exists(repo, entry):
    path, _, rest = entry.partition("::")
    assert (repo / path).is_file(), f"{entry}: no such file"
    name = re.split(r"[\[:]", rest)[0]
    if name:
        assert re.search(rf"^\s*def {re.escape(name)}\(", (repo / path).read_text(), re.M), f"{entry}: no such test"


def test_a_prefix_is_a_whole_node_id_part():
    assert is_long_trial("tests/train/test_multirank.py::test_x[a]")
    assert is_long_trial("tests/evaluate/test_eval_pipeline.py::test_eval_on_two_ranks_equals_one_rank[2]")
    assert not is_long_trial("tests/train/test_multirank_more.py::test_x")  # a file that only starts alike
    assert not is_long_trial("tests/evaluate/test_eval_pipeline.py::test_eval_on_one_rank")


class _Item:
    def __init__(self, nodeid: str, slow: bool = False) -> None:
        self.nodeid, self.keywords = nodeid, {"slow": True} if slow else {}


def test_a_files_expected_time_counts_the_tests_that_run_at_their_tiers_average():
    from tests.file_times import expected_seconds

    times = {"a.py": {"fast": [10.0, 5], "slow": [60.0, 2]}, "b.py": {"fast": [2.0, 2]}}
    items = [_Item("a.py::f1"), _Item("a.py::s1", slow=True), _Item("b.py::f"), _Item("c.py::new"),
             _Item("c.py::new_slow", slow=True)]
    # a: one fast test at 10/5 + one slow at 60/2; b: 2/2; c (no record): the average test of each tier over
    # every file, fast 12/7 and slow 60/2
    assert expected_seconds(items, times) == pytest.approx({"a.py": 2 + 30, "b.py": 1, "c.py": 12 / 7 + 30})


def test_recorded_times_merge_into_the_file_one_file_a_line(tmp_path, monkeypatch):
    from tests import file_times

    monkeypatch.setattr(file_times, "TIMES", tmp_path / "file_times.json")
    file_times.dump({"a.py": {"fast": [1.0, 1], "slow": [9.0, 1]}, "b.py": {"fast": [2.0, 2]}})
    recorder = file_times.Recorder()
    for when, duration in (("setup", 0.5), ("call", 3.0), ("teardown", 0.5)):
        recorder.pytest_runtest_logreport(_Report("a.py::t", when, duration))
    recorder.pytest_sessionfinish()
    assert file_times.load() == {"a.py": {"fast": [4.0, 1], "slow": [9.0, 1]}, "b.py": {"fast": [2.0, 2]}}
    assert (tmp_path / "file_times.json").read_text().splitlines()[1] == '"a.py": {"fast": [4.0, 1], "slow": [9.0, 1]},'


class _Report(_Item):
    def __init__(self, nodeid: str, when: str, duration: float) -> None:
        super().__init__(nodeid)
        self.when, self.duration = when, duration
