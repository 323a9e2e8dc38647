"""The training tests' recipe fixtures (tests/train/conftest.py), for the ZeRO runs of tests/runtime/
test_zero_families.py; not their autouse launch_env, which that module imports for itself."""
from tests.train.conftest import make_recipe, workdir  # noqa: F401  (fixtures)
