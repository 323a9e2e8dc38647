"""The schema's allowed values and the code's lists of what it implements are the same sets.

The schema (pipeline/recipe/schema/recipe.schema.json) is what users are told and what validation accepts;
each list below is what the code can actually do. A value added to one side only fails here, not in a run.
"""
from __future__ import annotations

import pytest

from pipeline.recipe import spec


def _enum(key: str) -> set:
    return {v for v in spec.properties()[key]["enum"] if v is not None}


def _templates():
    from pipeline.data.templates import BENCHMARK_TEMPLATES, TEMPLATES

    return {**TEMPLATES, **BENCHMARK_TEMPLATES}


def _schedules():
    from pipeline.train.schedule import SCHEDULES

    return SCHEDULES


def _policies():
    from pipeline.data.tokenize import POLICIES

    return POLICIES


def _dtypes():
    from pipeline.model.weights import DTYPES

    return DTYPES


@pytest.mark.parametrize("key, code", [("template", _templates), ("lr_scheduler_type", _schedules),
                                       ("overlength_policy", _policies), ("export_dtype", _dtypes)])
def test_schema_enum_equals_the_code_list(key, code):
    assert _enum(key) == set(code()), f"{key}: the schema's enum and the code's list differ"


def test_lora_alpha_default_is_the_one_the_schema_states():
    from pipeline.model.config import default_lora_alpha

    assert "2 x lora_rank" in spec.properties()["lora_alpha"]["description"] and default_lora_alpha(8) == 16


def test_split_names():
    from pipeline.names import split_names

    assert split_names("a, b,,c ") == ["a", "b", "c"] and split_names([" a", ""]) == ["a"] and split_names(None) == []
