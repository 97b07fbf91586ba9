# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""SLA forward in Triton.

Sparse-Linear Attention: Zhang et al., "SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear
Attention", arXiv 2509.24006. The sparse branch is flash attention (Dao et al., arXiv 2205.14135 / 2307.08691) over
the key blocks a query block selected; the layout follows the Triton fused-attention tutorial.

One program per (query block, batch*head) runs flash attention over its selected key blocks, the K/V tiles addressed
through tensor descriptors (TMA on Hopper), and applies the linear branch and `proj_l` in its epilogue:
phi(q) R_i / (phi(q) . z_i + eps). For scope "all", R_i, z_i are the per-head totals H = sum_j phi(k_j)^T v_j and
Z = sum_j phi(k_j) (`linear_state.linear_state`); for "rest" they are sums of the per-key-block h_j, z_j over the
blocks the query block did not select, formed before the launch (`ops/forward.py`: R_i as a 0/1 matrix product, z_i as
Z minus the selected z_j), so that the attention loop holds no D x D state. Feature maps: `common.py`.

With MIX (the fusions "mass" and "ratio", `ops/fusion.py`) the epilogue mixes instead of adding:
o = w o_s + (1 - w) (o_l + o_l W^T + b), w = sigmoid(gate + ln Z_sel) (GATE_LSE, "mass": gate = -ln Zhat_rest) or
sigmoid(gate) ("ratio": gate = q . u + c), gate a float32 value per row computed before the launch.
"""

import triton
import triton.language as tl

from .. import tuning
from .common import autotune_configs, feature_map, head_base, program_ids, prune_configs


@triton.jit
def _attn_fwd_step(acc, l_i, m_i, q, desc_k, desc_v, start_n, qk_scale, N_KV, offs_n,  #
                   FOLD_SCALE: tl.constexpr, DOT_PREC: tl.constexpr):
    # one selected key block: online softmax, then acc += p v. Scores past N_KV are -inf (only the last key block
    # can run past it; masking every step is faster than peeling that step out of the loop).
    # FOLD_SCALE (scale > 0): the row max is taken on raw scores and the scale folded into the exponent's FMA.
    n_ok = (start_n + offs_n) < N_KV
    k = desc_k.load([start_n, 0])
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    if FOLD_SCALE:
        qk = tl.where(n_ok[None, :], qk, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_ij[:, None])
    else:
        qk = tl.where(n_ok[None, :], qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_ij[:, None])
    alpha = tl.math.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = desc_v.load([start_n, 0])
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, l_i, m_ij


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, desc_k, desc_v, LUT,  #
                    qk_scale, N_KV, KEPT, offs_n,  #
                    BLOCK_N: tl.constexpr, FOLD_SCALE: tl.constexpr, DOT_PREC: tl.constexpr):
    # loop over the selected key blocks only (ascending LUT row); tiles come through tensor descriptors (TMA on
    # Hopper): rows past N_KV and columns past HEAD_DIM arrive as zeros, and no pointer tensor occupies registers.
    for it in range(0, KEPT):
        acc, l_i, m_i = _attn_fwd_step(acc, l_i, m_i, q, desc_k, desc_v, tl.load(LUT + it) * BLOCK_N,
                                       qk_scale, N_KV, offs_n, FOLD_SCALE, DOT_PREC)
    return acc, l_i, m_i


# BLOCK_M/BLOCK_N are fixed by blkq/blkk; only warps and pipelining depth are tuned
configs = autotune_configs(tuning.FWD_AUTOTUNE_WARPS, tuning.FWD_AUTOTUNE_STAGES)


@triton.autotune(configs, key=["N_CTX_Q", "N_CTX_KV", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "SPLIT", "KEPT", "REST",
                               "FEATURE_MAP", "STORE_BWD", "MIX"],
                 prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def attn_fwd(Q, K, V, LUT, Out, M, Den, OL, RB, ZB, HT, ZT, W, Bias, Gate,  #
              stride_qz, stride_qh, stride_qm, stride_qk,  #
              stride_kz, stride_kh, stride_kn, stride_kk,  #
              stride_vz, stride_vh, stride_vn, stride_vk,  #
              stride_oz, stride_oh, stride_om, stride_ok,  #
              sm_scale, H, N_CTX_Q, N_CTX_KV, N_QBLK, N_KBLK, KEPT,  #
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
              SPLIT: tl.constexpr, REST: tl.constexpr, HAS_LINEAR: tl.constexpr, FEATURE_MAP: tl.constexpr,
              STORE_BWD: tl.constexpr, DOT_PREC: tl.constexpr, PROJ_PREC: tl.constexpr, EPS: tl.constexpr,
              FOLD_SCALE: tl.constexpr, HAS_PROJ: tl.constexpr, MIX: tl.constexpr = False,
              GATE_LSE: tl.constexpr = False):
    # BLOCK_M rows per program: a query block of SPLIT * BLOCK_M rows runs as SPLIT programs that share its LUT row
    start_m, off_hz, off_z, off_h = program_ids(H)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_CTX_Q
    d_ok = offs_k < HEAD_DIM
    q_mask = m_ok[:, None] & d_ok[None, :]

    Q = head_base(Q, off_z, off_h, stride_qz, stride_qh)
    K = head_base(K, off_z, off_h, stride_kz, stride_kh)
    V = head_base(V, off_z, off_h, stride_vz, stride_vh)
    hz = off_hz.to(tl.int64)
    desc_q = tl.make_tensor_descriptor(Q, shape=[N_CTX_Q, HEAD_DIM], strides=[stride_qm, 1],
                                       block_shape=[BLOCK_M, BLOCK_D])
    desc_k = tl.make_tensor_descriptor(K, shape=[N_CTX_KV, HEAD_DIM], strides=[stride_kn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    desc_v = tl.make_tensor_descriptor(V, shape=[N_CTX_KV, HEAD_DIM], strides=[stride_vn, 1],
                                       block_shape=[BLOCK_N, BLOCK_D])
    q = desc_q.load([start_m * BLOCK_M, 0])
    blk = hz * N_QBLK + start_m // SPLIT  # this query block's row in (B*H*n_q, ...) side tensors
    LUT += blk * KEPT

    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.44269504  # 1/log(2)
    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, desc_k, desc_v, LUT, qk_scale, N_CTX_KV, KEPT, offs_n,
                                    BLOCK_N, FOLD_SCALE, DOT_PREC)
    m_i += tl.math.log2(l_i)
    acc = acc / l_i[:, None]
    row = off_hz.to(tl.int64) * N_CTX_Q + offs_m
    tl.store(M + row, m_i, mask=m_ok)

    # -- linear branch: phi(q) R / (phi(q) . z + eps), then proj_l in float32 ----
    w_mask = d_ok[:, None] & d_ok[None, :]
    if HAS_PROJ:  # off for scope "none" (the sparse part alone): neither W nor the bias is read
        bias = tl.load(Bias + offs_k, mask=d_ok, other=0.0)
    if HAS_LINEAR:
        dd_offs = offs_k[:, None] * BLOCK_D + offs_k[None, :]
        if REST:  # R_i, z_i of this query block (`ops/forward.py`, from the per-key-block states)
            r = tl.load(RB + blk * BLOCK_D * BLOCK_D + dd_offs)
            z = tl.load(ZB + blk * BLOCK_D + offs_k)
        else:
            r = tl.load(HT + hz * BLOCK_D * BLOCK_D + dd_offs)
            z = tl.load(ZT + hz * BLOCK_D + offs_k)
        phiq = feature_map(q.to(tl.float32), d_ok, FEATURE_MAP)
        num = tl.dot(phiq.to(q.dtype), r.to(q.dtype), input_precision=DOT_PREC)
        den = tl.sum(phiq * z[None, :], 1) + EPS
        o_l = num / den[:, None]
        # o_l @ W^T: W[n, k] loaded transposed
        wT = tl.load(W + offs_k[None, :] * HEAD_DIM + offs_k[:, None], mask=w_mask, other=0.0)
        if MIX:  # the linear term o_l + proj_l(o_l), mixed with the sparse part by the row's gate
            lin = tl.dot(o_l, wT, o_l, input_precision=PROJ_PREC) + bias[None, :]
            logit = tl.load(Gate + row, mask=m_ok, other=0.0)
            if GATE_LSE:
                logit += m_i * 0.6931471805599453  # ln Z_sel (m_i holds log2 Z_sel)
            w = tl.sigmoid(logit)
            acc = w[:, None] * acc + (1.0 - w)[:, None] * lin
        else:
            acc = tl.dot(o_l, wT, acc, input_precision=PROJ_PREC)
        if STORE_BWD:
            tl.store(Den + row, den, mask=m_ok)
            tl.store(OL + row[:, None] * HEAD_DIM + offs_k[None, :], o_l.to(Out.dtype.element_ty), mask=q_mask)
    if HAS_PROJ and not MIX:
        acc += bias[None, :]
    O_ptrs = head_base(Out, off_z, off_h, stride_oz, stride_oh) + \
        offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok
    tl.store(O_ptrs, acc.to(Out.dtype.element_ty), mask=q_mask)
