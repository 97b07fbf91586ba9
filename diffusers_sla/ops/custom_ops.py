# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`torch.library` ops around the Triton kernels, and the eager path that skips them.

`diffusers_sla::select_blocks` (`fused_selection`), `diffusers_sla::sla_fwd` (`forward`) and
`diffusers_sla::sla_bwd` (`backward`) are opaque to `torch.compile` (no graph break), each with a `register_fake`
twin that only allocates correctly shaped outputs. Inputs are dense (B, H, L, D) tensors of one dtype (any strides);
`lut` is the int32 (B, H, n_q, kept) ascending block map from `selection.select_blocks`. Everything here runs on the
device without host synchronisation.

Eager calls (`select_blocks_fused`, `forward`, `backward`, `select_and_forward`: what `autograd.py` calls) run the
implementations directly: the torch.library dispatch costs host time of the order of a short sequence's GPU work.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from . import backward as _backward_stage
from . import buffers, tuning
from . import forward as _forward_stage
from .buffers import geometry, side_shapes, tma_ready
from .fused_selection import (block_scores, pooled_for_selection, rank_blocks, select_blocks_triton,
                              top_blocks_and_rest)
from .linear_state import linear_state_of
from .selection import force_scores, num_blocks, num_forced, num_kept_blocks

fast_select_blocks = torch.library.custom_op("diffusers_sla::select_blocks", mutates_args=())(select_blocks_triton)


@fast_select_blocks.register_fake
def _(q, k, topk, blkq, blkk, force_start=0, force_end=0):
    B, H, Lq, _ = q.shape
    n_kblk = num_blocks(k.shape[2], blkk)
    kept = num_kept_blocks(topk, n_kblk, num_forced((force_start, force_end)))
    return q.new_empty(B, H, num_blocks(Lq, blkq), kept, dtype=torch.int32)


sla_fwd = torch.library.custom_op("diffusers_sla::sla_fwd", mutates_args=())(_forward_stage.sla_fwd)


@sla_fwd.register_fake
def _(q, k, v, proj_weight, proj_bias, lut, scale, feature_map, linear_scope, blkq, blkk, store_bwd, dot_precision,
      gate=None, gate_lse=False):
    g = geometry(q, k, lut, blkq, blkk, linear_scope, mixed=gate is not None)
    B, H, Lq, block_d, has_linear = g.B, g.H, g.Lq, g.block_d, g.has_linear
    s_den, s_ol, s_rb, s_zb = side_shapes(q, g.n_qblk, block_d, store_bwd, g.rest, has_linear)
    f32 = dict(device=q.device, dtype=torch.float32)
    # only "all" with a linear branch keeps the totals ("rest" reads R_i, z_i; no linear branch: no state at all)
    totals = linear_scope == "all" and has_linear
    return (torch.empty_like(q), torch.empty(B, H, Lq, **f32), torch.empty(s_den, **f32), q.new_empty(s_ol),
            q.new_empty(s_rb), torch.empty(s_zb, **f32),
            torch.empty((B, H, block_d, block_d) if totals else (0,), **f32),
            torch.empty((B, H, block_d) if totals else (0,), **f32))


sla_bwd = torch.library.custom_op("diffusers_sla::sla_bwd", mutates_args=())(_backward_stage.sla_bwd)


@sla_bwd.register_fake
def _(do, q, k, v, proj_weight, proj_bias, o, lse, den, o_l, rb, zb, ht, zt, lut, scale, feature_map, linear_scope,
      blkq, blkk, dot_precision, gate=None, gate_lse=False):
    D = q.shape[-1]
    f32 = dict(device=q.device, dtype=torch.float32)
    proj = linear_scope != "none"
    return (q.new_empty(q.shape), q.new_empty(k.shape), q.new_empty(k.shape),
            torch.empty((D, D) if proj else (0,), **f32), torch.empty((D,) if proj else (0,), **f32),
            torch.empty(q.shape[:3] if gate is not None else (0,), **f32))


def eager_or_op(op, impl, name):
    """`op` while torch.compile traces (an opaque node, no graph break); `impl` itself in eager mode, which skips the
    torch.library dispatch and its host time."""

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        with torch.no_grad():
            return impl(*args)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = impl.__doc__
    return call


# What `autograd.py` calls.
select_blocks_fused = eager_or_op(fast_select_blocks, select_blocks_triton, "fast_select_blocks")
forward = eager_or_op(sla_fwd, _forward_stage.sla_fwd, "sla_fwd")
backward = eager_or_op(sla_bwd, _backward_stage.sla_bwd, "sla_bwd")


@functools.lru_cache(maxsize=None)
def _side_stream(device_index: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device_index)


def select_and_forward(q_sel, k_sel, q, k, v, proj_weight, proj_bias, topk, scale, feature_map, linear_scope, blkq,
                       blkk, store_bwd, dot_precision, forced_blocks=(0, 0)):
    """`select_blocks_fused(q_sel, k_sel, ...)` then `forward(q, k, v, ..., lut, ...)`, -> (lut, forward's outputs).

    With `tuning.OVERLAP`, outside torch.compile: the same kernels in another order. The selection's pooling (passes
    over q and k) and the linear state (a pass over k and v) need nothing from each other: the linear state runs on
    the caller's stream and the pooling on a second stream when the tensors are on the GPU (one after the other
    elsewhere), joined before the scores and the top-k, which stay on the caller's stream (a cuBLAS call on another
    stream costs more host time than its GPU work). Same outputs, bit for bit."""
    if not tuning.OVERLAP or torch.compiler.is_compiling():
        lut = select_blocks_fused(q_sel, k_sel, topk, blkq, blkk, *forced_blocks)
        return lut, forward(q, k, v, proj_weight, proj_bias, lut, scale, feature_map, linear_scope, blkq, blkk,
                            store_bwd, dot_precision)
    with torch.no_grad():
        g = geometry(q, k, None, blkq, blkk, linear_scope, topk, num_forced(forced_blocks))
        side = None
        if q.is_cuda:
            main, side = torch.cuda.current_stream(q.device), _side_stream(q.device.index)
            side.wait_stream(main)  # for the producers of q_sel and k_sel, not for the linear state queued next
        buffers.use_descriptors()
        qd, kd, vd = tma_ready(q), tma_ready(k), tma_ready(v)
        state = linear_state_of(kd, vd, g, blkk, feature_map, dot_precision)
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            pooled = pooled_for_selection(q_sel, k_sel, blkq, blkk)
        if side is not None:
            main.wait_stream(side)
            for x in pooled:  # made on the side stream, read on the caller's: not reused before that read is done
                x.record_stream(main)
        rest_weights = None
        if g.rest and g.has_linear:  # the top-k's launch also builds the 0/1 matrix and z_i (one launch fewer)
            scores = force_scores(block_scores(*pooled), forced_blocks)
            lut, *rest_weights = top_blocks_and_rest(scores, g.kept, q.dtype, state.zkb, state.z_parts)
        else:
            lut = rank_blocks(*pooled, topk, forced_blocks)
        return lut, _forward_stage.attend(q, qd, kd, vd, proj_weight, proj_bias, lut, state, g, scale, feature_map,
                                          blkq, blkk, store_bwd, dot_precision, rest_weights)
