# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Facts about diffusers attention modules and models that the install, the processor and the weights all read."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from diffusers_sla.config import SLAConfig

from .routing import is_linear_attention_processor

# Attributes set on attention modules: the processor SLA runs beneath, and that processor's keyword parameters.
INNER_PROCESSOR_ATTR = "_sla_inner_processor"
INNER_PARAMETERS_ATTR = "_sla_inner_parameters"
# Set on attention modules that `SLAConfig.dense_layers` keeps on the model's own attention.
DENSE_LAYER_ATTR = "_sla_dense_layer"
# Set on attention modules while `sla_dense_steps` runs the current denoising step dense.
DENSE_STEP_ATTR = "_sla_dense_step"


def inner_processor(attn: nn.Module):
    """The processor SLA runs beneath on `attn` (None when SLA is not installed there)."""
    return attn.__dict__.get(INNER_PROCESSOR_ATTR)


def call_parameters(processor) -> tuple[frozenset, bool]:
    """Keyword names of `processor.__call__` after the module argument, and whether it takes **kwargs."""
    try:
        params = list(inspect.signature(processor.__call__).parameters.values())
    except (TypeError, ValueError):
        return frozenset(), True
    takes_var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    named = [p for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]
    return frozenset(p.name for p in named[1:]), takes_var_kwargs


def is_attention_module(module: nn.Module) -> bool:
    return callable(getattr(module, "set_processor", None)) and hasattr(module, "processor")


def target_models(pipe_or_model) -> list[tuple[str, nn.Module]]:
    """(prefix, model) pairs: the model itself, or a pipeline's denoisers (`transformer*`, `unet*` components)."""
    if isinstance(pipe_or_model, nn.Module):
        return [("", pipe_or_model)]
    components = getattr(pipe_or_model, "components", None)
    if isinstance(components, dict):
        models = [
            (name, component) for name, component in components.items()
            if isinstance(component, nn.Module) and name.startswith(("transformer", "unet"))
        ]
        if not models:
            raise ValueError(
                f"`pipe_or_model`: {type(pipe_or_model).__name__} has no `transformer*` or `unet*` component, "
                f"its components are {sorted(components)}."
            )
        return models
    raise ValueError(
        f"`pipe_or_model` must be a diffusers pipeline or a torch.nn.Module, got {type(pipe_or_model).__name__}."
    )


def join(prefix: str, path: str) -> str:
    return ".".join(part for part in (prefix, path) if part)


def infer_head_dim(attn: nn.Module) -> int | None:
    head_dim = getattr(attn, "head_dim", None)
    if isinstance(head_dim, int) and head_dim > 0:
        return head_dim
    inner_dim, heads = getattr(attn, "inner_dim", None), getattr(attn, "heads", None)
    if isinstance(inner_dim, int) and isinstance(heads, int) and heads > 0 and inner_dim % heads == 0:
        return inner_dim // heads
    return None


def declared_cross_attention(attn: nn.Module) -> bool:
    declared = getattr(attn, "is_cross_attention", None)
    if isinstance(declared, bool):
        return declared
    cross_dim, query_dim = getattr(attn, "cross_attention_dim", None), getattr(attn, "query_dim", None)
    return isinstance(cross_dim, int) and isinstance(query_dim, int) and cross_dim != query_dim


def expects_sla(attn: nn.Module, config: SLAConfig) -> bool:
    """Whether `enable_sla` gives this module an SLA layer up front: it has a softmax-attention processor and is not
    a cross-attention module that the policy keeps dense."""
    inner = getattr(attn, INNER_PROCESSOR_ATTR, None)
    if inner is None or is_linear_attention_processor(inner):
        return False
    return not (declared_cross_attention(attn) and config.cross_attention == "dense")


def module_device(attn: nn.Module) -> torch.device:
    for param in attn.parameters():
        if not param.is_meta:
            return param.device
    # offloaded with accelerate (weights on "meta" between calls): new SLA layers live where the module runs
    device = getattr(getattr(attn, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else torch.device("cpu")


def short(items, limit: int = 6) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")
