# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The SLA operator: block selection, the PyTorch reference, the Triton kernels, and the functional entry point."""

from .api import BACKEND_NAMES, resolve_backend, sparse_linear_attention
from .reference import sla_reference
from .selection import lut_to_block_map, num_kept_blocks, select_blocks

__all__ = [
    "BACKEND_NAMES",
    "lut_to_block_map",
    "num_kept_blocks",
    "resolve_backend",
    "select_blocks",
    "sla_reference",
    "sparse_linear_attention",
]
