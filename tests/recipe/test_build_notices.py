"""build says the recipe's notices where no later stage of the same make does: typed alone or `make data`
(LLaMA-Factory's preprocessing recipes are run for their data only; tests/compat/test_lf_examples.py's preprocess
test types it), not under a make goal whose validate / inspect says them (the Makefile's PIPELINE_BEFORE_VALIDATE;
tests/acceptance/test_papercuts_h194.py counts them over `make all`)."""
from __future__ import annotations

from pipeline.recipe.notices import BEFORE_VALIDATE, says_recipe_notices


def test_build_says_them_unless_a_validate_follows_in_make(monkeypatch):
    recipe = {"task": None}
    monkeypatch.delenv(BEFORE_VALIDATE, raising=False)
    assert says_recipe_notices(recipe, "build")  # typed alone
    monkeypatch.setenv(BEFORE_VALIDATE, "")  # `make data`: the Makefile exports it empty
    assert says_recipe_notices(recipe, "build")
    monkeypatch.setenv(BEFORE_VALIDATE, "1")  # `make all`, `make train`, ...: validate says them
    assert not says_recipe_notices(recipe, "build")
