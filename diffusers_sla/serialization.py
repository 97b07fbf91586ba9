# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`sla_attention.safetensors`: saving, loading and sharing SLA weights (work in progress)."""

from __future__ import annotations

from torch import nn


def on_sla_enabled(model: nn.Module) -> None:
    """Called by `enable_sla` once SLA layers are installed: replays `sla_attention.safetensors` from the model's
    load location when it holds one."""


def on_sla_disabled(model: nn.Module) -> None:
    """Called by `disable_sla` after the SLA layers were removed."""
