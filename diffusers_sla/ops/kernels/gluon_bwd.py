# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""SLA backward for Hopper (sm_90) in Gluon: the dK/dV and the dQ programs.

The same computation as `triton_bwd.attn_bwd` (read that file first: this one only differs in how the loops are
scheduled). `tl.dot` waits for each product as soon as it is issued; here the products are
asynchronous `wgmma` instructions, so each step's CUDA-core work runs under its tensor-core work.

Key-block programs (dK, dV), one per key block, walk the column LUT, i.e. only the query blocks that selected their
key block, STEP_M query rows at a time:

    issue dP^T = V dO^T                        (tensor cores)
    P^T = exp2(S^T - lse)                      (runs while dP^T is computed)
    issue dV += P^T dO
    wait for dP^T; dS^T = P^T (dP^T - delta)   (runs while dV is computed)
    issue dK += dS^T Q, then the next step's S^T = K Q^T
    wait for all; refill the ring slot of this step with the tiles of step + STAGES (TMA)

K and V stay in shared memory for the whole program; the q and dO tiles arrive by TMA into a ring of STAGES slots.
Every product has the key block's rows as its M dimension, so a 64-row key block is one warpgroup (4 warps).

Query programs (dQ), BLOCK_M rows each, walk the forward's LUT with K/V tiles in a TMA ring, as
`gluon_fwd._attn_fwd_hopper` does: issue dP = dO V^T and the next S = Q K^T, P = exp2(S - lse) under both,
dS = P (dP - delta), issue dQ += dS K.

The epilogues add the linear branch's part (dh_j, dz_j for dK/dV; R_i, z_i for dQ, as in `triton_bwd.attn_bwd`): its
BLOCK_D x BLOCK_D tile arrives by TMA into the ring, free by then. Results leave by TMA through shared memory.

Only compiled on CUDA devices of compute capability 9.0; `ops/backward.py` picks these kernels there
(`supports`), the portable `triton_bwd.attn_bwd` everywhere else and under the Triton interpreter, which does not
run Gluon.
"""

from __future__ import annotations

from .. import tuning
from .gluon_fwd import GLUON_AVAILABLE, descriptor, gluon_unavailable_reason, launch_reason, linear_tiles_2d

if GLUON_AVAILABLE:
    from .. import gluon_compat as gc
    from ..gluon_compat import fence_async_shared, gl, gluon, mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from .gluon_fwd import as_box, feature_map_gl, init_barriers, invalidate_barriers, issue_kv


# key-block size -> (query rows per step or program, warps, ring stages)
LAUNCH = tuning.GLUON_DKDV_LAUNCH
DQ_LAUNCH = tuning.GLUON_DQ_LAUNCH


def supports(dtype_bytes: int, blkq: int, blkk: int, block_d: int, head_dim: int, dot_precision: str) -> str | None:
    """None when the Hopper backward kernels can run this launch, else the reason they cannot (for the error of a
    forced choice)."""
    if not GLUON_AVAILABLE:
        return gluon_unavailable_reason()
    # (DQ_LAUNCH has the same keys and rows)
    return launch_reason(LAUNCH, dtype_bytes, blkq, blkk, block_d, head_dim, dot_precision)


if GLUON_AVAILABLE:

    @gluon.jit
    def _feature_map_bwd_gl(phi, dphi, FEATURE_MAP: gl.constexpr):
        # `common.feature_map_bwd` for Gluon tensors, from phi alone, so that x need not stay in registers:
        # elu(x) + 1 > 1 exactly where x > 0 (at x = 0 both branches give dphi), relu(x) > 0 exactly where x > 0
        if FEATURE_MAP == 0:
            dx = phi * (dphi - gl.sum(dphi * phi, 1)[:, None])
        elif FEATURE_MAP == 1:
            dx = gl.where(phi > 1.0, dphi, dphi * phi)
        else:
            dx = gl.where(phi > 0.0, dphi, 0.0)
        return dx

    @gluon.jit
    def _query_row(COLQ, step, SPLIT: gl.constexpr, BLOCK_M: gl.constexpr, STEP_M: gl.constexpr, valid=None):
        # first query row of LUT step `step`: query block COLQ[step // SPLIT], its (step % SPLIT)-th STEP_M rows
        # (row 0 where not `valid`: an index past this key block's LUT entries)
        if valid is None:
            block = gl.load(COLQ + step // SPLIT)
        else:
            block = gl.load(COLQ + step // SPLIT, mask=valid, other=0)
        return block * BLOCK_M + (step % SPLIT) * STEP_M

    @gluon.jit
    def _issue_qdo(desc_q, desc_do, COLQ, step, n_steps, off_z, off_h, q_slot, do_slot, bar,
                   SPLIT: gl.constexpr, BLOCK_M: gl.constexpr, STEP_M: gl.constexpr, TILE_BYTES: gl.constexpr,
                   ALWAYS: gl.constexpr = False):
        # TMA loads of the q and dO tiles of step `step` into one ring slot, one barrier for both (nothing when
        # step >= n_steps, unless ALWAYS)
        ok = (step < n_steps) | ALWAYS
        start_m = _query_row(COLQ, step, SPLIT, BLOCK_M, STEP_M, valid=step < n_steps)
        mbarrier.expect(bar, 2 * TILE_BYTES, pred=ok)
        gc.async_load(desc_q, [off_z, off_h, start_m, 0], bar, as_box(q_slot, desc_q), pred=ok)
        gc.async_load(desc_do, [off_z, off_h, start_m, 0], bar, as_box(do_slot, desc_do), pred=ok)

    @gluon.jit
    def _attn_bwd_dkdv_hopper(desc_q, desc_do, desc_k, desc_v, desc_dk, desc_dv, desc_dh,  #
                              M, Delta, COLQ, COFF, CCNT, DZ,  #
                              sm_scale, H, N_CTX_Q, N_QBLK, N_KBLK, KEPT,  #
                              HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr,
                              STEP_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                              REST: gl.constexpr, HAS_LINEAR: gl.constexpr, FEATURE_MAP: gl.constexpr,
                              num_warps: gl.constexpr):
        # Arguments as `attn_bwd` (PROGRAM 0), except that q, dO, k, v, dk, dv come as host-built 4-D (B, H, L, D)
        # tensor descriptors (`launch`) and the linear branch's dh as desc_dh over BLOCK_D x BLOCK_D tiles in the
        # input dtype, one per key block for "rest" (dh_j), one per head for "all" (dH), with DZ the matching dz
        # vectors (float32).
        dtype: gl.constexpr = desc_q.dtype
        start_n = gl.program_id(0)
        off_hz = gl.program_id(1)
        off_z = off_hz // H
        off_h = off_hz % H

        # wgmma accumulators: S^T and dP^T (key rows x STEP_M query columns), dK and dV (key rows x BLOCK_D); P^T and
        # dS^T as register A operands of the dV and dK products
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, STEP_M, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

        k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_D], tile_layout)
        v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_D], tile_layout)
        # the ring: q tiles in slots 0..STAGES-1, dO tiles in STAGES..2*STAGES-1; the epilogue reuses it for dh
        ring = gl.allocate_shared_memory(dtype, [2 * STAGES, STEP_M, BLOCK_D], tile_layout)
        bar_kv = init_barriers(1).index(0)
        bar = init_barriers(STAGES)  # one per ring slot, for its q and dO tiles

        col = off_hz.to(gl.int64) * N_KBLK + start_n  # this key block's row in the column LUT and the side tensors
        SPLIT: gl.constexpr = BLOCK_M // STEP_M
        n_steps = gl.load(CCNT + col) * SPLIT
        COLQ += off_hz.to(gl.int64) * N_QBLK * KEPT + gl.load(COFF + col)
        TILE_BYTES: gl.constexpr = STEP_M * BLOCK_D * 2
        mbarrier.expect(bar_kv, 2 * BLOCK_N * BLOCK_D * 2)
        gc.async_load(desc_k, [off_z, off_h, start_n * BLOCK_N, 0], bar_kv, as_box(k_smem, desc_k))
        gc.async_load(desc_v, [off_z, off_h, start_n * BLOCK_N, 0], bar_kv, as_box(v_smem, desc_v))
        # step 0 is loaded even for a key block no query block selected (its rows then come from query block 0 and
        # are never used): the first S^T product below needs a tile
        for s in gl.static_range(STAGES):
            _issue_qdo(desc_q, desc_do, COLQ, s, n_steps, off_z, off_h, ring.index(s), ring.index(STAGES + s),
                       bar.index(s), SPLIT, BLOCK_M, STEP_M, TILE_BYTES, ALWAYS=s == 0)

        row_base = off_hz.to(gl.int64) * N_CTX_Q
        dk = gl.zeros([BLOCK_N, BLOCK_D], gl.float32, layout=acc_layout)
        dv = gl.zeros([BLOCK_N, BLOCK_D], gl.float32, layout=acc_layout)
        zero_s = gl.zeros([BLOCK_N, STEP_M], gl.float32, layout=s_layout)
        qk_scale = sm_scale * 1.44269504  # 1/log(2)

        mbarrier.wait(bar_kv, 0)
        mbarrier.wait(bar.index(0), 0)
        s_cur = warpgroup_mma(k_smem, ring.index(0).permute((1, 0)), zero_s, use_acc=False)
        start_m = _query_row(COLQ, 0, SPLIT, BLOCK_M, STEP_M, valid=n_steps > 0)
        # each step's lse and delta rows are loaded one step ahead, 64 floats spread over the warpgroup (a register or
        # two per thread), and moved into the scores' column layout when used: faster than loading them in the step
        # that uses them
        row_layout: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
        offs_r = gl.arange(0, STEP_M, layout=row_layout)
        m_next = gl.load(M + row_base + start_m + offs_r, mask=start_m + offs_r < N_CTX_Q, other=float("inf"))
        di_next = gl.load(Delta + row_base + start_m + offs_r, mask=start_m + offs_r < N_CTX_Q, other=0.0)
        for j in range(0, n_steps):
            slot = j % STAGES
            q_tile = ring.index(slot)
            do_tile = ring.index(STAGES + slot)
            dp_tok = warpgroup_mma(v_smem, do_tile.permute((1, 0)), zero_s, use_acc=False, is_async=True)
            # rows past N_CTX_Q are zeros (TMA), and their lse is +inf: P^T = 0 there
            m = gl.convert_layout(m_next, gl.SliceLayout(0, s_layout))
            di = gl.convert_layout(di_next, gl.SliceLayout(0, s_layout))
            p_t = gl.exp2(s_cur * qk_scale - m[None, :])
            dv_tok = warpgroup_mma(gl.convert_layout(p_t.to(dtype), op_layout), do_tile, dv, is_async=True)
            # the next step (on the last step a repeat of this one, never read)
            jn = gl.minimum(j + 1, n_steps - 1)
            start_m = _query_row(COLQ, jn, SPLIT, BLOCK_M, STEP_M)
            rows_n = start_m + offs_r
            m_next = gl.load(M + row_base + rows_n, mask=rows_n < N_CTX_Q, other=float("inf"))
            di_next = gl.load(Delta + row_base + rows_n, mask=rows_n < N_CTX_Q, other=0.0)
            dp_t = warpgroup_mma_wait(1, deps=(dp_tok,))
            ds_t = p_t * (dp_t - di[None, :])
            dk_tok = warpgroup_mma(gl.convert_layout(ds_t.to(dtype), op_layout), q_tile, dk, is_async=True)
            # the next step's scores run after dK
            mbarrier.wait(bar.index(jn % STAGES), (jn // STAGES) & 1)
            s_tok = warpgroup_mma(k_smem, ring.index(jn % STAGES).permute((1, 0)), zero_s, use_acc=False,
                                  is_async=True)
            dv, dk, s_cur = warpgroup_mma_wait(0, deps=(dv_tok, dk_tok, s_tok))
            # every warp is done with this slot: refill it with the tiles of step j + STAGES
            gc.barrier()
            _issue_qdo(desc_q, desc_do, COLQ, j + STAGES, n_steps, off_z, off_h, q_tile, do_tile, bar.index(slot),
                       SPLIT, BLOCK_M, STEP_M, TILE_BYTES)

        invalidate_barriers(bar, STAGES)
        dk = dk * sm_scale

        # -- epilogue: the linear branch, dv += phi(k) dh, dk += phi'(k) (v dh^T + dz) ----
        # dV leaves first, through a ring slot, so that dV, dK, dphi(k) and phi(k) are never all in registers
        gl.static_assert(2 * STAGES * STEP_M >= BLOCK_D + BLOCK_N, "the ring must hold the dh tile and dV")
        gl.static_assert((2 * STAGES * STEP_M) % BLOCK_D == 0, "the ring must be whole dh tiles")
        dv_smem = gc.reinterpret(ring.index(BLOCK_D // STEP_M), dtype, [BLOCK_N, BLOCK_D], tile_layout)
        gc.barrier()
        if HAS_LINEAR:
            # (a view of the whole ring: Triton 3.8+ reinterprets only views of the same size)
            dh_smem = gc.reinterpret(ring, dtype, [2 * STAGES * STEP_M // BLOCK_D, BLOCK_D, BLOCK_D],
                                     desc_dh.layout).index(0)
            dh_row = col if REST else off_hz.to(gl.int64)  # dh_j of this key block, or the head's dH
            mbarrier.expect(bar_kv, BLOCK_D * BLOCK_D * 2)
            gc.async_load(desc_dh, [(dh_row * BLOCK_D).to(gl.int32), 0], bar_kv, dh_smem)
            # phi(k) straight in the A-operand layout of the product with dh (rows past N_CTX_KV hold zeros; their
            # dk, dv are never stored)
            offs_dp = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, op_layout))
            phik = feature_map_gl(k_smem.load(op_layout).to(gl.float32), offs_dp < HEAD_DIM, FEATURE_MAP)
            mbarrier.wait(bar_kv, 1)
            dv = warpgroup_mma(phik.to(dtype), dh_smem, dv)
        dv_smem.store(dv.to(dtype))
        fence_async_shared()
        gc.async_store(desc_dv, [off_z, off_h, start_n * BLOCK_N, 0], as_box(dv_smem, desc_dv))
        if HAS_LINEAR:
            offs_d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, acc_layout))
            dz = gl.load(DZ + dh_row * BLOCK_D + offs_d)
            dphik = warpgroup_mma(v_smem, dh_smem.permute((1, 0)), gl.zeros([BLOCK_N, BLOCK_D], gl.float32,
                                                                             layout=acc_layout), use_acc=False)
            phik = feature_map_gl(k_smem.load(acc_layout).to(gl.float32), offs_d < HEAD_DIM, FEATURE_MAP)
            dk += _feature_map_bwd_gl(phik, dphik + dz[None, :], FEATURE_MAP)
        mbarrier.invalidate(bar_kv)

        # dK leaves through K's shared memory (no longer read) and TMA, which (as for dV) clips rows past N_CTX_KV
        # and columns past HEAD_DIM
        gc.barrier()
        k_smem.store(dk.to(dtype))
        fence_async_shared()
        gc.async_store(desc_dk, [off_z, off_h, start_n * BLOCK_N, 0], as_box(k_smem, desc_dk))
        tma.store_wait(0)


    @gluon.jit
    def _attn_bwd_dq_hopper(desc_q, desc_do, desc_k, desc_v, desc_dq, desc_r, LUT, M, Delta, DN, DD, ZB,  #
                            sm_scale, H, N_CTX_Q, N_QBLK, KEPT,  #
                            HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr,
                            BLOCK_N: gl.constexpr, SPLIT: gl.constexpr, STAGES: gl.constexpr, REST: gl.constexpr,
                            HAS_LINEAR: gl.constexpr, FEATURE_MAP: gl.constexpr, num_warps: gl.constexpr):
        # The query programs (dQ) of `attn_bwd` (PROGRAM 1): BLOCK_M query rows each, SPLIT per query block, walking
        # the forward's LUT with K/V tiles in a TMA ring as `gluon_fwd._attn_fwd_hopper` does. Per step:
        #   issue dP = dO V^T, then the next step's S = Q K^T; P = exp2(S - lse) under both; wait for dP;
        #   dS = P (dP - delta); issue dQ += dS K; wait for all; refill the ring slot.
        # desc_r covers the linear branch's R tiles in the input dtype (R_i per query block for "rest", the head's
        # total for "all"), ZB the matching z vectors; DN, DD: dN (B, H, L, D) and dd (B, H, L) of the preprocess.
        dtype: gl.constexpr = desc_q.dtype
        start_m = gl.program_id(0)
        off_hz = gl.program_id(1)
        off_z = off_hz // H
        off_h = off_hz % H

        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                           instr_shape=[16, BLOCK_N, 16])
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_D, 16])
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
        tile_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)

        q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_D], tile_layout)
        do_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_D], tile_layout)
        # the ring: K tiles in slots 0..STAGES-1, V tiles in STAGES..2*STAGES-1; the epilogue reuses it for R
        kv_smem = gl.allocate_shared_memory(dtype, [2 * STAGES, BLOCK_N, BLOCK_D], tile_layout)
        bar_q = init_barriers(1).index(0)
        bar_k = init_barriers(STAGES)
        bar_v = init_barriers(STAGES)

        blk = off_hz.to(gl.int64) * N_QBLK + start_m // SPLIT  # this query block's row in the LUT and side tensors
        LUT += blk * KEPT
        TILE_BYTES: gl.constexpr = BLOCK_N * BLOCK_D * 2
        mbarrier.expect(bar_q, 2 * BLOCK_M * BLOCK_D * 2)
        gc.async_load(desc_q, [off_z, off_h, start_m * BLOCK_M, 0], bar_q, as_box(q_smem, desc_q))
        gc.async_load(desc_do, [off_z, off_h, start_m * BLOCK_M, 0], bar_q,
                                        as_box(do_smem, desc_do))
        for s in gl.static_range(STAGES):
            issue_kv(desc_k, desc_v, LUT, s, KEPT, off_z, off_h, kv_smem.index(s), kv_smem.index(STAGES + s),
                      bar_k.index(s), bar_v.index(s), BLOCK_N, TILE_BYTES)

        # rows past N_CTX_Q are zeros (TMA); their dq is never stored. Keys past N_CTX_KV are zero rows of k and v:
        # their P is not 0, but dS K adds nothing for them
        rows = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        row = off_hz.to(gl.int64) * N_CTX_Q + rows
        m = gl.load(M + row, mask=rows < N_CTX_Q, other=0.0)
        di = gl.load(Delta + row, mask=rows < N_CTX_Q, other=0.0)
        dq = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, layout=acc_layout)
        zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, layout=s_layout)
        qk_scale = sm_scale * 1.44269504  # 1/log(2)

        mbarrier.wait(bar_q, 0)
        mbarrier.wait(bar_k.index(0), 0)
        s_cur = warpgroup_mma(q_smem, kv_smem.index(0).permute((1, 0)), zero_s, use_acc=False)
        for j in range(0, KEPT):
            slot = j % STAGES
            mbarrier.wait(bar_v.index(slot), (j // STAGES) & 1)
            dp_tok = warpgroup_mma(do_smem, kv_smem.index(STAGES + slot).permute((1, 0)), zero_s, use_acc=False,
                                   is_async=True)
            # the next step's scores (on the last step a repeat of this one, never read)
            jn = gl.minimum(j + 1, KEPT - 1)
            mbarrier.wait(bar_k.index(jn % STAGES), (jn // STAGES) & 1)
            s_tok = warpgroup_mma(q_smem, kv_smem.index(jn % STAGES).permute((1, 0)), zero_s, use_acc=False,
                                  is_async=True)
            p = gl.exp2(s_cur * qk_scale - m[:, None])
            dp = warpgroup_mma_wait(1, deps=(dp_tok,))
            ds = p * (dp - di[:, None])
            dq_tok = warpgroup_mma(gl.convert_layout(ds.to(dtype), op_layout), kv_smem.index(slot), dq,
                                   is_async=True)
            dq, s_cur = warpgroup_mma_wait(0, deps=(dq_tok, s_tok))
            # every warp is done with this slot: refill it with the tiles of step j + STAGES
            gc.barrier()
            issue_kv(desc_k, desc_v, LUT, j + STAGES, KEPT, off_z, off_h, kv_smem.index(slot),
                      kv_smem.index(STAGES + slot), bar_k.index(slot), bar_v.index(slot), BLOCK_N, TILE_BYTES)

        invalidate_barriers(bar_k, STAGES)
        invalidate_barriers(bar_v, STAGES)
        dq = dq * sm_scale

        # -- epilogue: the linear branch, dq += phi'(q) (dN R^T + dd z^T) ----
        if HAS_LINEAR:
            gl.static_assert((2 * STAGES * BLOCK_N) % BLOCK_D == 0, "the ring must be whole R tiles")
            r_smem = gc.reinterpret(kv_smem, dtype, [2 * STAGES * BLOCK_N // BLOCK_D, BLOCK_D, BLOCK_D],
                                    desc_r.layout).index(0)
            r_row = blk if REST else off_hz.to(gl.int64)  # R_i of this query block, or the head's total
            gc.barrier()
            mbarrier.expect(bar_q, BLOCK_D * BLOCK_D * 2)
            gc.async_load(desc_r, [(r_row * BLOCK_D).to(gl.int32), 0], bar_q, r_smem)
            ep_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
            rows_ep = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ep_layout))
            offs_ep = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, ep_layout))
            dn_mask = (rows_ep < N_CTX_Q)[:, None] & (offs_ep < HEAD_DIM)[None, :]
            dn = gl.load(DN + (off_hz.to(gl.int64) * N_CTX_Q + rows_ep)[:, None] * HEAD_DIM + offs_ep[None, :],
                         mask=dn_mask, other=0.0)
            offs_d = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, acc_layout))
            z = gl.load(ZB + r_row * BLOCK_D + offs_d)
            rows_acc = gl.convert_layout(rows, gl.SliceLayout(1, acc_layout))
            dd = gl.load(DD + off_hz.to(gl.int64) * N_CTX_Q + rows_acc, mask=rows_acc < N_CTX_Q, other=0.0)
            mbarrier.wait(bar_q, 1)
            dphiq = warpgroup_mma(gl.convert_layout(dn.to(dtype), op_layout), r_smem.permute((1, 0)),
                                  dd[:, None] * z[None, :])
            phiq = feature_map_gl(q_smem.load(acc_layout).to(gl.float32), offs_d < HEAD_DIM, FEATURE_MAP)
            dq += _feature_map_bwd_gl(phiq, dphiq, FEATURE_MAP)
        mbarrier.invalidate(bar_q)

        # dq leaves through q's shared memory (no longer read) and TMA, which clips rows past N_CTX_Q and columns
        # past HEAD_DIM
        gc.barrier()
        q_smem.store(dq.to(dtype))
        fence_async_shared()
        gc.async_store(desc_dq, [off_z, off_h, start_m * BLOCK_M, 0], as_box(q_smem, desc_dq))
        tma.store_wait(0)


def launch_dkdv(q, k, v, do, dk, dv, lse, delta, col_q, col_off, col_cnt, dh_tiles, dz, scale: float, n_qblk: int,
                n_kblk: int, kept: int, block_d: int, blkq: int, blkk: int, rest: bool, has_linear: bool,
                feature_map: int):
    """Runs `_attn_bwd_dkdv_hopper` (the caller checked `supports`). q, k, v, do, dk, dv: (B, H, L, D) with unit
    inner stride and 16-byte aligned rows (`buffers.tma_ready`); dh_tiles: (n, block_d, block_d) in q's dtype,
    one tile per key block ("rest") or per head ("all"), dz the matching float32 vectors; other arguments as
    `triton_bwd.attn_bwd`."""
    B, H, Lq, D = q.shape
    rows, warps, stages = LAUNCH[blkk]
    dh2d = linear_tiles_2d(dh_tiles, has_linear, q, block_d)
    _attn_bwd_dkdv_hopper[(n_kblk, B * H)](
        descriptor(q, [1, 1, rows, block_d]), descriptor(do, [1, 1, rows, block_d]),
        descriptor(k, [1, 1, blkk, block_d]), descriptor(v, [1, 1, blkk, block_d]),
        descriptor(dk, [1, 1, blkk, block_d]), descriptor(dv, [1, 1, blkk, block_d]),
        descriptor(dh2d, [block_d, block_d]),
        lse, delta, col_q, col_off, col_cnt, dz, scale, H, Lq, n_qblk, n_kblk, kept,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=blkq, STEP_M=rows, BLOCK_N=blkk, STAGES=stages, REST=rest,
        HAS_LINEAR=has_linear, FEATURE_MAP=feature_map, num_warps=warps,
    )


def launch_dq(q, k, v, do, dq, lut, lse, delta, dn, dd, r_tiles, z, scale: float, n_qblk: int, kept: int,
              block_d: int, blkq: int, blkk: int, rest: bool, has_linear: bool, feature_map: int):
    """Runs `_attn_bwd_dq_hopper` (the caller checked `supports`). q, k, v, do, dq: (B, H, L, D) with unit inner
    stride and 16-byte aligned rows; r_tiles: (n, block_d, block_d) in q's dtype, one tile per query block ("rest")
    or per head ("all"), z the matching float32 vectors (as `gluon_fwd.launch`); other arguments as `attn_bwd`."""
    B, H, Lq, D = q.shape
    rows, warps, stages = DQ_LAUNCH[blkk]
    r2d = linear_tiles_2d(r_tiles, has_linear, q, block_d)
    _attn_bwd_dq_hopper[(n_qblk * (blkq // rows), B * H)](
        descriptor(q, [1, 1, rows, block_d]), descriptor(do, [1, 1, rows, block_d]),
        descriptor(k, [1, 1, blkk, block_d]), descriptor(v, [1, 1, blkk, block_d]),
        descriptor(dq, [1, 1, rows, block_d]), descriptor(r2d, [block_d, block_d]),
        lut, lse, delta, dn, dd, z, scale, H, Lq, n_qblk, kept,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=rows, BLOCK_N=blkk, SPLIT=blkq // rows, STAGES=stages, REST=rest,
        HAS_LINEAR=has_linear, FEATURE_MAP=feature_map, num_warps=warps,
    )
