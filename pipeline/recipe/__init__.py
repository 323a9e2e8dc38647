"""Recipes: YAML with line numbers, extends, overrides, JSON Schema validation, resolution with provenance."""
from pipeline.recipe.resolve import Resolved, batches_per_step, derive_steps, resolve, resolved_yaml

__all__ = ["Resolved", "batches_per_step", "derive_steps", "resolve", "resolved_yaml"]
