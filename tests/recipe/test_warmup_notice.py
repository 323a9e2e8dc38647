"""When the warmup wastes a run at learning rate 0 (recipe.steps.warmup_waste, the notice plan and train print).

Golden: transformers' own schedule, re-typed (transformers 5, optimization.py:74-77,
_get_constant_schedule_with_warmup_lr_lambda: s / max(1, W) below W, then 1; the linear one at :101-104 warms up the
same way): a run of T steps with W warmup steps wastes steps when no step reaches the full rate (every factor below 1: the warmup covers the run) or when the
warmup is one step (its only step at factor 0, with nothing ramped). A warmup of 2..T-1 steps is a ramp: quiet.
The CLI path is tests/acceptance/test_papercuts_merge_warmup.py.
"""
from __future__ import annotations

import pytest

from pipeline.recipe.steps import warmup_waste


def their_factors(total: int, warmup: int) -> list[float]:
    """transformers' _get_constant_schedule_with_warmup_lr_lambda at steps 0..total-1 (optimization.py:74-77)."""
    return [float(s) / float(max(1.0, warmup)) if s < warmup else 1.0 for s in range(total)]


@pytest.mark.parametrize("total", [1, 2, 3, 20])
@pytest.mark.parametrize("warmup", [0, 1, 2, 3, 25])
def test_waste_is_a_run_that_never_reaches_the_rate_or_a_one_step_warmup(total, warmup):
    factors = their_factors(total, warmup)
    wasted = warmup > 0 and (max(factors) < 1 or warmup == 1)
    assert (warmup_waste(total, warmup) is not None) == wasted, (total, warmup, factors)


def test_the_words_name_what_happens():
    assert warmup_waste(1, 1) == "the run's only step trains at lr 0, so the weights do not change"
    assert warmup_waste(3, 5) == ("warmup covers all 3 steps: step 1 trains at lr 0 and the learning rate never "
                                  "reaches learning_rate (the last step trains at 40% of it)")  # 2 / 5
    assert warmup_waste(20, 1) == "step 1 trains at lr 0 and the warmup is that one step, which trains nothing"
    assert warmup_waste(None, 1) is None  # steps not known yet (data not built): nothing to say


def test_the_notice_names_the_key_as_given(write, manifest):
    from pipeline.recipe import resolve
    from pipeline.recipe.notices import notices

    manifest("d", train=100)
    write("r.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 3\n")
    said = [n for n in notices(resolve("r.yaml", ["warmup_steps=5"], command="plan")) if "warmup" in n]
    assert said == ["notice: command line override warmup_steps=5: warmup_steps 5 of 3 steps: warmup covers all 3 "
                    "steps: step 1 trains at lr 0 and the learning rate never reaches learning_rate (the last step "
                    "trains at 40% of it) (a linear warmup starts at lr 0, as transformers' does); set warmup_steps: "
                    "0 or more steps"]
    quiet = notices(resolve("r.yaml", ["max_steps=100", "warmup_ratio=0.03"], command="plan"))  # 3 warmup steps
    assert not [n for n in quiet if "warmup" in n]
