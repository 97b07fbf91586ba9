# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Optional dependencies, probed once."""

from __future__ import annotations

import importlib.util

# A module-level answer rather than `functools.lru_cache`: torch.compile traces through a plain dict lookup, but
# warns on (and re-runs) a cached function.
_AVAILABLE: dict[str, bool] = {}


def is_triton_available() -> bool:
    found = _AVAILABLE.get("triton")
    if found is None:
        found = _AVAILABLE["triton"] = importlib.util.find_spec("triton") is not None
    return found
