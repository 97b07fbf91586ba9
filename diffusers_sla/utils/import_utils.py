# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Optional dependencies, probed once."""

from __future__ import annotations

import functools
import importlib.util


@functools.lru_cache(maxsize=None)
def is_triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None
