# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Interception of the attention call inside a diffusers processor, and the routing policy of `SLAAttnProcessor`.

With the default (native) attention backend, every diffusers processor ends its attention in
`torch.nn.functional.scaled_dot_product_attention` (SDPA), either directly (`F.scaled_dot_product_attention` in the
`Attention`-class processors) or through `dispatch_attention_fn` -> `_native_attention`. Both look the function up
on `torch.nn.functional` at call time, so we install one thin wrapper there, once, the first time an
`SLAAttnProcessor` runs. Outside an SLA processor call the wrapper reads one thread-local attribute and calls the
original SDPA: other models, other threads and our own dense fallbacks are untouched. Inside an SLA processor call
(`routing_scope`) the wrapper decides, per SDPA call, between SLA and the original SDPA (`route_attention_call`).

Why a thread-local scope rather than swapping `F.scaled_dot_product_attention` for the duration of each call:
a swap is undone by whichever thread finishes first, so a second thread could silently run dense; the scope is
per thread and costs the same.

Routing policy, decided by the small `*_reason` functions below (the first that applies wins):

1. not a (batch, heads, seq, head_dim) or (batch, seq, head_dim) call, values with another head_dim than the keys,
   key/value heads that do not divide the query heads, or batch broadcasting -> dense, reason `"unsupported_shape"`;
   key/value heads that divide the query heads (GQA) are expanded and run SLA.
2. `dropout_p > 0` -> dense `"dropout"`; `is_causal=True` -> dense `"causal"`.
3. cross-attention (keys from another sequence: `Lq != Lk`, or a module marked `is_cross_attention`) ->
   `config.cross_attention` (`"dense"` by default, reason `"cross_attention"`).
4. fewer than `config.min_kv_blocks * config.blkk` keys -> dense `"short_sequence"`.
5. a mask: a key padding mask (bool, or additive with only 0 and <= -1e4, the same for every head and query) ->
   `config.masked_attention` (`"sla"` by default: SLA over the unmasked keys; `"dense"`: reason
   `"key_padding_mask"`); any other mask -> dense `"attention_mask"`.
6. everything else (self-attention, joint text+image attention) -> SLA, with the SDPA call's `scale`.

A processor call that makes no SDPA call at all is counted by `SLAAttnProcessor` as `"attention_backend"` (a
non-native backend set with `set_attention_backend`), `"linear_attention"` (Sana's linear self-attention) or
`"no_sdpa_call"`, and a call of a module listed in `SLAConfig.dense_layers` (never routed) as `"dense_layer"`. Dense
calls run the original SDPA with the original arguments, so they are exactly what the model
computed before.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .config import SLAConfig
from .constants import SLA_MODULE_NAME
from .ops.selection import forced_block_range, num_blocks, num_kept_blocks

# Additive masks hold 0 for kept keys and a large negative number for masked ones (-10000, -inf, finfo.min).
_ADDITIVE_MASKED_MAX = -1e4

DENSE_REASONS = (
    "unsupported_shape",
    "dropout",
    "causal",
    "cross_attention",
    "short_sequence",
    "key_padding_mask",
    "attention_mask",
    "attention_backend",
    "no_sdpa_call",
    "linear_attention",
    "dense_layer",
    "dense_step",
)


@dataclass
class LayerStats:
    """What one attention module did since the last reset: SDPA calls sent to SLA, dense calls by reason, and the
    summed density (kept key blocks / all key blocks) of its SLA calls."""

    sla_calls: int = 0
    dense_calls: dict[str, int] = field(default_factory=dict)  # a plain dict: torch.compile cannot build a Counter
    density_sum: float = 0.0
    # Calls inside a torch.compile'd region are not counted (see `record_call`); the last one's route ("sla" or a
    # dense reason) and density (None when it depends on a mask's values) are kept instead.
    compiled_route: str | None = None
    compiled_density: float | None = None

    @property
    def mean_density(self) -> float | None:
        return self.density_sum / self.sla_calls if self.sla_calls else None

    @property
    def total_dense_calls(self) -> int:
        return sum(self.dense_calls.values())

    def reset(self) -> None:
        self.sla_calls = 0
        self.dense_calls.clear()
        self.density_sum = 0.0
        self.compiled_route = self.compiled_density = None


@dataclass
class RoutingScope:
    """The state of one SLA processor call: which module, which processor, how many SDPA calls it intercepted."""

    attn: torch.nn.Module
    processor: object  # SLAAttnProcessor; typed loosely to avoid an import cycle
    intercepted: int = 0
    # ("first" | "last", n): the joint sequence's n text tokens sit at its start or end (`processor._text_tokens`)
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


def _active_scope() -> RoutingScope | None:
    return getattr(_local, "scope", None)


def _sla_sdpa(*args, **kwargs):
    scope = getattr(_local, "scope", None)
    if scope is None:
        return _original_sdpa(*args, **kwargs)
    return _route_in_scope(scope, args, kwargs)


def install_sdpa_router() -> None:
    """Install the SDPA wrapper on `torch.nn.functional` (idempotent; re-installs if someone replaced it)."""
    global _original_sdpa
    if torch.nn.functional.scaled_dot_product_attention is _sla_sdpa:
        return
    with _install_lock:
        current = torch.nn.functional.scaled_dot_product_attention
        if current is not _sla_sdpa:
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
def _no_routing():
    # While SLA or a dense fallback runs, SDPA calls must not be routed again.
    previous = getattr(_local, "scope", None)
    _local.scope = None
    try:
        yield
    finally:
        _local.scope = previous


_SDPA_ARG_NAMES = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


def _bind_sdpa_args(args: tuple, kwargs: dict) -> dict:
    bound = dict(_SDPA_DEFAULTS)
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
        processor._log_dense_once(decision.reason, attn, call)
        with _no_routing():
            return _original_sdpa(*args, **kwargs)
    with _no_routing():
        out, density = _run_sla(attn, processor, call, decision.key_padding_mask, decision.deferred_mask,
                                scope.text_tokens)
    record_call(attn, None, density)
    return out


def layer_stats(attn: torch.nn.Module) -> LayerStats:
    stats = attn.__dict__.get("_sla_stats")
    if stats is None:
        stats = attn.__dict__["_sla_stats"] = LayerStats()
    return stats


def record_call(attn: torch.nn.Module, reason: str | None, density: float | None = None) -> None:
    """Count one attention call of `attn`: SLA (`reason` None, with its density) or dense for `reason`.

    Inside a torch.compile'd region a counter would become a guard on its own value, i.e. a recompilation at every
    call until dynamo gives up and runs the region eagerly. There the call only stores its route and density:
    plain writes, which the compiled code replays on every run without guarding on them."""
    stats = layer_stats(attn)
    if torch.compiler.is_compiling():
        stats.compiled_route, stats.compiled_density = reason or "sla", density
    elif reason is None:
        stats.sla_calls += 1
        stats.density_sum += density
    else:
        stats.dense_calls[reason] = stats.dense_calls.get(reason, 0) + 1


# ===== Routing decisions =====


@dataclass
class RouteDecision:
    reason: str | None  # None: run SLA; else the dense reason (one of DENSE_REASONS)
    key_padding_mask: torch.Tensor | None = None  # (B, Lk) bool keep-mask for SLA, None when every key is kept
    # Under torch.compile: an SDPA mask shaped like a key padding mask, whose values are read at run time inside one
    # opaque op (`masked_sla`), since a branch on them would break the graph (see `_masked_sla`).
    deferred_mask: torch.Tensor | None = None


def _as_4d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.ndim == 3 else x


def shape_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """Dense unless q, k, v are (B, H, L, D) or (B, L, D) with one batch size, v's head_dim equal to k's, and
    key/value heads dividing the query heads."""
    if query.ndim not in (3, 4) or key.ndim != query.ndim or value.ndim != query.ndim:
        return "unsupported_shape"
    q, k, v = _as_4d(query), _as_4d(key), _as_4d(value)
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[-1] != k.shape[-1]:
        return "unsupported_shape"
    if q.shape[1] % k.shape[1] != 0 or q.shape[2] == 0 or k.shape[2] == 0:
        return "unsupported_shape"
    if not (q.dtype == k.dtype == v.dtype) or not q.is_floating_point():
        return "unsupported_shape"
    return None


def is_cross_attention_call(attn: torch.nn.Module, query_len: int, key_len: int) -> bool:
    """Keys come from another sequence than the queries: the lengths differ, or the module is declared a
    cross-attention module (`attn.is_cross_attention`, set by diffusers when it projects keys from the text).
    Joint attention (Flux, SD3, QwenImage, HunyuanVideo, CogVideoX) concatenates text and image tokens into both
    queries and keys, so it is self-attention here."""
    return query_len != key_len or bool(getattr(attn, "is_cross_attention", False))


def key_padding_mask_from_attn_mask(
    attn_mask: torch.Tensor, batch: int, heads: int, query_len: int, key_len: int, query_ndim: int = 4
) -> torch.Tensor | None:
    """The (batch, key_len) bool keep-mask equivalent to an SDPA `attn_mask`, or None when the mask is not a key
    padding mask (it varies over heads or queries, or holds additive values other than 0 and large negatives).

    SDPA broadcasts the mask from the right against (B, H, Lq, Lk) (or (B, Lq, Lk) for 3-D queries)."""
    mask = attn_mask
    if mask.ndim > query_ndim or mask.ndim == 0:
        return None
    mask = mask.reshape((1,) * (query_ndim - mask.ndim) + tuple(mask.shape))
    if query_ndim == 3:
        mask = mask.unsqueeze(1)
    b, h, lq, lk = mask.shape
    if b not in (1, batch) or h not in (1, heads) or lq not in (1, query_len) or lk != key_len:
        return None
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_floating_point():
        keep = mask == 0
        if not bool((keep | (mask <= _ADDITIVE_MASKED_MAX)).all()):
            return None
    else:
        return None
    first = keep[:, :1, :1, :]
    if (h > 1 or lq > 1) and not bool((keep == first).all()):
        return None
    return first[:, 0, 0, :].expand(batch, key_len)


def _padding_mask_shape(attn_mask: torch.Tensor, batch: int, heads: int, query_len: int, key_len: int,
                        query_ndim: int) -> bool:
    """Whether `attn_mask` has a key padding mask's shape and dtype (its values are not read)."""
    if attn_mask.ndim > query_ndim or attn_mask.ndim == 0:
        return False
    if not (attn_mask.dtype == torch.bool or attn_mask.is_floating_point()):
        return False
    shape = (1,) * (query_ndim - attn_mask.ndim) + tuple(attn_mask.shape)
    if query_ndim == 3:
        shape = (shape[0], 1, *shape[1:])
    b, h, lq, lk = shape
    return b in (1, batch) and h in (1, heads) and lq in (1, query_len) and lk == key_len


def route_attention_call(attn: torch.nn.Module, config: SLAConfig, call: dict) -> RouteDecision:
    """Apply the module docstring's policy to one SDPA call (`call`: SDPA's arguments by name)."""
    query, key, value = call["query"], call["key"], call["value"]
    reason = shape_reason(query, key, value)
    if reason is not None:
        return RouteDecision(reason)
    if call["dropout_p"]:
        return RouteDecision("dropout")
    if call["is_causal"]:
        return RouteDecision("causal")
    q, k = _as_4d(query), _as_4d(key)
    batch, heads, query_len, key_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if is_cross_attention_call(attn, query_len, key_len) and config.cross_attention == "dense":
        return RouteDecision("cross_attention")
    if key_len < config.min_kv_blocks * config.blkk:
        return RouteDecision("short_sequence")
    attn_mask = call["attn_mask"]
    if attn_mask is None:
        return RouteDecision(None)
    if torch.compiler.is_compiling():
        # Only the mask's shape and dtype decide here; its values are checked at run time (`_masked_sla`).
        if not _padding_mask_shape(attn_mask, batch, heads, query_len, key_len, query.ndim):
            return RouteDecision("attention_mask")
        if config.masked_attention == "dense":
            return RouteDecision("key_padding_mask")
        return RouteDecision(None, deferred_mask=attn_mask)
    keep = key_padding_mask_from_attn_mask(attn_mask, batch, heads, query_len, key_len, query.ndim)
    if keep is None:
        return RouteDecision("attention_mask")
    if config.masked_attention == "dense":
        return RouteDecision("key_padding_mask")
    return RouteDecision(None, None if bool(keep.all()) else keep)  # (eager only: one host read per masked call)


# ===== Running SLA =====


def _density(config: SLAConfig, key_lengths: list[int], forced: list[int] | None = None) -> float:
    """Kept key blocks / all key blocks, averaged over the samples (each keeps the same count per query block);
    `forced[i]`: sample i's forced (text) key blocks, which count as kept."""
    values = []
    for i, length in enumerate(key_lengths):
        n = num_blocks(length, config.blkk)
        values.append(num_kept_blocks(config.topk, n, forced[i] if forced else 0) / n if n else 0.0)
    return sum(values) / len(values)


def forced_text_keys(config: SLAConfig, text_tokens: tuple | None, query_len: int, key_len: int):
    """The key range (start, end) of a joint call's text tokens when `config.protect_text` protects them, else None.
    Only self/joint calls (queries and keys the same sequence) hold the text among image tokens."""
    if not config.protect_text or text_tokens is None or query_len != key_len:
        return None
    position, n = text_tokens
    if not 0 < n < key_len:
        return None
    return (0, n) if position == "first" else (key_len - n, key_len)


def _forced_counts(config: SLAConfig, forced_keys, keep_rows) -> list[int] | None:
    # forced key blocks per sample, counted among each sample's kept keys
    if forced_keys is None:
        return None
    start, end = forced_keys
    counts = []
    for keep in keep_rows:
        s, e = (start, end) if keep is None else (int(keep[:start].sum()), int(keep[:end].sum()))
        lo, hi = forced_block_range(s, e, config.blkk)
        counts.append(hi - lo)
    return counts


def _run_sla(attn: torch.nn.Module, processor, call: dict, key_padding_mask: torch.Tensor | None,
             deferred_mask: torch.Tensor | None = None, text_tokens: tuple | None = None):
    query, key, value = call["query"], call["key"], call["value"]
    q, k, v = _as_4d(query), _as_4d(key), _as_4d(value)
    if k.shape[1] != q.shape[1]:
        # Grouped key/value heads (GQA): query head h reads key/value head h // group, as SDPA's enable_gqa does.
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    layer = processor._sla_layer_for(attn, q)
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
        density = _density(layer.config, [k.shape[2]], _forced_counts(layer.config, forced, [None]))
    elif torch.compiler.is_compiling():
        density = None  # depends on the mask's values: reading them would break the compiled graph
    else:
        density = _density(layer.config, key_padding_mask.sum(dim=1).tolist(),
                           _forced_counts(layer.config, forced, list(key_padding_mask)))
    return (out.squeeze(1) if query.ndim == 3 else out), density


# ===== Ulysses context parallelism =====
#
# Under diffusers' context parallelism the native backend sends the attention calls it parallelizes (those to which
# the processor passes its parallel config: Wan's self-attention, not its cross-attention over the unsharded text)
# to `attention_dispatch._templated_context_parallel_attention` with this rank's sequence shard of q, k, v in
# (batch, seq, heads, head_dim). Its Ulysses path is an autograd Function whose backward recomputes dense SDPA, so
# inside an SLA processor call we take that function's place: SLA calls run `ulysses_sparse_linear_attention`
# (all-to-all to heads, SLA over every token, all-to-all back, autograd through all of it); dense calls, other
# attention backends and calls outside an SLA processor run diffusers' function unchanged. Ring never gets here:
# `SLAAttnProcessor` refuses it first (`parallel.check_context_parallel`).

_original_templated = None


def install_context_parallel_router() -> None:
    """Install `_sla_templated_attention` in diffusers' attention dispatch (idempotent)."""
    global _original_templated
    from diffusers.models import attention_dispatch

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
    from diffusers.models.attention_dispatch import _native_attention_forward_op

    from .parallel import context_parallel_degrees, ulysses_group, ulysses_sparse_linear_attention

    def diffusers_attention():
        with _no_routing():
            return _original_templated(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                                       return_lse, forward_op=forward_op, backward_op=backward_op,
                                       _parallel_config=_parallel_config)

    scope = getattr(_local, "scope", None)
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
        view = dict(_SDPA_DEFAULTS, query=_global_view(query, world), key=_global_view(key, world),
                    value=_global_view(value, world), dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        reason = route_attention_call(attn, processor.config, view).reason
    if reason is None and query.shape[2] % world:
        reason = "unsupported_shape"  # diffusers' Ulysses needs the heads divisible by the degree as well
    if reason is not None:
        record_call(attn, reason)
        processor._log_dense_once(reason, attn, None)
        return diffusers_attention()
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))  # (B, H, L_local, D)
    layer = processor._sla_layer_for(attn, q)
    config = layer.config
    if config.protect_text and scope.text_tokens is not None:
        # each rank's shard holds a piece of the text, so the text is not one key range of the gathered sequence
        from .processor import _log_once

        _log_once(("cp_protect_text", type(attn)), logging.WARNING,
                  "SLA under context parallelism (Ulysses) does not protect the text tokens (SLAConfig.protect_text): "
                  "the joint sequence's text is spread over the shards; these calls select blocks as with "
                  "protect_text=False.")
    with _no_routing():
        out = layer.call_with_weights(lambda weight, bias: ulysses_sparse_linear_attention(
            q, k, v, weight, bias, group=ulysses_group(_parallel_config), config=config, scale=scale,
            backend=layer.backend))
    record_call(attn, None, _density(config, [k.shape[2] * world]))
    return out.permute(0, 2, 1, 3)


def sla_layer_of(attn: torch.nn.Module):
    return attn._modules.get(SLA_MODULE_NAME)


# ===== Masks under torch.compile =====
#
# Eager calls read a mask's values on the host to decide (a key padding mask or not, any key masked at all) and
# then gather each sample's kept keys. Compiled code cannot branch on tensor values, so there the whole decision and
# computation is one opaque op with a static output shape: `masked_sla` reads the mask when it runs and does exactly
# what the eager route does with it (SLA over the kept keys for a key padding mask, the original SDPA with the mask
# for any other). Its backward recomputes the forward under autograd (an opaque op as well).


def _masked_forward(q, k, v, weight, bias, attn_mask, query_ndim, topk, blkq, blkk, feature_map, linear_scope,
                    scale, backend, force_start=0, force_end=0):
    from .ops.api import sparse_linear_attention

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
                from concurrent.futures import ThreadPoolExecutor

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
