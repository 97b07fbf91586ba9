# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Interception of the attention call inside a diffusers processor.

With the default (native) attention backend, every diffusers processor ends its attention in
`torch.nn.functional.scaled_dot_product_attention` (SDPA), either directly (`F.scaled_dot_product_attention` in the
`Attention`-class processors) or through `dispatch_attention_fn` -> `_native_attention`. Both look the function up
on `torch.nn.functional` at call time, so we install one thin wrapper there, once, the first time an
`SLAAttnProcessor` is built. Outside an SLA processor call the wrapper reads one thread-local attribute and calls the
original SDPA: other models, other threads and our own dense fallbacks are untouched. Inside an SLA processor call
(`routing_scope`) the wrapper decides, per SDPA call, between SLA and the original SDPA
(`routing.route_attention_call`, whose module documents the policy).

Why a thread-local scope rather than swapping `F.scaled_dot_product_attention` for the duration of each call:
a swap is undone by whichever thread finishes first, so a second thread could silently run dense; the scope is
per thread and costs the same.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch

from diffusers_sla.config import SLA_MODULE_NAME, SLAConfig
from diffusers_sla.ops.api import sparse_linear_attention

from .layer import SparseLinearAttention
from .logs import already_logged, log_once
from .routing import (
    as_4d,
    block_density,
    dense_log_level,
    dense_message,
    forced_counts,
    forced_text_keys,
    key_padding_mask_from_attn_mask,
    route_attention_call,
)
from .stats import record_call


class RoutingOwner(Protocol):
    """What the interception needs of the processor whose call it routes (`SLAAttnProcessor`)."""

    config: SLAConfig
    backend: str
    log_key: str  # key of the processor's once-per-reason log lines


@dataclass
class RoutingScope:
    """The state of one SLA processor call: which module, which processor, how many SDPA calls it intercepted."""

    attn: torch.nn.Module
    processor: RoutingOwner
    intercepted: int = 0
    # ("first" | "last", n): the joint sequence's n text tokens sit at its start or end (`joint.text_tokens`)
    text_tokens: tuple | None = None


# ===== The SDPA wrapper =====


class _ThreadState(threading.local):
    # `scope` exists from the start in every thread (`threading.local` runs __init__ once per thread), so
    # torch.compile'd code guards on its value, not on its presence
    def __init__(self):
        self.scope: RoutingScope | None = None


_local = _ThreadState()
_install_lock = threading.Lock()
_original_sdpa = None


def active_scope() -> RoutingScope | None:
    """The routing scope of this thread's current SLA processor call, or None outside one."""
    return getattr(_local, "scope", None)


def _sla_sdpa(*args, **kwargs):
    scope = getattr(_local, "scope", None)
    if scope is None:
        return _original_sdpa(*args, **kwargs)
    return _route_in_scope(scope, args, kwargs)


def _calls_router(fn, depth: int = 4) -> bool:
    """Whether `fn` wraps `_sla_sdpa`: through `functools.wraps`' `__wrapped__`, a `functools.partial` or a closure
    cell, `depth` levels deep (how wrappers of a function are written)."""
    if fn is _sla_sdpa:
        return True
    if depth == 0 or fn is None:
        return False
    inner = [getattr(fn, "__wrapped__", None), getattr(fn, "func", None)]
    inner += [cell.cell_contents for cell in (getattr(fn, "__closure__", None) or ()) if _cell_filled(cell)]
    return any(callable(f) and _calls_router(f, depth - 1) for f in inner)


def _cell_filled(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell (a closure variable not yet assigned)
        return False
    return True


def install_sdpa_router() -> None:
    """Install the SDPA wrapper on `torch.nn.functional` (idempotent). Re-installs if someone replaced it, unless the
    replacement wraps the router: then the router still runs inside it, and taking the replacement as the dense SDPA
    would make each call through the router the replacement's again, without end."""
    global _original_sdpa
    if torch.nn.functional.scaled_dot_product_attention is _sla_sdpa:
        return
    with _install_lock:
        current = torch.nn.functional.scaled_dot_product_attention
        if current is not _sla_sdpa and not _calls_router(current):
            _original_sdpa = current
            torch.nn.functional.scaled_dot_product_attention = _sla_sdpa


def original_sdpa():
    """The SDPA function that dense calls run (torch's own unless something else wrapped it before us)."""
    return _original_sdpa or torch.nn.functional.scaled_dot_product_attention


@contextmanager
def routing_scope(attn: torch.nn.Module, processor, text_tokens: tuple | None = None):
    """Route the SDPA calls made by this thread inside the block through `processor`'s policy for module `attn`."""
    install_sdpa_router()
    scope = RoutingScope(attn, processor, text_tokens=text_tokens)
    previous = getattr(_local, "scope", None)
    _local.scope = scope
    try:
        yield scope
    finally:
        _local.scope = previous


@contextmanager
def no_routing():
    # While SLA or a dense fallback runs, SDPA calls must not be routed again.
    previous = getattr(_local, "scope", None)
    _local.scope = None
    try:
        yield
    finally:
        _local.scope = previous

_SDPA_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _bind_sdpa_args(args: tuple, kwargs: dict) -> dict:
    bound = dict(SDPA_DEFAULTS)
    bound.update(zip(_SDPA_ARG_NAMES, args))
    bound.update(kwargs)
    return bound


def _route_in_scope(scope: RoutingScope, args: tuple, kwargs: dict):
    scope.intercepted += 1
    call = _bind_sdpa_args(args, kwargs)
    processor, attn = scope.processor, scope.attn
    decision = route_attention_call(attn, processor.config, call)
    if decision.reason is not None:
        record_call(attn, decision.reason)
        log_dense_once(processor, decision.reason, attn)
        with no_routing():
            return _original_sdpa(*args, **kwargs)
    with no_routing():
        out, density = _run_sla(attn, processor, call, decision.key_padding_mask, decision.deferred_mask,
                                scope.text_tokens)
    record_call(attn, None, density)
    return out


def sla_layer_for(attn: torch.nn.Module, processor: RoutingOwner, q: torch.Tensor) -> SparseLinearAttention:
    """The module's own SLA layer, created at first use when `enable_sla` did not create it."""
    layer = attn._modules.get(SLA_MODULE_NAME)
    if layer is None:
        # While training, parameters born now are in no optimizer and no DDP bucket: say so loudly.
        training = torch.is_grad_enabled() and attn.training
        log_once(
            "lazy_layers_training" if training else "lazy_layers", logging.WARNING if training else logging.INFO,
            "SLAAttnProcessor created the SLA layers (`attn.sla`, with their `proj_l`) at first use"
            + (" during a training forward: an optimizer or DDP wrapper built before now does not hold them" if
               training else "")
            + ". Call `diffusers_sla.enable_sla(model)` to create them before building an optimizer or wrapping "
            "the model.",
        )
        with torch.inference_mode(False):
            layer = SparseLinearAttention(q.shape[-1], config=processor.config, backend=processor.backend).to(q.device)
        attn.add_module(SLA_MODULE_NAME, layer)
    elif layer.config is not processor.config:
        layer.config = processor.config
    return layer


def log_dense_once(processor: RoutingOwner, reason: str, attn: torch.nn.Module, inner=None,
                   backend_name=None) -> None:
    """Say once per processor and reason why calls run dense (`routing.dense_message`)."""
    key = (processor.log_key, reason)
    if not torch.compiler.is_compiling() and already_logged(key):
        return  # (eager dense calls: no message built after the first)
    message = dense_message(reason, processor.config, type(inner).__name__, backend_name)
    log_once(key, dense_log_level(reason), f"SLA: {message} (first seen in {type(attn).__name__}; "
             "counted per layer in `sla_summary(model)`).")


def _run_sla(attn: torch.nn.Module, processor, call: dict, key_padding_mask: torch.Tensor | None,
             deferred_mask: torch.Tensor | None = None, text_tokens: tuple | None = None):
    query, key, value = call["query"], call["key"], call["value"]
    q, k, v = as_4d(query), as_4d(key), as_4d(value)
    if k.shape[1] != q.shape[1]:
        # Grouped key/value heads (GQA): query head h reads key/value head h // group, as SDPA's enable_gqa does.
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    layer = sla_layer_for(attn, processor, q)
    forced = forced_text_keys(layer.config, text_tokens, q.shape[2], k.shape[2])
    if deferred_mask is not None:
        config, scale = layer.config, call["scale"]
        start, end = forced or (0, 0)
        out = layer.call_with_weights(lambda weight, bias: masked_sla(
            q, k, v, weight, bias, deferred_mask, query.ndim, config.topk, config.blkq, config.blkk,
            config.feature_map, config.linear_scope, scale, layer.backend, start, end))
        return (out.squeeze(1) if query.ndim == 3 else out), None  # the density depends on the mask's values
    # (forced_keys only when set: a layer whose forward was replaced, as the quality study does, keeps working)
    extra = {} if forced is None else {"forced_keys": forced}
    out = layer(q, k, v, scale=call["scale"], key_padding_mask=key_padding_mask, **extra)
    if key_padding_mask is None:
        density = block_density(layer.config, [k.shape[2]], forced_counts(layer.config, forced, [None]))
    elif torch.compiler.is_compiling():
        density = None  # depends on the mask's values: reading them would break the compiled graph
    else:
        density = block_density(layer.config, key_padding_mask.sum(dim=1).tolist(),
                           forced_counts(layer.config, forced, list(key_padding_mask)))
    return (out.squeeze(1) if query.ndim == 3 else out), density


# ===== Masks under torch.compile =====
#
# Eager calls read a mask's values on the host to decide (a key padding mask or not, any key masked at all) and
# then gather each sample's kept keys. Compiled code cannot branch on tensor values, so there the whole decision and
# computation is one opaque op with a static output shape: `masked_sla` reads the mask when it runs and does exactly
# what the eager route does with it (SLA over the kept keys for a key padding mask, the original SDPA with the mask
# for any other). Its backward recomputes the forward under autograd (an opaque op as well).


def _masked_forward(q, k, v, weight, bias, attn_mask, query_ndim, topk, blkq, blkk, feature_map, linear_scope,
                    scale, backend, force_start=0, force_end=0):
    batch, heads, query_len, key_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    keep = key_padding_mask_from_attn_mask(attn_mask, batch, heads, query_len, key_len, query_ndim)
    if keep is None:  # not a key padding mask: what the eager route runs (dense, reason "attention_mask")
        mask = attn_mask.unsqueeze(1) if query_ndim == 3 and attn_mask.ndim == 3 else attn_mask
        return original_sdpa()(q, k, v, attn_mask=mask, scale=scale)
    return sparse_linear_attention(
        q, k, v, weight, bias, topk=topk, blkq=blkq, blkk=blkk, feature_map=feature_map, linear_scope=linear_scope,
        scale=scale, key_padding_mask=None if bool(keep.all()) else keep, backend=backend,
        forced_keys=(force_start, force_end) if force_end > force_start else None,
    )

@torch.library.custom_op("diffusers_sla::masked_sla", mutates_args=())
def masked_sla(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
               attn_mask: torch.Tensor, query_ndim: int, topk: float, blkq: int, blkk: int, feature_map: str,
               linear_scope: str, scale: float | None, backend: str, force_start: int = 0,
               force_end: int = 0) -> torch.Tensor:
    with torch.no_grad():
        return _masked_forward(q, k, v, weight, bias, attn_mask, query_ndim, topk, blkq, blkk, feature_map,
                               linear_scope, scale, backend, force_start, force_end).contiguous()


@masked_sla.register_fake
def _(q, k, v, weight, bias, attn_mask, query_ndim, topk, blkq, blkk, feature_map, linear_scope, scale, backend,
      force_start=0, force_end=0):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.custom_op("diffusers_sla::masked_sla_backward", mutates_args=())
def masked_sla_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor, attn_mask: torch.Tensor, query_ndim: int, topk: float, blkq: int,
                        blkk: int, feature_map: str, linear_scope: str, scale: float | None,
                        backend: str, force_start: int = 0, force_end: int = 0) -> list[torch.Tensor]:
    def recompute():
        inputs = [t.detach().requires_grad_(True) for t in (q, k, v, weight, bias)]
        with torch.enable_grad():
            out = _masked_forward(*inputs, attn_mask, query_ndim, topk, blkq, blkk, feature_map, linear_scope,
                                  scale, backend, force_start, force_end)
            grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
        # laid out as the fake impl says (`empty_like` keeps each input's strides): compiled code views them so
        return [torch.zeros_like(t) if g is None else torch.empty_like(t).copy_(g) for t, g in zip(inputs, grads)]

    # A custom op's body runs with autograd's dispatch keys excluded for this thread (and torch.func refuses the
    # saved-tensor hooks a compiled backward has set): the recomputation runs on a worker thread, whose state is
    # fresh, on the caller's CUDA stream.
    stream = torch.cuda.current_stream(q.device) if q.is_cuda else None

    def on_worker():
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            return recompute()

    return _backward_worker().submit(on_worker).result()


_worker = None


def _backward_worker():
    global _worker
    if _worker is None:
        with _install_lock:
            if _worker is None:
                _worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffusers_sla_masked_backward")
    return _worker


@masked_sla_backward.register_fake
def _(grad, q, k, v, weight, bias, attn_mask, query_ndim, topk, blkq, blkk, feature_map, linear_scope, scale,
      backend, force_start=0, force_end=0):
    return [torch.empty_like(t) for t in (q, k, v, weight, bias)]


def _masked_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:6])
    ctx.settings = inputs[6:]


def _masked_backward(ctx, grad):
    q, k, v, weight, bias, attn_mask = ctx.saved_tensors
    dq, dk, dv, dweight, dbias = masked_sla_backward(grad, q, k, v, weight, bias, attn_mask, *ctx.settings)
    return dq, dk, dv, dweight, dbias, None, None, None, None, None, None, None, None, None, None, None


masked_sla.register_autograd(_masked_backward, setup_context=_masked_setup_context)
