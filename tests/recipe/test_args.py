"""Typed argument groups built from a recipe (pipeline/recipe/args.py)."""
from __future__ import annotations

from pipeline.recipe import spec
from pipeline.recipe.args import GenerationArgs


def test_missing_keys_take_the_schema_defaults():
    gen = GenerationArgs.from_recipe({})
    defaults = spec.defaults()
    for key in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed"):
        assert getattr(gen, key) == defaults[key], key
    assert gen.stop_strings == ()


def test_settings_name_sampling_keys_only_when_sampling():
    greedy = GenerationArgs.from_recipe({"max_new_tokens": 4, "stop_strings": ["###", "\n", "###"]})
    assert greedy.settings() == {"do_sample": False, "max_new_tokens": 4, "stop_strings": ["###", "\n"]}
    sampled = GenerationArgs.from_recipe({"do_sample": True, "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3})
    assert sampled.settings() == {"do_sample": True, "max_new_tokens": spec.defaults()["max_new_tokens"],
                                  "temperature": 0.7, "top_k": 5, "top_p": 0.9, "seed": 3}
    assert sampled.generate_kwargs()["stop_strings"] is None and greedy.generate_kwargs()["stop_strings"] == ["###", "\n"]


def test_every_group_field_is_a_schema_key():
    """A group's field is named as its recipe key, so the schema alone gives its type, default and documentation:
    a misspelt field would need a default of its own and fails here instead."""
    import dataclasses

    from pipeline.data.args import NOT_A_KEY, DataArgs
    from pipeline.model.build import FinetuneArgs, ModelArgs
    from pipeline.recipe.args import EvalArgs, ExportArgs, PreferenceArgs, TrainArgs
    from pipeline.recipe.check import DERIVED_KEYS

    keys = set(spec.schema()["properties"]) | set(DERIVED_KEYS)  # derived: resolve computes them
    groups = (ModelArgs, FinetuneArgs, GenerationArgs, DataArgs, TrainArgs, EvalArgs, PreferenceArgs,
              ExportArgs)
    bad = [f"{group.__name__}.{f.name}" for group in groups
           for f in dataclasses.fields(group) if f.name not in keys and not f.metadata.get(NOT_A_KEY)]
    assert not bad, f"not schema keys: {bad}"


def test_data_args_fill_from_the_schema_and_keep_provenance():
    from pipeline.recipe.args import data_args

    data = data_args({"cutoff_len": 77})
    defaults = spec.defaults()
    assert data.cutoff_len == 77 and data.template == defaults["template"] and data.seed == defaults["seed"]
    assert data.names("dataset") == "dataset"  # a plain dict: no provenance, the key as recipe.args.key_at names it


def test_the_loss_config_defaults_are_the_schema_defaults():
    """pipeline.model.preference.PrefConfig keeps defaults for direct use in tests of the losses; they must be
    the recipe's."""
    from pipeline.model.preference import PrefConfig
    from pipeline.recipe.args import preference_args

    assert preference_args({}).loss_config() == PrefConfig()
