# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""SLA and diffusers' context parallelism (`ContextParallelConfig`, `model.enable_parallelism`).

Two parts:

* `check_context_parallel`: which context parallelism SLA runs under. Ulysses alone: yes, through
  `ulysses_sparse_linear_attention` (`dispatch._sla_templated_attention` takes the place of diffusers'
  `_templated_context_parallel_attention`, whose Ulysses backward would recompute dense attention). Ring, alone or with
  Ulysses, gives each attention step one shard of the keys while SLA selects its key blocks among all keys: a clear
  error (docs/context-parallel.md has the details).
* `ulysses_sparse_linear_attention`: the head-sharded SLA call, with its autograd through the all-to-all
  collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .ops.api import sparse_linear_attention

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


def ulysses_group(parallel_config):
    """The process group of a diffusers `ParallelConfig`'s Ulysses mesh."""
    cp = getattr(parallel_config, "context_parallel_config", parallel_config)
    return cp._ulysses_mesh.get_group()


# ===== Ulysses: head-sharded SLA =====


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    # The autograd variant of the functional all-to-all: its backward is the inverse all-to-all of the gradient.
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
