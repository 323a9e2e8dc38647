"""`validate`: the recipe (already checked by resolve) and the built data, as one report. Never imports torch."""
from __future__ import annotations

import argparse

from pipeline.data.check import check_built, format_summary
from pipeline.recipe import Resolved
from pipeline.recipe.args import data_args


def run(r: Resolved, args: argparse.Namespace | None = None) -> int:
    files = ", ".join(r.files)
    print(f"recipe: OK ({files}; stage {r['stage']}, {r['finetuning_type']}, model {r['model_name_or_path']}, "
          f"dataset {', '.join(r['dataset'])})")
    rows = check_built(data_args(r))  # raises UserError listing every bad row
    print("data: OK")
    print(format_summary(rows))
    if rows and all(row["tokens_min"] is None for row in rows):
        print(f"note: token lengths need the tokenizer of {r['model_name_or_path']}, which is not on this machine yet "
              "(a hub id is downloaded by train, or beforehand with `hf download`)")
    return 0
