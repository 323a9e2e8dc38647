"""LLaMA-Factory keys whose feature is not here (QLoRA, GaLore, FP8, ...): refused once set, with the reason the
schema gives (x-refused-when-set in recipe.schema.json; adding a key there is all it takes). A refusal that needs
more than the schema's sentence lives with its theme: streaming in data.py, the exports in outputs.py,
model_revision in model.py.
"""
from __future__ import annotations

from pipeline.recipe import spec
from pipeline.recipe.check import show
from pipeline.recipe.rules.core import Context, rule


_REFUSED_WHEN_SET = tuple(key for key, prop in spec.properties().items() if "x-refused-when-set" in prop)


@rule(*_REFUSED_WHEN_SET)
def refused_when_set(ctx: Context) -> list[tuple[str, str]]:
    """LLaMA-Factory keys whose feature is not here (QLoRA, GaLore, PiSSA, FP8, ...): at their
    default (LLaMA-Factory's too) they pass; set, they are refused with the schema's reason, not "unknown key"."""
    props = spec.properties()
    return [(key, f"given {show(ctx.values[key])}: {props[key]['x-refused-when-set']}") for key in _REFUSED_WHEN_SET
            if ctx.values[key] != props[key]["default"]]


@rule("num_beams", "do_sample")
def beam_sampling(ctx: Context) -> list[tuple[str, str]]:
    """Beam search is greedy over beams here (transformers' do_sample=False); transformers' beam sampling (each
    step draws the beams' continuations) is not implemented, and a recipe asking for both gets told so, not
    silently one of them."""
    if ctx.values["num_beams"] > 1 and ctx.values["do_sample"]:
        return [("num_beams", f"given {ctx.values['num_beams']} with do_sample: true, and beam search with sampling "
                              "is not implemented; set do_sample: false for beam search, or num_beams: 1 to sample")]
    return []
