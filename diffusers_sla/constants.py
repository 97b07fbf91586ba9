# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Names shared across modules."""

# The file that carries SLA weights beside a transformer's own weights.
SLA_WEIGHTS_NAME = "sla_attention.safetensors"
# Bumped whenever the layout of SLA_WEIGHTS_NAME changes incompatibly.
SLA_FORMAT_VERSION = "1"
# Attribute under which each SLA-enabled attention module holds its own `SparseLinearAttention`.
SLA_MODULE_NAME = "sla"
