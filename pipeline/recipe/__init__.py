"""Recipes: YAML with line numbers, extends, overrides, JSON Schema validation, resolution with provenance."""
from pipeline.recipe.resolve import Resolved, derive_steps, resolve, resolved_yaml

__all__ = ["Resolved", "derive_steps", "resolve", "resolved_yaml"]
