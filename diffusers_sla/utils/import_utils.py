# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Optional dependencies, probed once."""

from __future__ import annotations

import importlib
import importlib.util
import os

# A module-level answer rather than `functools.lru_cache`: torch.compile traces through a plain dict lookup, but
# warns on (and re-runs) a cached function.
_AVAILABLE: dict[str, bool] = {}


def is_triton_available() -> bool:
    found = _AVAILABLE.get("triton")
    if found is None:
        found = _AVAILABLE["triton"] = importlib.util.find_spec("triton") is not None
    return found


def triton_interpreting() -> bool:
    """Whether Triton runs its kernels in its CPU interpreter (`TRITON_INTERPRET=1`, chosen before Triton's import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_kernels_run_on(device) -> bool:
    """True where the Triton kernels can run: CUDA tensors with Triton installed, or any tensor under the Triton
    interpreter (used by CI to test the real kernels on the CPU)."""
    if not is_triton_available():
        return False
    return device.type == "cuda" or triton_interpreting()


_LOADED: dict[str, object] = {}


def load_on_first_use(path: str):
    """The module `path` names, or its attribute for "module:attribute", imported on first use, so that importing
    the package never needs what it needs (Triton). A dict lookup afterwards: torch.compile traces through it, where
    an import would break the graph."""
    found = _LOADED.get(path)
    if found is None:
        module_name, _, attribute = path.partition(":")
        found = importlib.import_module(module_name)
        found = _LOADED[path] = getattr(found, attribute) if attribute else found
    return found
