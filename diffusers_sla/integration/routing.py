# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The routing policy of `SLAAttnProcessor`: which attention calls run SLA and which run dense, and why.

Pure functions of a call's arguments and the config (the SDPA interception that applies them is `sdpa.py`). The
first rule that applies wins:

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
`"no_sdpa_call"` (`uncaught_reason`), and a call of a module listed in `SLAConfig.dense_layers` (never routed) as
`"dense_layer"`. Dense calls run the original SDPA with the original arguments, so they are exactly what the model
computed before. Each reason's message and log level (`dense_message`, `dense_log_level`) sit beside it here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from diffusers_sla.config import SLAConfig
from diffusers_sla.ops.selection import forced_block_range, num_blocks, num_kept_blocks

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

# Dense reasons that follow the configured policy (logged at INFO); the others mean SLA did not run where a user
# probably expected it (logged at WARNING).
POLICY_REASONS = frozenset({"cross_attention", "short_sequence", "key_padding_mask", "linear_attention"})


def dense_log_level(reason: str) -> int:
    return logging.INFO if reason in POLICY_REASONS else logging.WARNING


def dense_message(reason: str, config: SLAConfig, inner_name: str | None = None, backend_name=None) -> str:
    """Why calls run dense for `reason`, as logged once per processor (`inner_name`: the processor SLA wraps, and
    `backend_name` its attention backend, for the reasons where no SDPA call was made)."""
    c = config
    messages = {
        "unsupported_shape": "attention calls whose tensors are not (batch, heads, seq, head_dim) with matching "
        "key/value shapes run dense",
        "dropout": "attention calls with dropout_p > 0 run dense",
        "causal": "causal attention calls (is_causal=True) run dense",
        "cross_attention": f"cross-attention calls run dense (SLAConfig.cross_attention={c.cross_attention!r}; "
        "set it to 'sla' to run SLA there)",
        "short_sequence": "attention calls with fewer than min_kv_blocks * blkk = "
        f"{c.min_kv_blocks * c.blkk} keys run dense",
        "key_padding_mask": "attention calls with a key padding mask run dense "
        f"(SLAConfig.masked_attention={c.masked_attention!r}; set it to 'sla' to run SLA there)",
        "attention_mask": "attention calls with a mask that is not a key padding mask run dense",
        "attention_backend": f"{inner_name} uses the attention backend {backend_name!r}, which SLA "
        "cannot intercept: those layers run that backend, not SLA. Call "
        "`model.set_attention_backend('native')` to run SLA",
        "no_sdpa_call": f"{inner_name} ran without calling torch's scaled_dot_product_attention, so SLA "
        "did not run there",
        "linear_attention": f"{inner_name} is linear attention (no softmax attention to replace): it "
        "runs unchanged",
    }
    return messages[reason]


def is_linear_attention_processor(processor) -> bool:
    # Sana's self-attention is ReLU linear attention: there is no softmax attention for SLA to replace.
    return "LinearAttn" in type(processor).__name__


def uncaught_reason(inner, backend_name) -> str:
    """The dense reason of a processor call in which `inner` (running attention backend `backend_name`) made no
    SDPA call."""
    if is_linear_attention_processor(inner):
        return "linear_attention"
    if backend_name not in (None, "native") and not str(backend_name).startswith("_native"):
        return "attention_backend"
    return "no_sdpa_call"


@dataclass
class RouteDecision:
    reason: str | None  # None: run SLA; else the dense reason (one of DENSE_REASONS)
    key_padding_mask: torch.Tensor | None = None  # (B, Lk) bool keep-mask for SLA, None when every key is kept
    # Under torch.compile: an SDPA mask shaped like a key padding mask, whose values are read at run time inside one
    # opaque op (`masked_sla`), since a branch on them would break the graph (see `sdpa.masked_sla`).
    deferred_mask: torch.Tensor | None = None


def as_4d(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1) if x.ndim == 3 else x


def shape_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str | None:
    """Dense unless q, k, v are (B, H, L, D) or (B, L, D) with one batch size, v's head_dim equal to k's, and
    key/value heads dividing the query heads."""
    if query.ndim not in (3, 4) or key.ndim != query.ndim or value.ndim != query.ndim:
        return "unsupported_shape"
    q, k, v = as_4d(query), as_4d(key), as_4d(value)
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


def padding_mask_shape(attn_mask: torch.Tensor, batch: int, heads: int, query_len: int, key_len: int,
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
    q, k = as_4d(query), as_4d(key)
    batch, heads, query_len, key_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if is_cross_attention_call(attn, query_len, key_len) and config.cross_attention == "dense":
        return RouteDecision("cross_attention")
    if key_len < config.min_kv_blocks * config.blkk:
        return RouteDecision("short_sequence")
    attn_mask = call["attn_mask"]
    if attn_mask is None:
        return RouteDecision(None)
    if torch.compiler.is_compiling():
        # Only the mask's shape and dtype decide here; its values are checked at run time (`sdpa.masked_sla`).
        if not padding_mask_shape(attn_mask, batch, heads, query_len, key_len, query.ndim):
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


# ===== Density =====


def block_density(config: SLAConfig, key_lengths: list[int], forced: list[int] | None = None) -> float:
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


def forced_counts(config: SLAConfig, forced_keys, keep_rows) -> list[int] | None:
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

