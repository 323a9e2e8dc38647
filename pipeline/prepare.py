"""The data stage's commands: `build` (`make data`) and `inspect` (`make inspect`).

Each turns the resolved recipe into DataArgs (pipeline.recipe.args.data_args) and hands it to the data
library, which never reads the string-keyed recipe itself (tests/test_recipe_access.py).
"""
from __future__ import annotations

import argparse
import sys

from pipeline.data.build import build as build_datasets
from pipeline.data.inspect import inspect as inspect_data
from pipeline.data.load import read_once
from pipeline.data.markup import built_markup_warnings
from pipeline.recipe import Resolved
from pipeline.recipe.args import data_args


def build(r: Resolved, args: argparse.Namespace | None = None) -> int:
    """Build every dataset the recipe names; print what was built, kept and removed."""
    for line in build_datasets(data_args(r)):
        print(line)
    return 0


def inspect(r: Resolved, args: argparse.Namespace | None = None) -> int:
    """Render --num samples with their trained tokens marked, and the token-length histogram; each built file is
    read once for all of it (read_once)."""
    data = data_args(r)
    with read_once():
        print(inspect_data(data, getattr(args, "num", 3) if args is not None else 3))
        for line in built_markup_warnings(data):  # after the samples, where the literal pieces show
            print(line, file=sys.stderr)
    return 0
