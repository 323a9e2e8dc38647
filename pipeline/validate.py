"""`validate`: the recipe (already checked by resolve) and the built data, as one report. Never imports torch."""
from __future__ import annotations

import argparse

from pipeline.recipe import Resolved
from pipeline.recipe.text import format_table


def run(r: Resolved, args: argparse.Namespace | None = None) -> int:
    files = ", ".join(r.files)
    print(f"recipe: OK ({files}; stage {r['stage']}, {r['finetuning_type']}, model {r['model_name_or_path']}, "
          f"dataset {', '.join(r['dataset'])})")
    try:
        from pipeline.data.check import check_built
    except ModuleNotFoundError as err:
        if err.name not in ("pipeline.data.check", "pipeline.data"):
            raise
        print("data: the data check is not available yet (pipeline.data.check is not built); only the recipe "
              "was validated")
        return 0
    rows = check_built(r)  # raises UserError listing every bad row
    print("data: OK")
    try:
        from pipeline.data.check import format_summary
    except ImportError:
        format_summary = format_table
    print(format_summary(rows))
    return 0
