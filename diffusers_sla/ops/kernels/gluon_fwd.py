# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""SLA forward for Hopper (sm_90) in Gluon, Triton's explicit-layout dialect.

The same computation as `triton_fwd.attn_fwd` (read that file first: this one only differs in how the loop is
scheduled). `tl.dot` on Hopper waits for each product as soon as it is issued, so a program's softmax and its tensor
core work never overlap. Here the products are asynchronous `wgmma` instructions:

    wait K[j+1] -> issue S[j+1] = Q K[j+1]^T      (tensor cores)
    softmax of S[j], rescale acc                  (runs while S[j+1] is computed)
    wait V[j]   -> issue acc += P[j] V[j]
    wait for both products; refill the ring slot of step j with the tiles of step j + STAGES (TMA)

(`_step` is one such step; with 64-key tiles the loop takes two per iteration and keeps q in registers.)

K/V tiles of the selected key blocks arrive by TMA into a ring of STAGES shared-memory slots, each with an mbarrier
per tile. Every tensor descriptor is built on the host (`launch`): 4-D (B, H, L, D) boxes for q, k, v and the
output, so any layout with a unit inner stride (diffusers' (B, L, H, D) view included) needs no copy. A query
block of 128 rows runs as two 64-row programs of one warpgroup each (4 warps): two such programs fit on an SM, so
one's epilogue hides behind the other's loop.

The epilogue (linear branch and `proj_l`, as in `attn_fwd`) loads its D x D tiles (R in the input dtype and W in
float32 for a tf32 product, both at once) into the K/V ring, which is free by then: no shared memory of its own. The
output tile leaves by TMA through q's shared memory.

Only compiled on CUDA devices of compute capability 9.0; `ops/forward.py` picks it there (`supports`), the
portable `attn_fwd` everywhere else and under the Triton interpreter, which does not run Gluon.
"""

from __future__ import annotations

import dataclasses
import functools

from .. import gluon_compat as gc
from .. import tuning
from ..launch import Launcher

# Gluon's names differ between Triton releases: `gluon_compat` resolves them (and says on which releases the kernels
# were checked)
TRITON_VERSION = gc.TRITON_VERSION
GLUON_AVAILABLE = gc.AVAILABLE
if GLUON_AVAILABLE:
    from ..gluon_compat import (TensorDescriptor, fence_async_shared, gl, gluon, mbarrier, tma, warpgroup_mma,
                               warpgroup_mma_wait)


def gluon_unavailable_reason() -> str:
    return gc.unavailable_reason()


# BLOCK_N -> (query rows per program, warps, pipeline stages)
LAUNCH = tuning.GLUON_FWD_LAUNCH
# With 64-key tiles the loop keeps q in registers (`_attn_fwd_hopper`, LEAN), except where the register allocation
# spills in that loop; there q is read from shared memory (`benchmarks/offline_compile.py --triton-version` shows both)
Q_IN_REGISTERS = gc.TRITON_VERSION < tuning.GLUON_Q_IN_REGISTERS_BEFORE


def launch_reason(launch: dict, dtype_bytes: int, blkq: int, blkk: int, block_d: int, head_dim: int,
                  dot_precision: str) -> str | None:
    """The launch rules every Hopper kernel shares (`launch`: its table of block_n -> (rows, ...)): None, or why this
    launch breaks them."""
    if dtype_bytes != 2:
        return "inputs must be float16 or bfloat16"
    if dot_precision == "ieee":
        return "full float32 products (dot_precision 'ieee') run on the portable kernel"
    if blkk not in launch:
        return f"blkk must be one of {sorted(launch)} (got {blkk})"
    rows = launch[blkk][0]
    if blkq < rows or blkq % rows:
        return f"blkq must be a multiple of {rows} for blkk={blkk} (got {blkq})"
    if block_d not in (64, 128) or head_dim % 8:
        return f"head_dim must be a multiple of 8 in 33..128 (got {head_dim})"
    return None


def supports(dtype_bytes: int, blkq: int, blkk: int, block_d: int, head_dim: int, kept: int,
             dot_precision: str) -> str | None:
    """None when the Hopper kernel can run this launch, else the reason it cannot (for the error of a forced choice).
    """
    if not GLUON_AVAILABLE:
        return gluon_unavailable_reason()
    reason = launch_reason(LAUNCH, dtype_bytes, blkq, blkk, block_d, head_dim, dot_precision)
    if reason is not None:
        return reason
    if kept < 1:
        return "at least one key block must be selected"
    return None


if GLUON_AVAILABLE:
    _Q_IN_REGISTERS = gl.constexpr(Q_IN_REGISTERS)

    @gluon.jit
    def feature_map_gl(x, d_ok, FEATURE_MAP: gl.constexpr):
        # `common.feature_map` for Gluon tensors: x fp32 (rows, BLOCK_D); padded columns come out as 0.
        if FEATURE_MAP == 0:
            x = gl.where(d_ok[None, :], x, float("-inf"))
            e = gl.exp(x - gl.max(x, 1)[:, None])
            phi = e / gl.sum(e, 1)[:, None]
        elif FEATURE_MAP == 1:
            phi = gl.where(x > 0, x + 1.0, gl.exp(gl.minimum(x, 0.0)))
            phi = gl.where(d_ok[None, :], phi, 0.0)
        else:
            phi = gl.maximum(x, 0.0)
        return phi

    @gluon.jit
    def issue_kv(desc_k, desc_v, LUT, step, KEPT, off_z, off_h, k_slot, v_slot, bar_k, bar_v,
                  BLOCK_N: gl.constexpr, TILE_BYTES: gl.constexpr):
        # TMA loads of the K and V tiles of LUT step `step` into one ring slot (nothing when step >= KEPT); the
        # descriptors are 4-D (B, H, L, D), the slots 2-D: each is viewed as the (1, 1, BLOCK_N, BLOCK_D) box
        ok = step < KEPT
        start_n = gl.load(LUT + step, mask=ok, other=0) * BLOCK_N
        mbarrier.expect(bar_k, TILE_BYTES, pred=ok)
        gc.async_load(desc_k, [off_z, off_h, start_n, 0], bar_k, as_box(k_slot, desc_k), pred=ok)
        mbarrier.expect(bar_v, TILE_BYTES, pred=ok)
        gc.async_load(desc_v, [off_z, off_h, start_n, 0], bar_v, as_box(v_slot, desc_v), pred=ok)

    @gluon.jit
    def init_barriers(n: gl.constexpr):
        # n mbarriers in shared memory, each completed by one arrival (a TMA transaction count on top)
        bars = gl.allocate_shared_memory(gl.int64, [n, 1], mbarrier.MBarrierLayout())
        for s in gl.static_range(n):
            mbarrier.init(bars.index(s), count=1)
        return bars

    @gluon.jit
    def invalidate_barriers(bars, n: gl.constexpr):
        for s in gl.static_range(n):
            mbarrier.invalidate(bars.index(s))

    @gluon.jit
    def as_box(tile, desc):
        # a 2-D shared-memory tile seen as the 4-D box of `desc` (leading unit dims: the same bytes and swizzle)
        return gc.reinterpret(tile, tile.dtype, desc.block_type.shape, desc.layout)

    @gluon.jit
    def _step(j, acc, s_cur, m_i, l_i, start_n, q_op, kv_smem, bar_k, bar_v, LUT, KEPT, N_CTX_KV, off_z, off_h,
              desc_k, desc_v, zero_s, offs_n, qk_scale, dtype: gl.constexpr, p_layout: gl.constexpr,
              o_layout: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, TILE_BYTES: gl.constexpr,
              FOLD_SCALE: gl.constexpr):
        # one step of the loop: s_cur holds this step's scores, start_n its first key
        slot = j % STAGES
        # the next step's scores (on the last step a repeat of this one, never read) run during this softmax
        jn = gl.minimum(j + 1, KEPT - 1)
        mbarrier.wait(bar_k.index(jn % STAGES), (jn // STAGES) & 1)
        s_tok = warpgroup_mma(q_op, kv_smem.index(jn % STAGES).permute((1, 0)), zero_s, use_acc=False,
                              is_async=True)
        next_n = gl.load(LUT + jn) * BLOCK_N

        # online softmax of this step; scores past N_KV are -inf (TMA fills those K rows with zeros). FOLD_SCALE
        # (scale > 0): row max on raw scores, the scale folded into the exponent's FMA
        qk = s_cur if FOLD_SCALE else s_cur * qk_scale
        if start_n + BLOCK_N > N_CTX_KV:  # only a key block that runs past the last key needs the mask
            qk = gl.where(((start_n + offs_n) < N_CTX_KV)[None, :], qk, float("-inf"))
        if FOLD_SCALE:
            m_ij = gl.maximum(m_i, gl.max(qk, 1) * qk_scale)
            p = gl.exp2(qk * qk_scale - m_ij[:, None])
        else:
            m_ij = gl.maximum(m_i, gl.max(qk, 1))
            p = gl.exp2(qk - m_ij[:, None])
        alpha = gl.exp2(m_i - m_ij)
        l_i = l_i * alpha + gl.sum(p, 1)
        acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
        mbarrier.wait(bar_v.index(slot), (j // STAGES) & 1)
        acc_tok = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), kv_smem.index(STAGES + slot), acc,
                                is_async=True)
        acc, s_cur = warpgroup_mma_wait(0, deps=(acc_tok, s_tok))
        m_i = m_ij
        start_n = next_n
        # every warp is done with this slot: refill it with the tiles of step j + STAGES
        gc.barrier()
        issue_kv(desc_k, desc_v, LUT, j + STAGES, KEPT, off_z, off_h, kv_smem.index(slot),
                  kv_smem.index(STAGES + slot), bar_k.index(slot), bar_v.index(slot), BLOCK_N, TILE_BYTES)
        return acc, s_cur, m_i, l_i, start_n

    @gluon.jit
    def _attn_fwd_hopper(desc_q, desc_k, desc_v, desc_o, desc_r, desc_w, LUT, M, Den, OL, ZB, Bias, Gate,  #
                         sm_scale, H, N_CTX_Q, N_CTX_KV, N_QBLK, KEPT,  #
                         HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr,
                         BLOCK_N: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr, REST: gl.constexpr,
                         HAS_LINEAR: gl.constexpr, FEATURE_MAP: gl.constexpr, STORE_BWD: gl.constexpr,
                         EPS: gl.constexpr, FOLD_SCALE: gl.constexpr,
                         HAS_PROJ: gl.constexpr, MIX: gl.constexpr, GATE_LSE: gl.constexpr,
                         num_warps: gl.constexpr):
        # Arguments as `attn_fwd`, except that q, k, v and out come as host-built 4-D (B, H, L, D) tensor
        # descriptors (`launch`) and the linear state as desc_r, over BLOCK_D x BLOCK_D tiles in the input dtype, one
        # per query block for "rest" (R_i), one per head for "all" (the total H), with ZB the matching z vectors
        # (float32); desc_w is proj_l's float32 weight.
        dtype: gl.constexpr = desc_q.dtype
        start_m = gl.program_id(0)
        off_hz = gl.program_id(1)
        off_z = off_hz // H
        off_h = off_hz % H

        # wgmma accumulators (scores: BLOCK_N columns, output: BLOCK_D), P as a register operand of the PV product
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_D, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_D], tile_layout)
        # the ring: K tiles in slots 0..STAGES-1, V tiles in STAGES..2*STAGES-1; the epilogue reuses it
        kv_smem = gl.allocate_shared_memory(dtype, [2 * STAGES, BLOCK_N, BLOCK_D], tile_layout)
        bar_q = init_barriers(1).index(0)
        bar_k = init_barriers(STAGES)
        bar_v = init_barriers(STAGES)

        blk = off_hz.to(gl.int64) * N_QBLK + start_m // SPLIT  # this query block's row in the side tensors
        LUT += blk * KEPT
        TILE_BYTES: gl.constexpr = BLOCK_N * BLOCK_D * 2
        mbarrier.expect(bar_q, BLOCK_M * BLOCK_D * 2)
        gc.async_load(desc_q, [off_z, off_h, start_m * BLOCK_M, 0], bar_q, as_box(q_smem, desc_q))
        for s in gl.static_range(STAGES):
            issue_kv(desc_k, desc_v, LUT, s, KEPT, off_z, off_h, kv_smem.index(s), kv_smem.index(STAGES + s),
                      bar_k.index(s), bar_v.index(s), BLOCK_N, TILE_BYTES)

        offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=gl.SliceLayout(1, s_layout))
        l_i = gl.full([BLOCK_M], 0.0, gl.float32, layout=gl.SliceLayout(1, s_layout))
        acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, layout=o_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        qk_scale = sm_scale * 1.44269504  # 1/log(2)

        mbarrier.wait(bar_q, 0)
        # 64-key tiles: q stays in registers as the A operand of every S product (each product then reads only K
        # from shared memory), and the loop takes two steps per iteration, so that the scores alternate between two
        # register sets instead of being copied out of the product's registers at every step (32 moves per thread).
        # With 128-key tiles both would spill. (q in registers only where that does not spill: `Q_IN_REGISTERS`.)
        LEAN: gl.constexpr = BLOCK_N == 64
        if LEAN and _Q_IN_REGISTERS:
            q_op = q_smem.load(gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2))
        else:
            q_op = q_smem
        mbarrier.wait(bar_k.index(0), 0)
        s_tok = warpgroup_mma(q_op, kv_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
        s_cur = warpgroup_mma_wait(0, deps=(s_tok,))
        start_n = gl.load(LUT) * BLOCK_N
        UNROLL: gl.constexpr = 2 if LEAN else 1
        if KEPT % UNROLL == 1:  # the odd first step of a two-step loop
            acc, s_cur, m_i, l_i, start_n = _step(
                0, acc, s_cur, m_i, l_i, start_n, q_op, kv_smem, bar_k, bar_v, LUT, KEPT, N_CTX_KV, off_z, off_h,
                desc_k, desc_v, zero_s, offs_n, qk_scale, dtype, p_layout, o_layout, BLOCK_N, STAGES, TILE_BYTES,
                FOLD_SCALE)
        for j0 in range(KEPT % UNROLL, KEPT, UNROLL):
            for u in gl.static_range(UNROLL):
                acc, s_cur, m_i, l_i, start_n = _step(
                    j0 + u, acc, s_cur, m_i, l_i, start_n, q_op, kv_smem, bar_k, bar_v, LUT, KEPT, N_CTX_KV, off_z,
                    off_h, desc_k, desc_v, zero_s, offs_n, qk_scale, dtype, p_layout, o_layout, BLOCK_N, STAGES,
                    TILE_BYTES, FOLD_SCALE)

        invalidate_barriers(bar_k, STAGES)
        invalidate_barriers(bar_v, STAGES)

        offs_m = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        gl.store(M + off_hz.to(gl.int64) * N_CTX_Q + offs_m, m_i + gl.log2(l_i), mask=offs_m < N_CTX_Q)
        acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]

        # -- epilogue: linear branch phi(q) R / (phi(q) . z + eps), proj_l in float32 (tf32 product), bias ----
        if HAS_LINEAR:
            # R (input dtype) and W (float32) arrive by TMA into the K/V ring, free now that every product has
            # completed (bar_q, its second phase). Each view is one entry of the whole ring reinterpreted as equal
            # entries (Triton 3.8+ reinterprets only views of the same size, and slices of the 2 * STAGES ring trip
            # a power-of-two assertion), counted in units of one R tile: R in unit 0, W as its two column halves
            # (tf32 products of k = BLOCK_D / 2) in units 1 and 2, and o_l (float32, the A operand of the tf32
            # product) over R once R is read, or past W when it takes more than one unit
            UNITS: gl.constexpr = 2 * STAGES * BLOCK_N // BLOCK_D
            OL_UNITS: gl.constexpr = 2 * BLOCK_M // BLOCK_D
            OL_AT: gl.constexpr = 0 if OL_UNITS == 1 else OL_UNITS * ((3 + OL_UNITS - 1) // OL_UNITS)
            gl.static_assert(UNITS * BLOCK_D == 2 * STAGES * BLOCK_N, "the K/V ring must be whole R tiles")
            gl.static_assert(OL_AT + OL_UNITS <= UNITS and UNITS % OL_UNITS == 0, "the K/V ring must hold R, W, o_l")
            HALF: gl.constexpr = BLOCK_D // 2
            # the layouts of the host-built descriptors (`launch`), so that the copies land as the products read them
            w_layout: gl.constexpr = desc_w.layout
            r_smem = gc.reinterpret(kv_smem, dtype, [UNITS, BLOCK_D, BLOCK_D], desc_r.layout).index(0)
            w_halves = gc.reinterpret(kv_smem, gl.float32, [UNITS, BLOCK_D, HALF], w_layout)
            ol_smem = gc.reinterpret(kv_smem, gl.float32, [UNITS // OL_UNITS, BLOCK_M, BLOCK_D],
                                     w_layout).index(OL_AT // OL_UNITS)
            # o_l's column halves: with a 128-byte swizzle a float32 tile is stored 32 columns at a time, so the
            # first half of a BLOCK_M x BLOCK_D tile is the BLOCK_M x HALF tile at the same address
            ol_halves = gc.reinterpret(kv_smem, gl.float32, [2 * UNITS // OL_UNITS, BLOCK_M, HALF], w_layout)
            r_row = blk if REST else off_hz.to(gl.int64)  # R_i of this query block, or the head's total
            gc.barrier()
            mbarrier.expect(bar_q, BLOCK_D * BLOCK_D * 6)
            gc.async_load(desc_r, [(r_row * BLOCK_D).to(gl.int32), 0], bar_q, r_smem)
            gc.async_load(desc_w, [0, 0], bar_q, w_halves.index(1))
            gc.async_load(desc_w, [0, HALF], bar_q, w_halves.index(2))
            # phi(q) straight in the A-operand layout of the product with R (no layout conversion)
            offs_kp = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, p_layout))
            z = gl.load(ZB + r_row * BLOCK_D + offs_kp)
            phiq = feature_map_gl(q_smem.load(p_layout).to(gl.float32), offs_kp < HEAD_DIM, FEATURE_MAP)
            den = gl.convert_layout(gl.sum(phiq * z[None, :], 1) + EPS, gl.SliceLayout(1, o_layout))
            mbarrier.wait(bar_q, 1)
            num = warpgroup_mma(phiq.to(dtype), r_smem, gl.zeros([BLOCK_M, BLOCK_D], gl.float32, layout=o_layout),
                                use_acc=False)
            o_l = num / den[:, None]
            # acc += o_l W^T in tf32: W is stored (out, in), so its transposed view is the K-major operand tf32
            # needs; a tf32 product takes k = 8 per instruction (its own accumulator layout, same registers)
            gc.barrier()
            ol_smem.store(o_l)
            fence_async_shared()
            proj_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                                  instr_shape=[16, BLOCK_D, 8])
            ol_lo: gl.constexpr = 2 * OL_AT // OL_UNITS
            if MIX:  # o = w o_s + (1 - w) (o_l + o_l W^T + b), the row's w from its gate (`triton_fwd.attn_fwd`)
                lin = warpgroup_mma(ol_halves.index(ol_lo), w_halves.index(1).permute((1, 0)),
                                    gl.convert_layout(o_l, proj_layout), is_async=True)
                lin = warpgroup_mma(ol_halves.index(ol_lo + 1), w_halves.index(2).permute((1, 0)), lin,
                                    is_async=True)
                lin = gl.convert_layout(warpgroup_mma_wait(0, deps=(lin,)), o_layout)
                offs_dm = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, o_layout))
                lin += gl.load(Bias + offs_dm, mask=offs_dm < HEAD_DIM, other=0.0)[None, :]
                rows_o = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
                logit = gl.load(Gate + off_hz.to(gl.int64) * N_CTX_Q + rows_o, mask=rows_o < N_CTX_Q, other=0.0)
                if GATE_LSE:  # + ln Z_sel
                    logit += gl.convert_layout((m_i + gl.log2(l_i)) * 0.6931471805599453, gl.SliceLayout(1, o_layout))
                w = 1.0 / (1.0 + gl.exp(-logit))
                acc = w[:, None] * acc + (1.0 - w)[:, None] * lin
            else:
                acc = warpgroup_mma(ol_halves.index(ol_lo), w_halves.index(1).permute((1, 0)),
                                    gl.convert_layout(acc, proj_layout), is_async=True)
                acc = warpgroup_mma(ol_halves.index(ol_lo + 1), w_halves.index(2).permute((1, 0)), acc,
                                    is_async=True)
                acc = gl.convert_layout(warpgroup_mma_wait(0, deps=(acc,)), o_layout)
            if STORE_BWD:  # den and o_l for the backward, through a coalesced layout
                ep_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
                rows_ep = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ep_layout))
                offs_k = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, ep_layout))
                m_ok = rows_ep < N_CTX_Q
                d_ok = offs_k < HEAD_DIM
                row = off_hz.to(gl.int64) * N_CTX_Q + rows_ep
                gl.store(Den + row, gl.convert_layout(den, gl.SliceLayout(1, ep_layout)), mask=m_ok)
                o_l_ep = gl.convert_layout(o_l.to(dtype), ep_layout)
                gl.store(OL + row[:, None] * HEAD_DIM + offs_k[None, :], o_l_ep,
                         mask=m_ok[:, None] & d_ok[None, :])
        if HAS_PROJ and not MIX:  # off for scope "none" (the sparse part alone): neither W nor the bias is read
            offs_do = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, o_layout))
            acc += gl.load(Bias + offs_do, mask=offs_do < HEAD_DIM, other=0.0)[None, :]
        # the output tile leaves through q's shared memory (no longer read) and TMA, which clips rows past N_CTX_Q
        # and columns past HEAD_DIM
        gc.barrier()
        q_smem.store(acc.to(dtype))
        fence_async_shared()
        gc.async_store(desc_o, [off_z, off_h, start_m * BLOCK_M, 0], as_box(q_smem, desc_o))
        tma.store_wait(0)
        mbarrier.invalidate(bar_q)


    # launched with less host work per call (`ops/launch.py`): its host-built descriptors make it the costliest launch
    LAUNCHER = Launcher(_attn_fwd_hopper)


@functools.lru_cache(maxsize=None)
def tile_layout(element_bits: int, rank: int):
    # built once: constructing a layout object costs more host time than the rest of a descriptor
    return gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=element_bits, rank=rank)


def descriptor(x, box, element_bits: int = 16):
    """A host-built TMA descriptor over all of x (4-D (B, H, L, D) or 2-D), in the 128-byte swizzle the kernel's
    shared-memory tiles use. Built on the host once per call: descriptors built on the device cost each program
    a share of its time in global-memory fences, more than the host time they save.

    Built without the dataclass's checks (`TensorDescriptor.__post_init__`: 16-byte alignment, unit inner stride,
    power-of-two box), which cost more host time than the rest of the launch's arguments together: every caller
    passes a tensor `buffers.tma_ready` made addressable, and a power-of-two box. The fields are the ones
    `TensorDescriptor(...)` would hold (test_gluon_fwd compares them), the defaulted ones included (Triton 3.7 added
    `round_f32_to_tf32`)."""
    desc = object.__new__(TensorDescriptor)
    desc.__dict__.update(_descriptor_defaults())
    desc.__dict__.update(base=x, shape=list(x.shape), strides=list(x.stride()), block_shape=list(box),
                         layout=tile_layout(element_bits, len(box)))
    return desc


@functools.lru_cache(maxsize=None)
def _descriptor_defaults() -> dict:
    # the dataclass fields with a default (padding "zero", ...), as the constructor would set them
    return {f.name: f.default for f in dataclasses.fields(TensorDescriptor) if f.default is not dataclasses.MISSING}


def linear_tiles_2d(tiles, has_linear: bool, like, block_d: int):
    """(n, block_d, block_d) tiles as the (n * block_d, block_d) matrix a 2-D descriptor covers. Without a linear
    branch nothing reads them, but a descriptor needs a real tile: one of zeros, in like's dtype and device."""
    return tiles.reshape(-1, block_d) if has_linear else like.new_zeros(block_d, block_d)


def launch_grid(n_qblk: int, blkq: int, blkk: int, batch_heads: int) -> tuple[int, int]:
    """`launch`'s grid: each query block as blkq / rows programs of `LAUNCH[blkk]` rows, for every (batch, head)."""
    return n_qblk * (blkq // LAUNCH[blkk][0]), batch_heads


def launch(q, k, v, lut, o, lse, den, o_l, r_tiles, z, proj_weight, proj_bias, scale: float, n_qblk: int, kept: int,
           block_d: int, blkq: int, blkk: int, rest: bool, has_linear: bool, feature_map: int, store_bwd: bool,
           eps: float, has_proj: bool = True, gate=None, gate_lse: bool = False):
    """Runs `_attn_fwd_hopper` (the caller checked `supports`). q, k, v, o: (B, H, L, D) with unit inner stride and
    16-byte aligned rows (`buffers.tma_ready`); r_tiles: (n, block_d, block_d) in q's dtype, one tile per query
    block ("rest") or per head ("all"), z the matching float32 vectors; other arguments as `triton_fwd.attn_fwd`.
    has_proj False (scope "none"): no bias is added, and proj_weight / proj_bias may be empty (never read).
    gate (B, H, Lq) float32: mix the branches by the row's gate instead of adding them (`triton_fwd.attn_fwd`).
    """
    B, H, Lq, D = q.shape
    rows, warps, stages = LAUNCH[blkk]
    r2d = linear_tiles_2d(r_tiles, has_linear, q, block_d)
    # without a linear branch nothing reads W, but its descriptor needs a real float32 tile (scope "none" passes an
    # empty proj_weight); proj_bias is float32 like every proj_l tensor here
    w2d = proj_weight if has_linear else proj_bias.new_empty(block_d, block_d)
    LAUNCHER[launch_grid(n_qblk, blkq, blkk, B * H)](
        descriptor(q, [1, 1, rows, block_d]), descriptor(k, [1, 1, blkk, block_d]),
        descriptor(v, [1, 1, blkk, block_d]), descriptor(o, [1, 1, rows, block_d]),
        descriptor(r2d, [block_d, block_d]), descriptor(w2d, [block_d, block_d // 2], 32),
        lut, lse, den, o_l, z, proj_bias, lse if gate is None else gate,
        scale, H, Lq, k.shape[2], n_qblk, kept,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=rows, BLOCK_N=blkk, SPLIT=blkq // rows, STAGES=stages, REST=rest,
        HAS_LINEAR=has_linear, FEATURE_MAP=feature_map, STORE_BWD=store_bwd, EPS=eps, FOLD_SCALE=scale > 0,
        HAS_PROJ=has_proj, MIX=gate is not None, GATE_LSE=gate_lse, num_warps=warps,
    )
