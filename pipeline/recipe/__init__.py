"""Recipes: YAML with line numbers, extends, overrides, JSON Schema validation, resolution with provenance."""
from pipeline.recipe.resolve import Resolved, derive_steps, resolve, resolved_yaml
from pipeline.recipe.steps import batches_per_step

__all__ = ["Resolved", "batches_per_step", "derive_steps", "resolve", "resolved_yaml"]
