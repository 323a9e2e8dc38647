"""`python -m bench.child module:function ARGS_JSON OUT_JSON`: one measurement in a fresh process.

A fresh process per contender keeps peak RSS (ru_maxrss) and import costs its own. The function returns
a dict; its peak RSS is added unless it recorded one itself (e.g. before an extra profiling step).
"""
from __future__ import annotations

import importlib
import json
import sys

from bench.common import peak_rss_mb
from pipeline.io import write_json


def main(argv: list[str]) -> int:
    target, args, out = argv
    module, _, function = target.partition(":")
    result = getattr(importlib.import_module(module), function)(**json.loads(args))
    result.setdefault("peak_rss_mb", peak_rss_mb())
    write_json(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
