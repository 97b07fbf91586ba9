# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Block selection in Triton: the pooling of q and k into block means, and the top-k of each row of block scores.

The same function as `selection.select_blocks` (its PyTorch form): q's block means, k's block means after the key
mean is subtracted (rounded to the input dtype as PyTorch rounds them), and the `kept` largest scores of each row,
ties to the lower index. Host side: `ops/fused_selection.py`.

    row_sums -> key_mean      the key mean in two passes (many programs stream the rows, one per head adds them)
    block_mean                one pass per tensor: a block's mean, of x or of x - key mean
    top_blocks_kernel         one program per row of scores: a bisection for the kept-th largest, then the indices
"""

import triton
import triton.language as tl

from .common import head_base, program_ids
from .linear_state import z_rest


@triton.jit
def row_sums(X, Parts,  #
              stride_xz, stride_xh, stride_xm, stride_xk,  #
              H, N_CTX, CHUNK, N_PART,  #
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # First pass of the key mean: the float32 sum of rows [part * CHUNK, (part + 1) * CHUNK) of one head, written to
    # Parts (B*H, N_PART, BLOCK_D). Many programs, each streaming its rows, read x as fast as the pooling pass does
    # (faster than a torch mean over the rows); `key_mean` adds the parts in a fixed order.
    part, off_hz, off_z, off_h = program_ids(H)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_D)
    d_ok = offs_k < HEAD_DIM
    X = head_base(X, off_z, off_h, stride_xz, stride_xh)
    end = tl.minimum(part * CHUNK + CHUNK, N_CTX)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for m0 in range(part * CHUNK, end, BLOCK_M):
        rows = m0 + offs_m
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(rows < end)[:, None] & d_ok[None, :], other=0.0)
        acc += x.to(tl.float32)
    tl.store(Parts + (off_hz.to(tl.int64) * N_PART + part) * BLOCK_D + offs_k, tl.sum(acc, 0))


@triton.jit
def key_mean(Parts, Mean, N_PART, N_CTX, BLOCK_D: tl.constexpr, PART_P2: tl.constexpr, DTYPE: tl.constexpr):
    # Second pass of the key mean, one program per head: (sum of the N_PART row sums of `row_sums`, in a fixed order)
    # / N_CTX, rounded to the keys' dtype DTYPE as `selection.block_scores` rounds k.mean(); float32 (B*H, BLOCK_D).
    # Once per head, so that each pooling program reads one vector, not its head's parts (which can outweigh a block).
    off_hz = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, PART_P2)
    parts = tl.load(Parts + (off_hz * N_PART + offs_p[:, None]) * BLOCK_D + offs_k[None, :],
                    mask=(offs_p < N_PART)[:, None], other=0.0)
    tl.store(Mean + off_hz * BLOCK_D + offs_k, (tl.sum(parts, 0) / N_CTX).to(DTYPE).to(tl.float32))


@triton.jit
def block_mean(X, Mean, Out,  #
                stride_xz, stride_xh, stride_xm, stride_xk,  #
                H, N_CTX, N_BLK,  #
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, CENTER: tl.constexpr):
    # Block selection's pooling in one pass: mean over each block's real rows in float32, of x or (for keys) of
    # x - mean rounded to x's dtype, as `selection.block_scores` computes it with several PyTorch passes.
    # CENTER: Mean is the head's rounded key mean (`key_mean`, float32 (B*H, BLOCK_D)).
    blk, off_hz, off_z, off_h = program_ids(H)
    offs_m = blk * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_CTX
    d_ok = offs_k < HEAD_DIM
    x = tl.load(head_base(X, off_z, off_h, stride_xz, stride_xh) + offs_m[:, None] * stride_xm +
                offs_k[None, :] * stride_xk, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    xf = x.to(tl.float32)
    if CENTER:
        mu = tl.load(Mean + off_hz.to(tl.int64) * BLOCK_D + offs_k)
        xf = tl.where(m_ok[:, None], (xf - mu[None, :]).to(x.dtype).to(tl.float32), 0.0)
    count = tl.minimum(N_CTX - blk * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(xf, 0) / count
    # Out in x's 16-bit dtype rounds the pooled vectors as `selection.block_scores` does; in float32 it keeps them
    tl.store(Out + (off_hz.to(tl.int64) * N_BLK + blk) * HEAD_DIM + offs_k, mean.to(Out.dtype.element_ty), mask=d_ok)


@triton.jit
def _kth_largest(ordered, valid, KEPT):
    # The KEPT-th largest of the int32 values `ordered` over the lanes where `valid` (1 <= KEPT <= their count): a
    # bisection over the int32 range, each of its 32 steps one compare and one sum over the row (a sort of the row
    # costs ~45 compare-exchange passes).
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in tl.static_range(32):
        mid = lo + (hi - lo + 1) // 2
        count = tl.sum(((ordered >= mid.to(tl.int32)) & valid).to(tl.int32), 0)
        above = count >= KEPT
        lo = tl.where(above, mid, lo)
        hi = tl.where(above, hi, mid - 1)
    return lo.to(tl.int32)


@triton.jit
def top_blocks_kernel(S, LUT, W, ZB, ZS, ZI, N_K, KEPT, N_QBLK, N_SPLIT,  #
                       N_K_P2: tl.constexpr, REST: tl.constexpr, BLOCK_D: tl.constexpr):
    # Block selection's top-k for one row of scores (any float dtype, ranked as float32): the KEPT largest, ties to the
    # lower index (as `selection.top_blocks`), written ascending. Each score's float32 bits become an order-preserving
    # int32; the KEPT-th largest value comes from a bisection (`_kth_largest`); every larger score is chosen, and of
    # the scores equal to it the lowest indices, as many as are still needed; a prefix sum places the chosen indices
    # in order.
    # REST (scope "rest" in eager calls, where the linear state is ready when the top-k runs): this program also
    # writes its row of the 0/1 matrix W (1 = not selected) in W's dtype and z_i (`z_rest`), which
    # `rest_weights_kernel` would otherwise build from the LUT in a launch of its own.
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, N_K_P2)
    valid = offs < N_K
    s = tl.load(S + row * N_K + offs, mask=valid, other=float("-inf")).to(tl.float32)
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 ties with +0.0, as in a float sort
    bits = s.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # signed-integer order = float order
    kth = _kth_largest(ordered, valid, KEPT)
    above = (ordered > kth) & valid
    tied = (ordered == kth) & valid
    still_needed = KEPT - tl.sum(above.to(tl.int32), 0)
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= still_needed))
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    tl.store(LUT + row * KEPT + slot, offs.to(tl.int32), mask=chosen)
    if REST:
        tl.store(W + row * N_K + offs, tl.where(chosen, 0.0, 1.0).to(W.dtype.element_ty), mask=valid)
        tl.debug_barrier()  # the LUT row just stored, read back by `z_rest` (other lanes wrote it)
        z_rest(LUT, ZB, ZS, ZI, row, row // N_QBLK, N_K, KEPT, N_SPLIT, BLOCK_D)
