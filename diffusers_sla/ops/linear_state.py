# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The linear branch's state on the Triton kernels (`kernels/linear_state.py`): what k and v alone contribute.

Scope "all": the per-head totals H = sum phi(k)^T v and Z = sum phi(k). Scope "rest": each key block's h_j, z_j, and
for each query block R_i = the sum of the h_j it did not select (a 0/1 matrix product: no cancellation) and
z_i = Z - the z_j it selected (`rest_weights`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from . import buffers, tuning
from .buffers import Geometry, split, strides, tma_ready, use_descriptors
from .kernels import linear_state as kernels
from .kernels.common import FEATURE_MAPS, is_cuda
from .launch import Launcher
from .selection import num_blocks

# launched with less host work per call (launch.py): an eager forward at a long sequence can wait on their host time
LINEAR_STATE, REST_WEIGHTS = Launcher(kernels.linear_state), Launcher(kernels.rest_weights_kernel)


def linear_totals(k, v, blkk, block_d, feature_map, dot_precision, store_blocks=False):
    """Without `store_blocks` (scope "all"): per-head H = sum phi(k)^T v (B, H, BLOCK_D, BLOCK_D) and
    Z = sum phi(k) (B, H, BLOCK_D), float32. With `store_blocks` ("rest", where H is not used): each key block's h_j
    (B, H, n_k, BLOCK_D, BLOCK_D) in k's dtype and z_j (B, H, n_k, BLOCK_D) float32, an empty H, and in place of Z its
    float32 partial sums, one per split of the key blocks (B*H, splits, BLOCK_D), which `kernels.linear_state.z_rest`
    adds. -> H, Z, h_j, z_j."""
    B, H, Lk, D = k.shape
    n_kblk = num_blocks(Lk, blkk)
    use_descriptors()
    kd, vd = tma_ready(k), tma_ready(v)
    if store_blocks:
        n_split = split(n_kblk, B * H, tuning.BLOCKS_TARGET)
        hs = k.new_empty(0, dtype=torch.float32)
        hb = buffers.empty(B, H, n_kblk, block_d, block_d, device=k.device, dtype=k.dtype)
        zb = buffers.empty(B, H, n_kblk, block_d, device=k.device, dtype=torch.float32)
    else:
        n_split = split(n_kblk, B * H, tuning.TOTALS_TARGET)
        hs = buffers.empty(B * H, n_split, block_d, block_d, device=k.device, dtype=torch.float32)
        hb, zb = k.new_empty(0), k.new_empty(0, dtype=torch.float32)
    zs = buffers.empty(B * H, n_split, block_d, device=k.device, dtype=torch.float32)
    LINEAR_STATE[(n_split, B * H)](
        kd, vd, hb, zb, hs, zs, *strides(kd), *strides(vd), H, Lk, n_kblk, n_split, B * H * n_kblk * block_d,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_N=blkk, FEATURE_MAP=FEATURE_MAPS[feature_map], STORE_BLOCKS=store_blocks,
        DOT_PREC=dot_precision,
        num_warps=tuning.LINEAR_STATE_WARPS or (8 if store_blocks and blkk > 64 and block_d > 64 else 4),
        num_stages=(tuning.LINEAR_STATE_STAGES or 2) if is_cuda() else 1,
    )
    if store_blocks:
        return hs, zs, hb, zb
    return hs.sum(1).view(B, H, block_d, block_d), zs.sum(1).view(B, H, block_d), hb, zb


def rest_weights(lut: torch.Tensor, n_kblk: int, dtype: torch.dtype, z_blocks: torch.Tensor | None = None,
                 z_parts: torch.Tensor | None = None):
    """The (B, H, n_q, n_k) 0/1 matrix that is 1 where key block j feeds query block i's linear branch ("rest": not
    selected), in `dtype`, and in the same launch either the matrix in float32 (backward: dz_j = W^T dz_i) or, given
    the per-key-block z_j (B, H, n_k, BLOCK_D) and Z's per-split partials from `linear_totals(store_blocks=True)`,
    z_i = Z - the z_j query block i selected (forward), (B, H, n_q, BLOCK_D) float32. -> (W, W32 or z_i).
    Eager forwards get both from the top-k's launch instead (`fused_selection.top_blocks_and_rest`), same bits."""
    B, H, n_qblk, kept = lut.shape
    w = torch.empty(B, H, n_qblk, n_kblk, device=lut.device, dtype=dtype)
    z_rest = z_blocks is not None
    if z_rest:
        block_d, n_split = z_blocks.shape[-1], z_parts.shape[1]
        second = buffers.empty(B, H, n_qblk, block_d, device=lut.device, dtype=torch.float32)
        w32 = w.new_empty(0, dtype=torch.float32)
        zb, zs, zi = z_blocks, z_parts, second
    else:
        block_d, n_split = 16, 0
        second = w32 = torch.empty(B, H, n_qblk, n_kblk, device=lut.device, dtype=torch.float32)
        zb = zs = zi = w32.new_empty(0)
    lut = lut.contiguous()
    REST_WEIGHTS[(n_qblk, B * H)](lut, w, w32, zb, zs, zi, n_qblk, n_kblk, kept, n_split,
                                  KEPT_P2=triton.next_power_of_2(kept), BLOCK_J=128, BLOCK_D=block_d,
                                  STORE_W32=not z_rest, Z_REST=z_rest, num_warps=4)
    return w, second


class LinearState(NamedTuple):
    """What the linear branch needs from k and v alone (`linear_totals`): the per-head totals H, Z (scope "all";
    empty for "rest"), and for "rest" each key block's h_j, z_j and Z's per-split partials (else empty / None)."""

    ht: torch.Tensor
    zt: torch.Tensor
    hb: torch.Tensor
    zkb: torch.Tensor
    z_parts: torch.Tensor | None


def linear_state_of(kd, vd, g: Geometry, blkk, feature_map, dot_precision) -> LinearState:
    if not g.has_linear:  # no kernel reads a linear state ("none"; "rest" with every block selected): skip the pass
        ht, zt, hb, zkb = (kd.new_empty(0, dtype=torch.float32) for _ in range(4))  # distinct: ht, zt are op outputs
        return LinearState(ht, zt, hb, zkb, None)
    ht, zt, hb, zkb = linear_totals(kd, vd, blkk, g.block_d, feature_map, dot_precision,
                                    store_blocks=g.rest and g.has_linear)
    if g.rest and g.has_linear:  # zt holds Z's per-split partials, read by `rest_weights` only
        return LinearState(ht, zt.new_empty(0), hb, zkb, zt)
    return LinearState(ht, zt, hb, zkb, None)
