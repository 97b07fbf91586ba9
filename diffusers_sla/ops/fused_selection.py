# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Block selection on the Triton kernels (`kernels/selection.py`): `selection.select_blocks` without its float32
copies of q and k and without a host synchronisation.

Same roundings and the same scores as the PyTorch selection; only the order of the float32 sums inside a block (and
of the score products' float32 sums) differs, and the top-k returns the same indices, ties to the lower index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import buffers, tuning
from .buffers import block_d, split, strides
from .kernels import selection as kernels
from .launch import Launcher
from .selection import force_scores, num_blocks, num_forced, num_kept_blocks

# launched with less host work per call (launch.py): an eager forward at a long sequence can wait on their host time
ROW_SUMS, KEY_MEAN, BLOCK_MEAN, TOP_BLOCKS = (
    Launcher(kernel) for kernel in (kernels.row_sums, kernels.key_mean, kernels.block_mean, kernels.top_blocks_kernel))

# the Triton element type of each input dtype (for roundings inside kernels that do not read the tensor itself)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
              torch.float64: tl.float64}


def row_sum_parts(x: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """(B, H, L, D) -> (B*H, parts, BLOCK_D) float32 sums of x over consecutive ranges of `chunk` rows (`row_sums`;
    0: sized to fill the GPU): the key mean's first pass, whose few parts `key_mean` adds in a fixed order."""
    B, H, L, D = x.shape
    bd, rows = block_d(D), tuning.ROW_SUMS_ROWS
    if not chunk:
        tiles = max(1, num_blocks(L, rows))
        chunk = num_blocks(tiles, min(split(tiles, B * H, tuning.ROW_SUMS_TARGET), tuning.ROW_SUMS_MAX_PARTS)) * rows
    n_part = max(1, num_blocks(L, chunk))
    parts = torch.empty(B * H, n_part, bd, device=x.device, dtype=torch.float32)
    ROW_SUMS[(n_part, B * H)](x, parts, *strides(x), H, L, chunk, n_part, HEAD_DIM=D, BLOCK_D=bd,
                              BLOCK_M=rows, num_warps=tuning.ROW_SUMS_WARPS, num_stages=tuning.ROW_SUMS_STAGES)
    return parts


def block_means(x: torch.Tensor, block: int, center: bool, round_to_input: bool = False) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, n, D) float32 block means of x (or of `x - mean(x)` rounded to x's dtype, as
    `selection.block_scores` centres keys), in one pass over x (two with `center`: the mean's row sums first, then
    one tiny launch adds them up per head). `round_to_input`: rounded to x's dtype and returned in it."""
    B, H, L, D = x.shape
    n, bd = num_blocks(L, block), block_d(D)
    mean = torch.empty(B * H if center else 0, bd, device=x.device, dtype=torch.float32)
    if center:
        parts = row_sum_parts(x)
        KEY_MEAN[(B * H,)](parts, mean, parts.shape[1], L, BLOCK_D=bd,
                           PART_P2=triton.next_power_of_2(parts.shape[1]), DTYPE=_TL_DTYPES[x.dtype], num_warps=2)
    out = torch.empty(B, H, n, D, device=x.device, dtype=x.dtype if round_to_input else torch.float32)
    BLOCK_MEAN[(n, B * H)](x, mean, out, *strides(x), H, L, n, HEAD_DIM=D, BLOCK_D=bd, BLOCK=block,
                           CENTER=center, num_warps=tuning.BLOCK_MEAN_WARPS, num_stages=1)
    return out


def select_blocks_triton(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int, blkk: int, force_start: int = 0,
                         force_end: int = 0) -> torch.Tensor:
    """`selection.select_blocks` with its pooling fused into one Triton pass per tensor (the PyTorch version makes
    float32 copies of q and k) and its top-k in one Triton launch (`top_blocks_triton`: the same indices as
    `selection.top_blocks`). Same roundings and the same scores; only the order of the float32 sums inside a block
    (and of the score products' float32 sums) differs. Key blocks [force_start, force_end) are in every row
    (`selection.force_scores`). -> int32 (B, H, n_q, kept), ascending rows."""
    return rank_blocks(*pooled_for_selection(q, k, blkq, blkk), topk, (force_start, force_end))


def pooled_for_selection(q, k, blkq, blkk):
    """The selection's passes over q and k: q's block means and k's centred block means, rounded to the input dtype
    inside the kernel and stored in it (float32/float64 inputs: float32)."""
    half = q.dtype in (torch.float16, torch.bfloat16)
    return (block_means(q, blkq, center=False, round_to_input=half),
            block_means(k, blkk, center=True, round_to_input=half))


def block_scores(pooled_q, pooled_k):
    # 16-bit operands, float32 accumulation, scores rounded to the input dtype: what `selection.block_scores`
    # computes (its operands are those rounded values, its products exact in float32), on the tensor cores
    return pooled_q @ pooled_k.transpose(-1, -2)


def rank_blocks(pooled_q, pooled_k, topk, forced_blocks=(0, 0)):
    """The block map from the pooled q and k: scores, forced blocks, top-k."""
    scores = force_scores(block_scores(pooled_q, pooled_k), forced_blocks)
    return top_blocks_triton(scores, num_kept_blocks(topk, scores.shape[-1], num_forced(forced_blocks)))


def top_blocks_triton(scores: torch.Tensor, kept: int) -> torch.Tensor:
    """`selection.top_blocks` in one Triton launch (one program per row): the same indices, ties to the lower index.
    `scores` in any float dtype (ranked as their float32 values).
    -> int32 (..., kept), ascending rows."""
    return _top_blocks(scores, kept)[0]


def top_blocks_and_rest(scores: torch.Tensor, kept: int, dtype: torch.dtype, z_blocks: torch.Tensor,
                        z_parts: torch.Tensor):
    """`top_blocks_triton` and, from the same launch, what `linear_state.rest_weights(lut, n_k, dtype, z_blocks,
    z_parts)` returns (the 0/1 matrix W in `dtype` and z_i, bit for bit): scope "rest" in eager calls, where the linear
    state is ready before the top-k runs. scores: (B, H, n_q, n_k). -> (lut, W, z_i)."""
    return _top_blocks(scores, kept, (dtype, z_blocks, z_parts))


def _top_blocks(scores, kept, rest=None):
    n_k = scores.shape[-1]
    lut = torch.empty(*scores.shape[:-1], kept, device=scores.device, dtype=torch.int32)
    rows = lut.numel() // kept if kept else 0
    if rest is None:
        w = zi = zb = zs = lut.new_empty(0, dtype=torch.float32)
        n_qblk, n_split, bd = 1, 0, 16
    else:
        dtype, zb, zs = rest
        B, H, n_qblk, _ = scores.shape
        n_split, bd = zs.shape[1], zb.shape[-1]
        w = torch.empty(B, H, n_qblk, n_k, device=scores.device, dtype=dtype)
        zi = buffers.empty(B, H, n_qblk, bd, device=scores.device, dtype=torch.float32)
    if rows:
        n_k_p2 = triton.next_power_of_2(n_k)
        TOP_BLOCKS[(rows,)](scores.contiguous(), lut, w, zb, zs, zi, n_k, kept, n_qblk, n_split,
                            N_K_P2=n_k_p2, REST=rest is not None, BLOCK_D=bd,
                            num_warps=tuning.TOPK_WARPS or (1 if n_k_p2 <= 512 else 4 if n_k_p2 <= 1024 else 8))
    return lut, w, zi
