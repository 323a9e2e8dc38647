"""One-line notices for recipe keys accepted from LLaMA-Factory that change nothing here.

The schema marks such keys with `x-no-effect: <why>`; a recipe that sets one gets one line per key on
stderr (from rank 0), so a ported recipe runs and its author knows which settings did nothing and why.
`trust_remote_code: true` gets its own line: accepted, and no remote code ever runs.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from pipeline.recipe import spec

TRUST_REMOTE_CODE = ("accepted; no remote code ever runs here: every supported model family is implemented in "
                     "this repository and weights are read from safetensors only")


def notices(r: Any) -> list[str]:
    """`where: key: accepted without effect: why` for every no-effect key the user set."""
    out = []
    for key, prop in spec.properties().items():
        origin = r.origin(key)
        if origin.kind not in ("file", "cli"):
            continue
        if "x-no-effect" in prop:
            out.append(f"notice: {origin.where}: {key}: accepted without effect: {prop['x-no-effect']}")
        elif key == "trust_remote_code" and r[key]:
            out.append(f"notice: {origin.where}: {key}: {TRUST_REMOTE_CODE}")
    return out


def print_notices(r: Any) -> None:
    if os.environ.get("RANK", "0") != "0":
        return
    for line in notices(r):
        print(line, file=sys.stderr)
