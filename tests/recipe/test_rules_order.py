"""The rules run in the order pipeline.recipe.rules.ORDER gives; a rule declared but not listed there (it would
never run) stops the import instead."""
from __future__ import annotations

import re

import pytest

from pipeline.recipe import rules
from pipeline.recipe.rules import core


def test_every_declared_rule_runs_once_in_the_listed_order():
    assert [r.func for r in rules.RULES] == list(rules.ORDER)
    assert len({r.func.__module__ for r in rules.RULES}) > 5  # declared across the theme modules


def test_a_rule_left_out_of_the_order_is_refused(monkeypatch):
    monkeypatch.setattr(core, "_DECLARED", {})

    @core.rule("fp16")
    def listed(ctx):
        return []

    @core.rule("bf16")
    def forgotten(ctx):
        return []

    assert [r.keys for r in core.in_order([forgotten, listed])] == [("bf16",), ("fp16",)]
    with pytest.raises(RuntimeError, match=re.escape(f"left out ['{forgotten.__module__}.forgotten']")):
        core.in_order([listed])
    with pytest.raises(RuntimeError, match=r"listed twice \['listed'\]"):
        core.in_order([listed, forgotten, listed])
