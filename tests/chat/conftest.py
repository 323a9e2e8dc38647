"""The generate command reuses the model tests' checkpoints written by transformers."""
from tests.model.conftest import hf_dir  # noqa: F401  (a fixture)
