# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""diffusers-sla: Sparse-Linear Attention (arXiv 2509.24006) for Hugging Face Diffusers."""

__version__ = "0.1.0"

from .config import SLAConfig
from .layer import SparseLinearAttention, iter_sla_layers
from .ops import sparse_linear_attention

__all__ = ["SLAConfig", "SparseLinearAttention", "__version__", "iter_sla_layers", "sparse_linear_attention"]
