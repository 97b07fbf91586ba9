# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Fusion "mass"'s estimate of the rest's softmax mass in Triton: for each query row i,

    log_rest_i = logsumexp over the key blocks b that i's query block did not select of
                 t_ib = scale * q_i . mu_b + scale^2 / 2 * (q_i * q_i) . var_b + log n_b

(mu_b, var_b: per-dimension mean and variance of key block b's valid keys, n_b their count; `ops/fusion.py`). Like
flash attention with the key blocks' moments in place of keys: an online max and sum over chunks of BLOCK_N key
blocks, so that no (rows x key blocks) score leaves the registers. The backward recomputes the terms from the saved
log_rest, with dt_ib = g_i exp(t_ib - log_rest_i):

    dq_i = scale * sum_b dt_ib mu_b + scale^2 * q_i * sum_b dt_ib var_b          (`rest_mass_dq`, per query tile)
    dmu_b = scale * sum_i dt_ib q_i,   dvar_b = scale^2 / 2 * sum_i dt_ib q_i^2   (`rest_mass_dmoments`, per chunk)

Each program owns the rows it writes, so nothing needs atomics. A query tile lies inside one query block (BLOCK_M
divides blkq), whose row of the 0/1 rest mask (B*H, n_q, n_k) says which key blocks count. Rows with no rest block get
NO_MASS, a finite stand-in for log 0 (`fusion._NO_MASS`). Everything is float32; host side: `ops/rest_mass.py`.
"""

import triton
import triton.language as tl

from .common import head_base, program_ids

NO_MASS = tl.constexpr(-1e30)


@triton.jit
def _query_tile(Q, off_z, off_h, stride_qz, stride_qh, stride_qm, stride_qd, offs_m, offs_d, m_ok, d_ok):
    # q (any float dtype, any strides) as float32, and q * q; rows past Lq and padded columns are 0
    Q = head_base(Q, off_z, off_h, stride_qz, stride_qh)
    q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd, mask=m_ok[:, None] & d_ok[None, :],
                other=0.0).to(tl.float32)
    return q, q * q


@triton.jit
def _moments(MU, VAR, LOGC, hz, offs_n, offs_d, n_ok, d_ok, N_K, HEAD_DIM: tl.constexpr):
    # one chunk of key blocks' mean, variance (contiguous (B*H, N_K, HEAD_DIM) float32) and log count
    rows = hz.to(tl.int64) * N_K + offs_n
    at = rows[:, None] * HEAD_DIM + offs_d[None, :]
    ok = n_ok[:, None] & d_ok[None, :]
    return (tl.load(MU + at, mask=ok, other=0.0), tl.load(VAR + at, mask=ok, other=0.0),
            tl.load(LOGC + offs_n, mask=n_ok, other=0.0))


@triton.jit
def _terms(q, q2, mu, var, log_count, keep, scale, DOT_PREC: tl.constexpr):
    # t (BLOCK_M, BLOCK_N), -inf where the block is selected (or past N_K): exp(t - anything finite) is then 0
    t = scale * tl.dot(q, tl.trans(mu), input_precision=DOT_PREC)
    t += (0.5 * scale * scale) * tl.dot(q2, tl.trans(var), input_precision=DOT_PREC)
    t += log_count[None, :]
    return tl.where(keep[None, :], t, float("-inf"))


@triton.jit
def _rest_row(REST, hz, row0, offs_n, n_ok, N_Q, N_K, BLKQ: tl.constexpr):
    # which key blocks of this chunk count for the query block holding rows row0 .. row0 + BLOCK_M - 1
    qblk = row0 // BLKQ
    base = (hz.to(tl.int64) * N_Q + qblk) * N_K
    return tl.load(REST + base + offs_n, mask=n_ok, other=0) != 0


@triton.jit
def _chunk_terms(q, q2, MU, VAR, LOGC, REST, hz, row0, n0, N_Q, N_K, scale, offs_d, d_ok,
                 BLKQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    # the terms of one query tile (rows row0 ..) against the chunk of key blocks n0 .., with that chunk's moments
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N_K
    mu, var, log_count = _moments(MU, VAR, LOGC, hz, offs_n, offs_d, n_ok, d_ok, N_K, HEAD_DIM)
    keep = _rest_row(REST, hz, row0, offs_n, n_ok, N_Q, N_K, BLKQ)
    return _terms(q, q2, mu, var, log_count, keep, scale, DOT_PREC), mu, var


@triton.jit
def rest_mass_fwd(Q, MU, VAR, LOGC, REST, OUT,  #
                  stride_qz, stride_qh, stride_qm, stride_qd,  #
                  H, LQ, N_Q, N_K, scale,  #
                  BLKQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    tile, hz, off_z, off_h = program_ids(H)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = offs_m < LQ, offs_d < HEAD_DIM
    q, q2 = _query_tile(Q, off_z, off_h, stride_qz, stride_qh, stride_qm, stride_qd, offs_m, offs_d, m_ok, d_ok)
    # the running max starts at NO_MASS, not -inf: a chunk with nothing left then rescales by exp(0), never NaN
    m_i = tl.full([BLOCK_M], NO_MASS, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, N_K, BLOCK_N):
        t, _, _ = _chunk_terms(q, q2, MU, VAR, LOGC, REST, hz, tile * BLOCK_M, n0, N_Q, N_K, scale, offs_d, d_ok,
                               BLKQ, HEAD_DIM, BLOCK_N, DOT_PREC)
        m_new = tl.maximum(m_i, tl.max(t, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(t - m_new[:, None]), 1)
        m_i = m_new
    log_rest = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), NO_MASS)
    tl.store(OUT + hz.to(tl.int64) * LQ + offs_m, log_rest, mask=m_ok)


@triton.jit
def rest_mass_dq(Q, MU, VAR, LOGC, REST, LOG_REST, G, DQ,  #
                 stride_qz, stride_qh, stride_qm, stride_qd,  #
                 H, LQ, N_Q, N_K, scale,  #
                 BLKQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    # dq of one query tile (float32, contiguous (B*H, LQ, HEAD_DIM)), over every chunk of key blocks
    tile, hz, off_z, off_h = program_ids(H)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok, d_ok = offs_m < LQ, offs_d < HEAD_DIM
    q, q2 = _query_tile(Q, off_z, off_h, stride_qz, stride_qh, stride_qm, stride_qd, offs_m, offs_d, m_ok, d_ok)
    rows = hz.to(tl.int64) * LQ + offs_m
    log_rest = tl.load(LOG_REST + rows, mask=m_ok, other=0.0)
    g = tl.load(G + rows, mask=m_ok, other=0.0)  # rows past LQ: no gradient
    d_mu = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_b dt_ib mu_b
    d_var = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum_b dt_ib var_b
    for n0 in range(0, N_K, BLOCK_N):
        t, mu, var = _chunk_terms(q, q2, MU, VAR, LOGC, REST, hz, tile * BLOCK_M, n0, N_Q, N_K, scale, offs_d, d_ok,
                                  BLKQ, HEAD_DIM, BLOCK_N, DOT_PREC)
        # t is -inf on every block that does not count, so p is 0 there, NO_MASS rows included
        dt = tl.exp(t - log_rest[:, None]) * g[:, None]
        d_mu = tl.dot(dt, mu, d_mu, input_precision=DOT_PREC)
        d_var = tl.dot(dt, var, d_var, input_precision=DOT_PREC)
    dq = scale * d_mu + (scale * scale) * q * d_var
    tl.store(DQ + rows[:, None] * HEAD_DIM + offs_d[None, :], dq, mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def rest_mass_dmoments(Q, MU, VAR, LOGC, REST, LOG_REST, G, DMU, DVAR,  #
                       stride_qz, stride_qh, stride_qm, stride_qd,  #
                       H, LQ, N_Q, N_K, N_SPLIT, scale,  #
                       BLKQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr):
    # dmu, dvar of one chunk of BLOCK_N key blocks over the query tiles split, split + N_SPLIT, ...: partial sums
    # (N_SPLIT, B*H, N_K, HEAD_DIM) float32, added on the host side (splits give the GPU enough programs)
    item, hz, off_z, off_h = program_ids(H)
    chunk, split = item // N_SPLIT, item % N_SPLIT
    offs_n = chunk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok, d_ok = offs_n < N_K, offs_d < HEAD_DIM
    mu, var, log_count = _moments(MU, VAR, LOGC, hz, offs_n, offs_d, n_ok, d_ok, N_K, HEAD_DIM)
    acc_q = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # sum_i dt_ib q_i
    acc_q2 = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # sum_i dt_ib q_i^2
    for tile in range(split, tl.cdiv(LQ, BLOCK_M), N_SPLIT):
        offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        m_ok = offs_m < LQ
        q, q2 = _query_tile(Q, off_z, off_h, stride_qz, stride_qh, stride_qm, stride_qd, offs_m, offs_d, m_ok, d_ok)
        rows = hz.to(tl.int64) * LQ + offs_m
        log_rest = tl.load(LOG_REST + rows, mask=m_ok, other=0.0)
        g = tl.load(G + rows, mask=m_ok, other=0.0)
        keep = _rest_row(REST, hz, tile * BLOCK_M, offs_n, n_ok, N_Q, N_K, BLKQ)
        t = _terms(q, q2, mu, var, log_count, keep, scale, DOT_PREC)
        dt = tl.exp(t - log_rest[:, None]) * g[:, None]
        acc_q = tl.dot(tl.trans(dt), q, acc_q, input_precision=DOT_PREC)
        acc_q2 = tl.dot(tl.trans(dt), q2, acc_q2, input_precision=DOT_PREC)
    at = ((split * tl.num_programs(1) + hz).to(tl.int64) * N_K + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    ok = n_ok[:, None] & d_ok[None, :]
    tl.store(DMU + at, scale * acc_q, mask=ok)
    tl.store(DVAR + at, (0.5 * scale * scale) * acc_q2, mask=ok)
