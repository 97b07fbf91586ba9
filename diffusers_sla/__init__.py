# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""diffusers-sla: Sparse-Linear Attention (arXiv 2509.24006) for Hugging Face Diffusers."""

__version__ = "0.1.0"

import importlib.util

from .config import SLAConfig
from .integration.layer import SparseLinearAttention, iter_sla_layers
from .ops import sparse_linear_attention

# diffusers is a dependency, but the operator alone runs without it (e.g. on a bare GPU box that benchmarks the
# kernels): import the diffusers glue only where diffusers is installed.
if importlib.util.find_spec("diffusers") is not None:
    # `hooks` is imported now, not on first use: it patches diffusers (`from_pretrained` must be wrapped before a
    # model is loaded, so that `enable_sla` later finds the `sla_attention.safetensors` saved beside its weights).
    from . import hooks  # noqa: F401
    from .integration.dense_steps import sla_dense_steps
    from .integration.install import disable_sla, enable_sla
    from .integration.processor import SLAAttnProcessor
    from .integration.report import reset_sla_stats, sla_summary
    from .weights.converters import ConversionResult, convert_simpletuner_sla, convert_turbodiffusion_wan
    from .weights.format import SLAWeightsFile, read_sla_file
    from .weights.io import SLALoadResult, load_sla, save_sla

__all__ = [
    "ConversionResult",
    "SLAAttnProcessor",
    "SLAConfig",
    "SLALoadResult",
    "SLAWeightsFile",
    "SparseLinearAttention",
    "__version__",
    "convert_simpletuner_sla",
    "convert_turbodiffusion_wan",
    "disable_sla",
    "enable_sla",
    "iter_sla_layers",
    "load_sla",
    "read_sla_file",
    "reset_sla_stats",
    "save_sla",
    "sla_dense_steps",
    "sla_summary",
    "sparse_linear_attention",
]
