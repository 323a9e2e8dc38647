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
