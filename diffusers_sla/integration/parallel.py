# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""SLA and diffusers' context parallelism (`ContextParallelConfig`, `model.enable_parallelism`).

Two parts:

* `check_context_parallel`: which context parallelism SLA runs under. Ulysses alone: yes, through
  `ulysses_sparse_linear_attention` (`_sla_templated_attention` below takes the place of diffusers'
  `_templated_context_parallel_attention`, whose Ulysses backward would recompute dense attention). Ring, alone or with
  Ulysses, gives each attention step one shard of the keys while SLA selects its key blocks among all keys: a clear
  error (docs/context-parallel.md has the details).
* `ulysses_sparse_linear_attention`: the head-sharded SLA call, with its autograd through the all-to-all
  collectives.
* `install_context_parallel_router`: the patch of diffusers' context-parallel attention that routes SLA calls there.
"""

from __future__ import annotations

import logging
import threading

import torch
import torch.distributed as dist
from diffusers.models import attention_dispatch
from diffusers.models.attention_dispatch import _native_attention_forward_op
from torch import nn

from diffusers_sla.ops.api import sparse_linear_attention

from .logs import log_once
from .modules import INNER_PROCESSOR_ATTR, is_attention_module
from .routing import block_density, route_attention_call
from .sdpa import SDPA_DEFAULTS, active_scope, log_dense_once, no_routing, sla_layer_for
from .stats import record_call

SUPPORTED_CONTEXT_PARALLEL = "ulysses_degree >= 1 with ring_degree=1 and ulysses_anything=False"


def context_parallel_degrees(parallel_config) -> tuple[int, int] | None:
    """(ulysses_degree, ring_degree) of a diffusers `ParallelConfig` / `ContextParallelConfig`, or None when it asks
    for no context parallelism (None, tensor parallelism only, or both degrees 1)."""
    if parallel_config is None:
        return None
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    if cp is None:
        return None
    ulysses = getattr(cp, "ulysses_degree", None) or 1
    ring = getattr(cp, "ring_degree", None) or 1
    return None if ulysses == ring == 1 else (ulysses, ring)


def context_parallel_error(parallel_config, where: str) -> str | None:
    """The error message for SLA under `parallel_config`'s context parallelism, or None when SLA supports it."""
    degrees = context_parallel_degrees(parallel_config)
    if degrees is None:
        return None
    ulysses, ring = degrees
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    if ring > 1:
        why = ("ring attention gives each step one shard of the keys, while SLA selects its key blocks among all "
               "keys")
    elif getattr(cp, "ulysses_anything", False):
        why = "`ulysses_anything` (uneven sequence and head shards) is not supported by SLA's Ulysses call"
    else:
        return None
    return (f"{where}: SLA does not support this context parallelism (ulysses_degree={ulysses}, ring_degree={ring}): "
            f"{why}. Supported: {SUPPORTED_CONTEXT_PARALLEL}. Use Ulysses alone, or call "
            "`diffusers_sla.disable_sla(model)` to use this parallelism with dense attention.")


def check_context_parallel(parallel_config, where: str):
    """The `ParallelConfig` when it asks for Ulysses, which SLA runs through `ulysses_sparse_linear_attention`;
    None without context parallelism; `NotImplementedError` for ring (and ring with Ulysses) or
    `ulysses_anything` (see the module docstring)."""
    message = context_parallel_error(parallel_config, where)
    if message is not None:
        raise NotImplementedError(message)
    return None if context_parallel_degrees(parallel_config) is None else parallel_config


def check_model_parallelism(model: nn.Module, where: str) -> None:
    """Raise when `enable_parallelism` gave `model` (or one of its attention processors) context parallelism that SLA
    does not run (ring)."""
    check_context_parallel(getattr(model, "_parallel_config", None), where)
    for module in model.modules():
        if is_attention_module(module):
            inner = getattr(module, INNER_PROCESSOR_ATTR, None) or module.processor
            check_context_parallel(getattr(inner, "_parallel_config", None), where)


def ulysses_group(parallel_config):
    """The process group of a diffusers `ParallelConfig`'s Ulysses mesh."""
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    return cp._ulysses_mesh.get_group()


# ===== Ulysses: head-sharded SLA =====


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    # The autograd variant of the functional all-to-all: its backward is the inverse all-to-all of the gradient.
    # (imported on first use, as before the split: only context-parallel runs need torch's functional collectives)
    from torch.distributed import _functional_collectives as funcol

    shape = x.shape
    out = funcol.all_to_all_single_autograd(x.contiguous().flatten(), None, None, group or dist.group.WORLD)
    return funcol.wait_tensor(out).reshape(shape)


def sequence_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """(B, H, L_local, D) sharded over the sequence -> (B, H / world, L_local * world, D): every token of this
    rank's contiguous share of the heads, the sequence shards in rank order."""
    world = dist.get_world_size(group)
    b, h, length, d = x.shape
    chunks = x.reshape(b, world, h // world, length, d).transpose(0, 1)  # (world, B, H/world, L, D): to rank j
    received = _all_to_all(chunks, group)  # (world, B, H/world, L, D): rank j's sequence shard of my heads
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // world, world * length, d)


def heads_to_sequence(x: torch.Tensor, group) -> torch.Tensor:
    """The inverse of `sequence_to_heads`."""
    world = dist.get_world_size(group)
    b, h_local, length, d = x.shape
    chunks = x.reshape(b, h_local, world, length // world, d).permute(2, 0, 1, 3, 4)  # sequence shard j to rank j
    received = _all_to_all(chunks, group)  # (world, B, H/world, L/world, D): rank j's heads of my shard
    return received.transpose(0, 1).reshape(b, world * h_local, length // world, d)


def ulysses_sparse_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor | None = None,
    proj_bias: torch.Tensor | None = None,
    *,
    group=None,
    config=None,
    scale: float | None = None,
    backend: str = "auto",
    **overrides,
) -> torch.Tensor:
    """SLA over a sequence sharded across `group` (Ulysses): the same result as `sparse_linear_attention` on the
    gathered sequence, each rank returning its own shard.

    Args:
        q, k, v (`torch.Tensor`): (batch, heads, L_local, head_dim), this rank's contiguous shard of the sequence
            (rank r holds tokens [r * L_local, (r + 1) * L_local)); every rank has the same L_local, and `heads` is
            a multiple of the group's size. Self-attention: q and k have the same length.
        proj_weight, proj_bias: this rank's `proj_l` (the same values on every rank). Its gradient on each rank is
            the part from that rank's heads: sum it over the group (as every other parameter of a sequence-sharded
            model) to get the full gradient.
        group: the Ulysses process group (default: the world).
        config, scale, backend, overrides: as in `sparse_linear_attention`.

    Each rank runs SLA on every token of `heads / world` heads, so block selection is over all keys, exactly as in
    one process.
    """
    world = dist.get_world_size(group)
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"`q`, `k`, `v` must be (batch, heads, L_local, head_dim) of one shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}.")
    if q.shape[1] % world:
        raise ValueError(f"`q`: {q.shape[1]} heads cannot be split over a Ulysses group of {world} ranks; the "
                         "heads must be a multiple of the group size.")
    q, k, v = (sequence_to_heads(x, group) for x in (q, k, v))
    out = sparse_linear_attention(q, k, v, proj_weight, proj_bias, config=config, scale=scale, backend=backend,
                                  **overrides)
    return heads_to_sequence(out, group)


# ===== Ulysses context parallelism =====
#
# Under diffusers' context parallelism the native backend sends the attention calls it parallelizes (those to which
# the processor passes its parallel config: Wan's self-attention, not its cross-attention over the unsharded text)
# to `attention_dispatch._templated_context_parallel_attention` with this rank's sequence shard of q, k, v in
# (batch, seq, heads, head_dim). Its Ulysses path is an autograd Function whose backward recomputes dense SDPA, so
# inside an SLA processor call we take that function's place: SLA calls run `ulysses_sparse_linear_attention`
# (all-to-all to heads, SLA over every token, all-to-all back, autograd through all of it); dense calls, other
# attention backends and calls outside an SLA processor run diffusers' function unchanged. Ring never gets here:
# `SLAAttnProcessor` refuses it first (`check_context_parallel`).

_original_templated = None
_install_lock = threading.Lock()


def install_context_parallel_router() -> None:
    """Install `_sla_templated_attention` in diffusers' attention dispatch (idempotent)."""
    global _original_templated
    if attention_dispatch._templated_context_parallel_attention is _sla_templated_attention:
        return
    with _install_lock:
        current = attention_dispatch._templated_context_parallel_attention
        if current is not _sla_templated_attention:
            _original_templated = current
            attention_dispatch._templated_context_parallel_attention = _sla_templated_attention


def _global_view(x: torch.Tensor, world: int) -> torch.Tensor:
    # shape-only stand-in for the gathered (B, H, L, D) tensor: the routing policy reads shapes and dtypes here
    return torch.empty((x.shape[0], x.shape[2], x.shape[1] * world, x.shape[3]), dtype=x.dtype, device="meta")


def _sla_templated_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                             enable_gqa=False, return_lse=False, *, forward_op, backward_op, _parallel_config=None):
    def diffusers_attention():
        with no_routing():
            return _original_templated(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                       return_lse, forward_op=forward_op, backward_op=backward_op,
                                       _parallel_config=_parallel_config)

    scope = active_scope()
    degrees = context_parallel_degrees(_parallel_config)
    if scope is None or forward_op is not _native_attention_forward_op or return_lse or degrees is None \
            or degrees[1] != 1 or _parallel_config.context_parallel_config.ulysses_anything:
        return diffusers_attention()
    scope.intercepted += 1
    processor, attn = scope.processor, scope.attn
    world = degrees[0]
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        reason = "unsupported_shape"
    elif attn_mask is not None:
        reason = "attention_mask"  # diffusers all-gathers a sharded mask; SLA's masked path is not sharded
    else:
        view = dict(SDPA_DEFAULTS, query=_global_view(query, world), key=_global_view(key, world),
                    value=_global_view(value, world), dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        reason = route_attention_call(attn, processor.config, view).reason
    if reason is None and query.shape[2] % world:
        reason = "unsupported_shape"  # diffusers' Ulysses needs the heads divisible by the degree as well
    if reason is not None:
        record_call(attn, reason)
        log_dense_once(processor, reason, attn)
        return diffusers_attention()
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # (B, H, L_local, D)
    layer = sla_layer_for(attn, processor, q)
    config = layer.config
    if config.protect_text and scope.text_tokens is not None:
        # each rank's shard holds a piece of the text, so the text is not one key range of the gathered sequence
        log_once(("cp_protect_text", type(attn)), logging.WARNING,
                 "SLA under context parallelism (Ulysses) does not protect the text tokens (SLAConfig.protect_text): "
                 "the joint sequence's text is spread over the shards; these calls select blocks as with "
                 "protect_text=False.")
    with no_routing():
        out = layer.call_with_weights(lambda weight, bias: ulysses_sparse_linear_attention(
            q, k, v, weight, bias, group=ulysses_group(_parallel_config), config=config, scale=scale,
            backend=layer.backend))
    record_call(attn, None, block_density(config, [k.shape[2] * world]))
    return out.permute(0, 2, 1, 3)
