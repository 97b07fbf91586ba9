# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Block-sparse SLA backward in Triton.

Sparse-Linear Attention: Zhang et al., arXiv 2509.24006; the sparse branch's backward is the flash-attention backward
(Dao, arXiv 2307.08691) restricted to selected blocks, laid out as in the Triton fused-attention tutorial.

With o = o_s + o_l W^T + b, o_l = N / d, N = phi(q) R_i, d = phi(q) . z_i + eps, and g = dO W:

    dN = g / d,   dd = -(g . o_l) / d,   delta = rowsum(dO * o) - g . o_l - dO . b   (= rowsum(dO * o_s))
    dR_i = phi(q_i)^T dN_i,  dz_i = sum_rows dd phi(q_i)                              (one D x D per query block)
    dh_j = sum_{i that did not select j} dR_i   ("rest"),   dh_j = dH = sum_i dR_i   ("all")
    dv_j += phi(k_j) dh_j,   dphi(k_j) = v_j dh_j^T + dz_j,   dphi(q_i) = dN_i R_i^T + dd z_i^T

`attn_bwd` has two kinds of programs, launched separately: key-block programs (dK, dV) walk a column-wise look-up
table, i.e. only the query blocks that selected their key block; query-block programs (dQ) walk the forward's LUT.
Nothing scans all blocks, and no D x D matrix is touched inside either loop: dh_j and dz_j ("rest") come from a 0/1
matrix product over the per-query-block dR_i, dz_i before the launch.

With MIX (a fusion's gate, `triton_fwd.attn_fwd`): o = w o_s + (1 - w) L, L = o_l + o_l W^T + b. The preprocess
hands the sparse kernels dO_s = w dO (stored), the linear branch g = (1 - w)(dO + dO W), and, without dividing by w,

    delta = rowsum(dO_s * o_s) = rowsum(dO * o) - (1 - w) rowsum(dO * L)
    d gate = w (1 - w) rowsum(dO * (o_s - L)) = (1 - w) (delta - w rowsum(dO * L))

and with GATE_LSE (w = sigmoid(gate + ln Z_sel)) the same d gate reaches ln Z_sel: delta - d gate.
"""

import triton
import triton.language as tl

from .. import tuning
from .common import autotune_configs, feature_map, feature_map_bwd, head_base, program_ids, prune_configs


@triton.jit
def _mix_weight(Gate, M, row, m_ok, GATE_LSE: tl.constexpr):
    # the forward's w = sigmoid(gate (+ ln Z_sel)), from the gate and the saved lse (log2 Z_sel)
    logit = tl.load(Gate + row, mask=m_ok, other=0.0)
    if GATE_LSE:
        logit += tl.load(M + row, mask=m_ok, other=0.0) * 0.6931471805599453
    return tl.sigmoid(logit)


@triton.jit
def attn_bwd_preprocess(O, DO, OL, Den, Q, W, Bias, Delta, DD, DN, DRB, DZB, M, Gate, DOS, DGate,  #
                         stride_oz, stride_oh, stride_om, stride_ok,  #
                         stride_doz, stride_doh, stride_dom, stride_dok,  #
                         stride_qz, stride_qh, stride_qm, stride_qk,  #
                         H, N_CTX_Q, N_QBLK,  #
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,  #
                         HAS_LINEAR: tl.constexpr, FEATURE_MAP: tl.constexpr, DOT_PREC: tl.constexpr,
                         PROJ_PREC: tl.constexpr, HAS_PROJ: tl.constexpr, MIX: tl.constexpr = False,
                         GATE_LSE: tl.constexpr = False):
    start_m, off_hz, off_z, off_h = program_ids(H)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_CTX_Q
    d_ok = offs_k < HEAD_DIM
    mask = m_ok[:, None] & d_ok[None, :]
    o = tl.load(head_base(O, off_z, off_h, stride_oz, stride_oh) + offs_m[:, None] * stride_om +
                offs_k[None, :] * stride_ok, mask=mask, other=0.0).to(tl.float32)
    do_in = tl.load(head_base(DO, off_z, off_h, stride_doz, stride_doh) +
                    offs_m[:, None] * stride_dom + offs_k[None, :] * stride_dok, mask=mask, other=0.0)
    do = do_in.to(tl.float32)
    row = off_hz.to(tl.int64) * N_CTX_Q + offs_m
    if HAS_PROJ and not MIX:  # o holds proj_l's bias; scope "none" (no proj_l) reads neither W nor the bias
        o -= tl.load(Bias + offs_k, mask=d_ok, other=0.0)[None, :]
    delta = tl.sum(do * o, 1)
    if HAS_LINEAR:
        ol = tl.load(OL + row[:, None] * HEAD_DIM + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        den = tl.load(Den + row, mask=m_ok, other=1.0)
        w = tl.load(W + offs_k[:, None] * HEAD_DIM + offs_k[None, :], mask=d_ok[:, None] & d_ok[None, :], other=0.0)
        # -- d o_l = dO W ----
        # dO is 16-bit for 16-bit inputs: the product runs there on 16-bit tensor cores with W rounded to dO's
        # dtype (faster, error unchanged at bf16 noise); float32 inputs keep float32 operands and PROJ_PREC
        g = tl.dot(do_in, w.to(do_in.dtype), input_precision=PROJ_PREC)
        if MIX:  # the module docstring's mix: dO_s, delta, d gate, and g for o_l
            mix = _mix_weight(Gate, M, row, m_ok, GATE_LSE)
            tl.store(DOS + row[:, None] * HEAD_DIM + offs_k[None, :], (mix[:, None] * do).to(DOS.dtype.element_ty),
                     mask=mask)
            do_bias = tl.sum(do * tl.load(Bias + offs_k, mask=d_ok, other=0.0)[None, :], 1)
            # dO (I + W): what reaches o_l + o_l W^T; dO's tile is not needed past here (fewer live tiles: the
            # preprocess of a 128-row block runs at the 128-register cap)
            g += do
            g_ol = tl.sum(g * ol, 1)
            do_lin = g_ol + do_bias  # rowsum(dO * L)
            delta -= (1.0 - mix) * do_lin
            dgate = (1.0 - mix) * (delta - mix * do_lin)
            tl.store(DGate + row, dgate, mask=m_ok)
            if GATE_LSE:
                delta -= dgate
            g = (1.0 - mix)[:, None] * g
            gol = (1.0 - mix) * g_ol
        else:
            gol = tl.sum(g * ol, 1)
            delta -= gol
        dn = g / den[:, None]
        dd = -gol / den
        tl.store(DD + row, dd, mask=m_ok)
        tl.store(DN + row[:, None] * HEAD_DIM + offs_k[None, :], dn.to(DN.dtype.element_ty), mask=mask)
        # -- per query block: dR_i = phi(q)^T dN, dz_i = sum dd phi(q) ----
        q = tl.load(head_base(Q, off_z, off_h, stride_qz, stride_qh) +
                    offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, mask=mask, other=0.0)
        phiq = tl.where(m_ok[:, None], feature_map(q.to(tl.float32), d_ok, FEATURE_MAP), 0.0)
        dr = tl.dot(tl.trans(phiq.to(q.dtype)), dn.to(q.dtype), input_precision=DOT_PREC)
        blk = off_hz.to(tl.int64) * N_QBLK + start_m
        tl.store(DRB + blk * BLOCK_D * BLOCK_D + offs_k[:, None] * BLOCK_D + offs_k[None, :],
                 dr.to(DRB.dtype.element_ty))
        tl.store(DZB + blk * BLOCK_D + offs_k, tl.sum(dd[:, None] * phiq, 0))
    tl.store(Delta + row, delta, mask=m_ok)


@triton.jit
def proj_grad(DO, OL, DWP, DBP, M, Gate,  #
               stride_doz, stride_doh, stride_dom, stride_dok,  #
               H, N_CTX_Q, N_TILES, TOTAL_TILES, SPLIT,  #
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr,
               MIX: tl.constexpr = False, GATE_LSE: tl.constexpr = False):
    # Partial dW = sum dO^T o_l and db = sum dO over row tiles split, split + SPLIT, ...; with MIX, dO is the
    # linear term's share (1 - w) dO
    split = tl.program_id(0)
    offs_k = tl.arange(0, BLOCK_D)
    d_ok = offs_k < HEAD_DIM
    dw = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t in range(split, TOTAL_TILES, SPLIT):
        off_hz = t // N_TILES
        off_z = off_hz // H
        off_h = off_hz % H
        offs_m = (t % N_TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N_CTX_Q
        mask = m_ok[:, None] & d_ok[None, :]
        do = tl.load(head_base(DO, off_z, off_h, stride_doz, stride_doh) +
                     offs_m[:, None] * stride_dom + offs_k[None, :] * stride_dok, mask=mask, other=0.0)
        row = off_hz.to(tl.int64) * N_CTX_Q + offs_m
        ol = tl.load(OL + row[:, None] * HEAD_DIM + offs_k[None, :], mask=mask, other=0.0)
        if MIX:  # db from the float32 share; dW's operand rounded to dO's dtype, as dO itself is
            share = (1.0 - _mix_weight(Gate, M, row, m_ok, GATE_LSE))[:, None] * do.to(tl.float32)
            dw = tl.dot(tl.trans(share.to(do.dtype)), ol.to(do.dtype), dw, input_precision=DOT_PREC)
            db += tl.sum(share, 0)
        else:
            dw = tl.dot(tl.trans(do), ol.to(do.dtype), dw, input_precision=DOT_PREC)
            db += tl.sum(do.to(tl.float32), 0)
    tl.store(DWP + split * BLOCK_D * BLOCK_D + offs_k[:, None] * BLOCK_D + offs_k[None, :], dw)
    tl.store(DBP + split * BLOCK_D + offs_k, db)


@triton.jit
def _attn_bwd_dkdv(dk, dv,  #
                   k, v, desc_q, desc_do, off_z, off_h, M, D, COLQ, count,  #
                   qk_scale, row_base, N_CTX_Q,  #
                   BLOCK_M: tl.constexpr, STEP_M: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    # visit only the query blocks that selected this key block (column-wise LUT), STEP_M rows at a time; tiles
    # through the host-built (B, H, L, D) tensor descriptors
    steps: tl.constexpr = BLOCK_M // STEP_M
    offs_m = tl.arange(0, STEP_M)
    for it in range(0, count * steps):
        start_m = tl.load(COLQ + it // steps) * BLOCK_M + (it % steps) * STEP_M
        rows = start_m + offs_m
        # rows past N_CTX_Q are zeros, and their m is +inf: pT = 0 there
        q = desc_q.load([off_z, off_h, start_m, 0]).reshape(STEP_M, BLOCK_D)
        m = tl.load(M + row_base + rows, mask=rows < N_CTX_Q, other=float("inf"))
        qkT = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        pT = tl.math.exp2(qkT * qk_scale - m[None, :])
        do = desc_do.load([off_z, off_h, start_m, 0]).reshape(STEP_M, BLOCK_D)
        # -- compute dV ----
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        Di = tl.load(D + row_base + rows, mask=rows < N_CTX_Q, other=0.0)
        # -- compute dP and dS ----
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - Di[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dq(dq, q, do, m, Di, desc_k, desc_v, off_z, off_h, LUT,  #
                 qk_scale, KEPT,  #
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    for it in range(0, KEPT):
        start_n = tl.load(LUT + it) * BLOCK_N
        k = desc_k.load([off_z, off_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = desc_v.load([off_z, off_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        p = tl.math.exp2(qk * qk_scale - m[:, None])
        # -- compute dP and dS ----
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - Di[:, None])
        # -- compute dQ (keys past N_CTX_KV are zero rows of k: they add nothing) ----
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


configs = autotune_configs(tuning.BWD_AUTOTUNE_WARPS, tuning.BWD_AUTOTUNE_STAGES)


@triton.autotune(configs, key=["N_CTX_Q", "N_CTX_KV", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "STEP_M", "KEPT", "REST",
                               "HAS_LINEAR", "FEATURE_MAP", "PROGRAM"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def attn_bwd(Q, K, V, DO, desc_q, desc_k, desc_v, desc_do, M, D, DN, DD, LUT, COLQ, COFF, CCNT,  #
              RB, ZB, HT, ZT, DHB, DZB, DHT, DZT,  #
              DQ, DK, DV,  #
              stride_qz, stride_qh, stride_qm, stride_qk,  #
              stride_kz, stride_kh, stride_kn, stride_kk,  #
              stride_vz, stride_vh, stride_vn, stride_vk,  #
              stride_doz, stride_doh, stride_dom, stride_dok,  #
              sm_scale, H, N_CTX_Q, N_CTX_KV, N_QBLK, N_KBLK, KEPT,  #
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
              STEP_M: tl.constexpr, REST: tl.constexpr, HAS_LINEAR: tl.constexpr, FEATURE_MAP: tl.constexpr,
              DOT_PREC: tl.constexpr, PROGRAM: tl.constexpr):
    # PROGRAM 0: key-block programs (dK, dV), one per key block, reading query tiles of STEP_M rows; PROGRAM 1:
    # query programs (dQ) of STEP_M rows each, BLOCK_M // STEP_M per query block. Two launches, so that each kind
    # compiles with its own registers and config.
    pid, off_hz, off_z, off_h = program_ids(H)
    offs_k = tl.arange(0, BLOCK_D)
    d_ok = offs_k < HEAD_DIM
    Q = head_base(Q, off_z, off_h, stride_qz, stride_qh)
    K = head_base(K, off_z, off_h, stride_kz, stride_kh)
    V = head_base(V, off_z, off_h, stride_vz, stride_vh)
    DO = head_base(DO, off_z, off_h, stride_doz, stride_doh)
    row_base = off_hz.to(tl.int64) * N_CTX_Q
    qk_scale = sm_scale * 1.44269504  # 1/log(2)
    hz = off_hz.to(tl.int64)
    dd_offs = offs_k[:, None] * BLOCK_D + offs_k[None, :]
    if PROGRAM == 0:
        # ---- key-block program: dK, dV ----
        start_n = pid
        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N_CTX_KV
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + offs_n[:, None] * stride_kn + offs_k[None, :] * stride_kk, mask=kv_mask, other=0.0)
        v = tl.load(V + offs_n[:, None] * stride_vn + offs_k[None, :] * stride_vk, mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        col = hz * N_KBLK + start_n
        count = tl.load(CCNT + col)
        COLQ += hz * N_QBLK * KEPT + tl.load(COFF + col)
        dk, dv = _attn_bwd_dkdv(dk, dv, k, v, desc_q, desc_do, off_z, off_h, M, D, COLQ, count, qk_scale, row_base,
                                N_CTX_Q, BLOCK_M, STEP_M, BLOCK_D, DOT_PREC)
        dk *= sm_scale
        if HAS_LINEAR:
            if REST:  # dh_j, dz_j: sums of dR_i, dz_i over the query blocks that did not select this key block
                dh = tl.load(DHB + col * BLOCK_D * BLOCK_D + dd_offs)
                dz = tl.load(DZB + col * BLOCK_D + offs_k)
            else:
                dh = tl.load(DHT + hz * BLOCK_D * BLOCK_D + dd_offs)
                dz = tl.load(DZT + hz * BLOCK_D + offs_k)
            kf = k.to(tl.float32)
            phik = tl.where(n_ok[:, None], feature_map(kf, d_ok, FEATURE_MAP), 0.0)
            dv = tl.dot(phik.to(v.dtype), dh.to(v.dtype), dv, input_precision=DOT_PREC)
            dphik = tl.dot(v, tl.trans(dh.to(v.dtype)), input_precision=DOT_PREC) + dz[None, :]
            dk += feature_map_bwd(kf, phik, dphik, FEATURE_MAP)
        out = (hz * N_CTX_KV + offs_n)[:, None] * HEAD_DIM + offs_k[None, :]
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=kv_mask)
    else:
        # ---- query-block program: dQ ----
        offs_m = pid * STEP_M + tl.arange(0, STEP_M)
        m_ok = offs_m < N_CTX_Q
        q_mask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_k[None, :] * stride_qk, mask=q_mask, other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_k[None, :] * stride_dok, mask=q_mask, other=0.0)
        m = tl.load(M + row_base + offs_m, mask=m_ok, other=0.0)
        Di = tl.load(D + row_base + offs_m, mask=m_ok, other=0.0)
        blk = hz * N_QBLK + pid // (BLOCK_M // STEP_M)
        dq = tl.zeros([STEP_M, BLOCK_D], dtype=tl.float32)
        dq = _attn_bwd_dq(dq, q, do, m, Di, desc_k, desc_v, off_z, off_h, LUT + blk * KEPT, qk_scale, KEPT, BLOCK_N,
                          BLOCK_D, DOT_PREC)
        dq *= sm_scale
        if HAS_LINEAR:
            if REST:
                r = tl.load(RB + blk * BLOCK_D * BLOCK_D + dd_offs)
                z = tl.load(ZB + blk * BLOCK_D + offs_k)
            else:
                r = tl.load(HT + hz * BLOCK_D * BLOCK_D + dd_offs)
                z = tl.load(ZT + hz * BLOCK_D + offs_k)
            dn = tl.load(DN + (row_base + offs_m)[:, None] * HEAD_DIM + offs_k[None, :], mask=q_mask, other=0.0)
            dd = tl.load(DD + row_base + offs_m, mask=m_ok, other=0.0)
            dphiq = tl.dot(dn.to(q.dtype), tl.trans(r.to(q.dtype)), input_precision=DOT_PREC) + \
                dd[:, None] * z[None, :]
            qf = q.to(tl.float32)
            dq += feature_map_bwd(qf, feature_map(qf, d_ok, FEATURE_MAP), dphiq, FEATURE_MAP)
        tl.store(DQ + (row_base + offs_m)[:, None] * HEAD_DIM + offs_k[None, :], dq.to(DQ.dtype.element_ty),
                 mask=q_mask)
