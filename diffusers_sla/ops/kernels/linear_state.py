# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The linear branch's state in Triton: what phi(k) and v contribute, before the attention kernel reads it.

For scope "all" the attention epilogue reads the per-head totals H = sum_j phi(k_j)^T v_j and Z = sum_j phi(k_j).
For "rest" each query block reads R_i = the sum of the per-key-block h_j over the blocks it did not select (a 0/1
matrix product on the host side) and z_i = Z - the z_j it selected, formed here, so that the attention loop holds no
D x D state. Host side: `ops/linear_state.py`.
"""

import triton
import triton.language as tl

from .common import feature_map, head_base, program_ids


@triton.jit
def z_rest(LUT, ZB, ZS, ZI, row, hz, N_KBLK, KEPT, N_SPLIT, BLOCK_D: tl.constexpr):
    # Scope "rest": z_i = Z - the sum of the z_j of the blocks query block `row` selected (LUT row), Z the sum of
    # `linear_state`'s N_SPLIT per-split partials (ZS), into ZI. Every z_j is >= 0 (phi is positive for all three
    # feature maps), so the subtraction cancels nothing: its error stays at float32 rounding of z_i itself (relative
    # ~1e-6 against a product over the unselected blocks). Summed one vector after another, four loads in flight:
    # the same order, and so the same bits, with any number of warps (`top_blocks_kernel` fuses this,
    # `rest_weights_kernel` does it apart).
    offs_k = tl.arange(0, BLOCK_D)
    total = tl.zeros([BLOCK_D], dtype=tl.float32)
    for s0 in range(0, N_SPLIT, 4):
        for u in tl.static_range(4):
            ok = (offs_k * 0 + s0 + u) < N_SPLIT
            total += tl.load(ZS + (hz * N_SPLIT + s0 + u) * BLOCK_D + offs_k, mask=ok, other=0.0)
    for e0 in range(0, KEPT, 4):
        for u in tl.static_range(4):
            ok = (offs_k * 0 + e0 + u) < KEPT
            blk = tl.load(LUT + row * KEPT + tl.minimum(e0 + u, KEPT - 1))
            total -= tl.load(ZB + (hz * N_KBLK + blk) * BLOCK_D + offs_k, mask=ok, other=0.0)
    tl.store(ZI + row * BLOCK_D + offs_k, total)


@triton.jit
def rest_weights_kernel(LUT, W, W32, ZB, ZS, ZI, N_QBLK, N_KBLK, KEPT, N_SPLIT,  #
                         KEPT_P2: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                         STORE_W32: tl.constexpr, Z_REST: tl.constexpr):
    # Scope "rest": the (B*H, n_q, n_k) 0/1 matrix (1 = key block j not selected by query block i) in the compute
    # dtype (W) and, with STORE_W32, in float32 (W32), from the LUT in one launch; with Z_REST also z_i (`z_rest`).
    hz = tl.program_id(1).to(tl.int64)
    row = hz * N_QBLK + tl.program_id(0)
    offs_e = tl.arange(0, KEPT_P2)
    sel = tl.load(LUT + row * KEPT + offs_e, mask=offs_e < KEPT, other=-1)
    for j0 in range(0, N_KBLK, BLOCK_J):
        js = j0 + tl.arange(0, BLOCK_J)
        hit = tl.sum((sel[:, None] == js[None, :]).to(tl.int32), 0)
        w = tl.where(hit > 0, 0.0, 1.0)
        tl.store(W + row * N_KBLK + js, w.to(W.dtype.element_ty), mask=js < N_KBLK)
        if STORE_W32:
            tl.store(W32 + row * N_KBLK + js, w, mask=js < N_KBLK)
    if Z_REST:
        z_rest(LUT, ZB, ZS, ZI, row, hz, N_KBLK, KEPT, N_SPLIT, BLOCK_D)


@triton.jit
def linear_state(K, V, HB, ZB, HS, ZS,  #
                  stride_kz, stride_kh, stride_kn, stride_kk,  #
                  stride_vz, stride_vh, stride_vn, stride_vk,  #
                  H, N_KV, N_KBLK, SPLIT, HB_ROWS,  #
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,  #
                  FEATURE_MAP: tl.constexpr, STORE_BLOCKS: tl.constexpr, DOT_PREC: tl.constexpr):
    # Scope "all" (STORE_BLOCKS off): partial per-head totals H = sum phi(k)^T v and Z = sum phi(k) over key blocks
    # split, split + SPLIT, ... (HS, ZS; summed over the splits on the host side).
    # Scope "rest" (STORE_BLOCKS): each key block's h_j = phi(k_j)^T v_j (B*H, N_KBLK, BLOCK_D, BLOCK_D) in the
    # compute dtype and z_j (B*H, N_KBLK, BLOCK_D) float32, and the partial Z of each split (ZS; H is not used there):
    # R_i = sum of h_j over the blocks query block i did not select is then one 0/1 matrix product (no cancellation,
    # nothing D x D inside the attention loop), z_i = Z - the selected z_j (`rest_weights_kernel`). K/V tiles come
    # through tensor descriptors (rows past N_KV and columns past HEAD_DIM are zeros), h_j leaves through one as well.
    split, off_hz, off_z, off_h = program_ids(H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_D)
    d_ok = offs_k < HEAD_DIM
    K = head_base(K, off_z, off_h, stride_kz, stride_kh)
    V = head_base(V, off_z, off_h, stride_vz, stride_vh)
    desc_k = tl.make_tensor_descriptor(K, shape=[N_KV, HEAD_DIM], strides=[stride_kn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    desc_v = tl.make_tensor_descriptor(V, shape=[N_KV, HEAD_DIM], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    z = tl.zeros([BLOCK_D], dtype=tl.float32)
    if STORE_BLOCKS:
        desc_h = tl.make_tensor_descriptor(HB, shape=[HB_ROWS, BLOCK_D], strides=[BLOCK_D, 1],
                                           block_shape=[BLOCK_D, BLOCK_D])
        for blk in range(split, N_KBLK, SPLIT):
            n_ok = (blk * BLOCK_N + offs_n) < N_KV
            k = desc_k.load([blk * BLOCK_N, 0])
            v = desc_v.load([blk * BLOCK_N, 0])
            phik = tl.where(n_ok[:, None], feature_map(k.to(tl.float32), d_ok, FEATURE_MAP), 0.0).to(v.dtype)
            zj = tl.sum(phik.to(tl.float32), 0)
            z += zj
            hj = tl.dot(tl.trans(phik), v, input_precision=DOT_PREC)
            row = off_hz.to(tl.int64) * N_KBLK + blk
            desc_h.store([(row * BLOCK_D).to(tl.int32), 0], hj.to(HB.dtype.element_ty))
            tl.store(ZB + row * BLOCK_D + offs_k, zj)
    else:
        h = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
        for blk in range(split, N_KBLK, SPLIT):
            n_ok = (blk * BLOCK_N + offs_n) < N_KV
            k = desc_k.load([blk * BLOCK_N, 0])
            v = desc_v.load([blk * BLOCK_N, 0])
            phik = tl.where(n_ok[:, None], feature_map(k.to(tl.float32), d_ok, FEATURE_MAP), 0.0).to(v.dtype)
            z += tl.sum(phik.to(tl.float32), 0)
            h = tl.dot(tl.trans(phik), v, h, input_precision=DOT_PREC)
    base = off_hz.to(tl.int64) * SPLIT + split
    if not STORE_BLOCKS:
        tl.store(HS + base * BLOCK_D * BLOCK_D + offs_k[:, None] * BLOCK_D + offs_k[None, :], h)
    tl.store(ZS + base * BLOCK_D + offs_k, z)
