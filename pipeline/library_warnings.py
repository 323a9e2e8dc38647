"""Library warnings the user cannot act on, hidden the one way INTERNALS.md ("Library warnings") allows.

A spec is warnings.filterwarnings's own fields (message regex, category, emitting-module regex), matched together,
so only that warning from that module is hidden and every other warning still shows. Nothing is hidden when the user
chose warning filters themselves (PYTHONWARNINGS or python -W: the `if not sys.warnoptions` rule of Python's warnings
documentation), so `PYTHONWARNINGS=default` shows it again. One helper, so every such filter (DeepSpeed's collectives
in pipeline.runtime.deepspeed_compat, torch DataLoader's worker count in pipeline.data.loaders) keeps that rule.
"""
from __future__ import annotations

import sys
import warnings

WarningSpec = tuple[str, type[Warning], str]  # (message regex, category, emitting-module regex)


def hide_library_warning(spec: WarningSpec) -> bool:
    """Hide the warning `spec` names; False, and nothing hidden, under the user's own PYTHONWARNINGS / -W."""
    if sys.warnoptions:
        return False
    message, category, module = spec
    warnings.filterwarnings("ignore", message=message, category=category, module=module)
    return True
