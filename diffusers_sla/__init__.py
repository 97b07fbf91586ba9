# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""diffusers-sla: Sparse-Linear Attention (arXiv 2509.24006) for Hugging Face Diffusers."""

__version__ = "0.1.0"

from .config import SLAConfig
from .layer import SparseLinearAttention, iter_sla_layers
from .ops import sparse_linear_attention

# The processor imports diffusers (and hooks its `set_processor`): loaded on first use, so `import diffusers_sla` stays
# light. Getting `SLAAttnProcessor` imports it, so the hook is always in place before the processor is set.
_PROCESSOR_EXPORTS = ("SLAAttnProcessor", "disable_sla", "enable_sla", "reset_sla_stats", "sla_summary")


def __getattr__(name):
    if name in _PROCESSOR_EXPORTS:
        from . import processor

        return getattr(processor, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SLAAttnProcessor",
    "SLAConfig",
    "SparseLinearAttention",
    "__version__",
    "disable_sla",
    "enable_sla",
    "iter_sla_layers",
    "reset_sla_stats",
    "sla_summary",
    "sparse_linear_attention",
]
