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
