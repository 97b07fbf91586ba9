# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""All-or-nothing installs: what an install may change on each attention module, saved before and restored on error."""

from __future__ import annotations

import contextlib
import threading

from torch import nn

from diffusers_sla.config import SLA_MODULE_NAME

from .layer import REPLAYED_ATTR
from .modules import (
    DENSE_LAYER_ATTR,
    INNER_PARAMETERS_ATTR,
    INNER_PROCESSOR_ATTR,
    call_parameters,
    inner_processor,
    is_attention_module,
)
from .stats import drop_stats

_install_state = threading.local()


@contextlib.contextmanager
def model_install():
    # A model-level install (`enable_sla`, `set_attn_processor`) replays the whole file once at its end; the
    # per-module replay of `set_processor` stands down meanwhile.
    depth = getattr(_install_state, "depth", 0)
    _install_state.depth = depth + 1
    try:
        yield
    finally:
        _install_state.depth = depth


def installing() -> bool:
    """Whether this thread is inside a model-level install (`model_install`)."""
    return getattr(_install_state, "depth", 0) > 0


def snapshot(model: nn.Module) -> list[tuple]:
    """What an install may change on each attention module of `model`: its processor (wrapper or own, plain or
    child module), the processor SLA wraps, its SLA layer with the layer's config and weights' replay mark."""
    return snapshot_modules([m for m in model.modules() if is_attention_module(m)])


def snapshot_modules(modules) -> list[tuple]:
    rows = []
    for attn in modules:
        layer = attn._modules.get(SLA_MODULE_NAME)
        rows.append((
            attn, attn.__dict__.get("processor"), attn._modules.get("processor"), inner_processor(attn),
            layer, getattr(layer, "config", None), getattr(layer, "backend", None),
            getattr(layer, REPLAYED_ATTR, None), attn.__dict__.get(DENSE_LAYER_ATTR),
        ))
    return rows


def restore(rows: list[tuple]) -> None:
    for attn, plain, child, inner, layer, config, backend, replayed, dense in rows:
        attn.__dict__.pop(DENSE_LAYER_ATTR, None)
        if dense is not None:
            attn.__dict__[DENSE_LAYER_ATTR] = dense
        attn.__dict__.pop("processor", None)
        attn._modules.pop("processor", None)
        if plain is not None:
            attn.__dict__["processor"] = plain
        if child is not None:
            attn._modules["processor"] = child
        attn.__dict__.pop(INNER_PROCESSOR_ATTR, None)
        attn.__dict__.pop(INNER_PARAMETERS_ATTR, None)
        if inner is not None:
            attn.__dict__[INNER_PROCESSOR_ATTR] = inner
            attn.__dict__[INNER_PARAMETERS_ATTR] = (type(inner), call_parameters(inner))
        attn._modules.pop(SLA_MODULE_NAME, None)
        if layer is not None:
            attn._modules[SLA_MODULE_NAME] = layer
            layer.config, layer.backend = config, backend
            if replayed is None:
                layer.__dict__.pop(REPLAYED_ATTR, None)
            else:
                setattr(layer, REPLAYED_ATTR, replayed)
        if plain is None and inner is None:
            drop_stats(attn)

