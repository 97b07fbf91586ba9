# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""SLA forward in Triton.

Sparse-Linear Attention: Zhang et al., "SLA: Beyond Sparsity in Diffusion Transformers via Fine-Tunable Sparse-Linear
Attention", arXiv 2509.24006. The sparse branch is flash attention (Dao et al., arXiv 2205.14135 / 2307.08691) over
the key blocks a query block selected; the layout follows the Triton fused-attention tutorial.

One program per (query block, batch*head) runs flash attention over its selected key blocks, the K/V tiles addressed
through tensor descriptors (TMA on Hopper), and applies the linear branch and `proj_l` in its epilogue:
phi(q) R_i / (phi(q) . z_i + eps). For scope "all", R_i, z_i are the per-head totals H = sum_j phi(k_j)^T v_j and
Z = sum_j phi(k_j) (`_linear_state`); for "rest" they are sums of the per-key-block h_j, z_j over the blocks the query
block did not select, formed before the launch (`custom_ops.sla_fwd`: R_i as a 0/1 matrix product, z_i as Z minus the
selected z_j), so that the attention loop holds no D x D state.

Feature maps are constexpr ids: 0 = softmax over head_dim, 1 = elu + 1, 2 = relu. Head dims that are not a power of
two run in a padded BLOCK_D with masked columns (padded columns are 0 after every feature map).
"""

import functools
import os

import triton
import triton.language as tl

LINEAR_EPS = 1e-5  # same constant as reference.LINEAR_EPS
FEATURE_MAPS = {"softmax": 0, "elu": 1, "relu": 2}


@functools.cache
def _driver_backend():
    # asked once per process: the forward consults it for several launches, and each query costs host time
    try:
        return triton.runtime.driver.active.get_current_target().backend
    except RuntimeError:  # no GPU driver on this machine (CPU-only CI without the interpreter)
        return None


def _backend():
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    return _driver_backend()


def is_hip():
    return _backend() == "hip"


def is_cuda():
    return _backend() == "cuda"


@triton.jit
def _feature_map(x, d_ok, FEATURE_MAP: tl.constexpr):
    # x: fp32 (rows, BLOCK_D); d_ok: (BLOCK_D,) real head-dim columns. Padded columns come out as 0.
    if FEATURE_MAP == 0:
        x = tl.where(d_ok[None, :], x, float("-inf"))
        e = tl.exp(x - tl.max(x, 1)[:, None])
        phi = e / tl.sum(e, 1)[:, None]
    elif FEATURE_MAP == 1:
        phi = tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))
        phi = tl.where(d_ok[None, :], phi, 0.0)
    else:
        phi = tl.maximum(x, 0.0)
    return phi


@triton.jit
def _feature_map_bwd(x, phi, dphi, FEATURE_MAP: tl.constexpr):
    # d phi / d x applied to dphi; phi is the fp32 feature value of x (0 on padded columns).
    if FEATURE_MAP == 0:
        dx = phi * (dphi - tl.sum(dphi * phi, 1)[:, None])
    elif FEATURE_MAP == 1:
        dx = tl.where(x > 0, dphi, dphi * phi)
    else:
        dx = tl.where(x > 0, dphi, 0.0)
    return dx


@triton.jit
def _row_sums(X, Parts,  #
              stride_xz, stride_xh, stride_xm, stride_xk,  #
              H, N_CTX, CHUNK, N_PART,  #
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    # First pass of the key mean: the float32 sum of rows [part * CHUNK, (part + 1) * CHUNK) of one head, written to
    # Parts (B*H, N_PART, BLOCK_D). Many programs, each streaming its rows, read x as fast as the pooling pass does
    # (50 us at the Wan shape on the H100, 71 for a torch mean over dim 2; NOTES.md, "Glue"); `_block_mean` adds the
    # parts in a fixed order.
    part = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_D)
    d_ok = offs_k < HEAD_DIM
    X += off_z.to(tl.int64) * stride_xz + off_h.to(tl.int64) * stride_xh
    end = tl.minimum(part * CHUNK + CHUNK, N_CTX)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for m0 in range(part * CHUNK, end, BLOCK_M):
        rows = m0 + offs_m
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(rows < end)[:, None] & d_ok[None, :], other=0.0)
        acc += x.to(tl.float32)
    tl.store(Parts + (off_hz.to(tl.int64) * N_PART + part) * BLOCK_D + offs_k, tl.sum(acc, 0))


@triton.jit
def _key_mean(Parts, Mean, N_PART, N_CTX, BLOCK_D: tl.constexpr, PART_P2: tl.constexpr, DTYPE: tl.constexpr):
    # Second pass of the key mean, one program per head: (sum of the N_PART row sums of `_row_sums`, in a fixed order)
    # / N_CTX, rounded to the keys' dtype DTYPE as `selection.block_scores` rounds k.mean(); float32 (B*H, BLOCK_D).
    # Once per head, so that each pooling program reads one vector, not its head's parts (22 KB at the Wan shape, more
    # than its 16 KB block; on the GPU the two ways time the same, NOTES.md v12).
    off_hz = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, PART_P2)
    parts = tl.load(Parts + (off_hz * N_PART + offs_p[:, None]) * BLOCK_D + offs_k[None, :],
                    mask=(offs_p < N_PART)[:, None], other=0.0)
    tl.store(Mean + off_hz * BLOCK_D + offs_k, (tl.sum(parts, 0) / N_CTX).to(DTYPE).to(tl.float32))


@triton.jit
def _block_mean(X, Mean, Out,  #
                stride_xz, stride_xh, stride_xm, stride_xk,  #
                H, N_CTX, N_BLK,  #
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr, CENTER: tl.constexpr):
    # Block selection's pooling in one pass: mean over each block's real rows in float32, of x or (for keys) of
    # x - mean rounded to x's dtype, as `selection.block_scores` computes it with several PyTorch passes.
    # CENTER: Mean is the head's rounded key mean (`_key_mean`, float32 (B*H, BLOCK_D)).
    blk = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    offs_m = blk * BLOCK + tl.arange(0, BLOCK)
    offs_k = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_CTX
    d_ok = offs_k < HEAD_DIM
    x = tl.load(X + off_z.to(tl.int64) * stride_xz + off_h.to(tl.int64) * stride_xh + offs_m[:, None] * stride_xm +
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
def _z_rest(LUT, ZB, ZS, ZI, row, hz, N_KBLK, KEPT, N_SPLIT, BLOCK_D: tl.constexpr):
    # Scope "rest": z_i = Z - the sum of the z_j of the blocks query block `row` selected (LUT row), Z the sum of
    # `_linear_state`'s N_SPLIT per-split partials (ZS), into ZI. Every z_j is >= 0 (phi is positive for all three
    # feature maps), so the subtraction cancels nothing: its error stays at float32 rounding of z_i itself (relative
    # ~1e-6 against a product over the unselected blocks). Summed one vector after another, four loads in flight:
    # the same order, and so the same bits, with any number of warps (`_top_blocks_kernel` fuses this,
    # `_rest_weights_kernel` does it apart).
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
def _top_blocks_kernel(S, LUT, W, ZB, ZS, ZI, N_K, KEPT, N_QBLK, N_SPLIT,  #
                       N_K_P2: tl.constexpr, REST: tl.constexpr, BLOCK_D: tl.constexpr):
    # Block selection's top-k for one row of scores (any float dtype, ranked as float32): the KEPT largest, ties to the
    # lower index (as `selection.top_blocks`), written ascending. Each score's float32 bits become an order-preserving
    # int32; the KEPT-th largest value comes from a bisection (`_kth_largest`); every larger score is chosen, and of
    # the scores equal to it the lowest indices, as many as are still needed; a prefix sum places the chosen indices
    # in order.
    # REST (scope "rest" in eager calls, where the linear state is ready when the top-k runs): this program also
    # writes its row of the 0/1 matrix W (1 = not selected) in W's dtype and z_i (`_z_rest`), which
    # `_rest_weights_kernel` would otherwise build from the LUT in a launch of its own.
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
        tl.debug_barrier()  # the LUT row just stored, read back by `_z_rest` (other lanes wrote it)
        _z_rest(LUT, ZB, ZS, ZI, row, row // N_QBLK, N_K, KEPT, N_SPLIT, BLOCK_D)


@triton.jit
def _rest_weights_kernel(LUT, W, W32, ZB, ZS, ZI, N_QBLK, N_KBLK, KEPT, N_SPLIT,  #
                         KEPT_P2: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                         STORE_W32: tl.constexpr, Z_REST: tl.constexpr):
    # Scope "rest": the (B*H, n_q, n_k) 0/1 matrix (1 = key block j not selected by query block i) in the compute
    # dtype (W) and, with STORE_W32, in float32 (W32), from the LUT in one launch; with Z_REST also z_i (`_z_rest`).
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
        _z_rest(LUT, ZB, ZS, ZI, row, hz, N_KBLK, KEPT, N_SPLIT, BLOCK_D)


@triton.jit
def _linear_state(K, V, HB, ZB, HS, ZS,  #
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
    # nothing D x D inside the attention loop), z_i = Z - the selected z_j (`_rest_weights_kernel`). K/V tiles come
    # through tensor descriptors (rows past N_KV and columns past HEAD_DIM are zeros), h_j leaves through one as well.
    split = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_D)
    d_ok = offs_k < HEAD_DIM
    K += off_z.to(tl.int64) * stride_kz + off_h.to(tl.int64) * stride_kh
    V += off_z.to(tl.int64) * stride_vz + off_h.to(tl.int64) * stride_vh
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
            phik = tl.where(n_ok[:, None], _feature_map(k.to(tl.float32), d_ok, FEATURE_MAP), 0.0).to(v.dtype)
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
            phik = tl.where(n_ok[:, None], _feature_map(k.to(tl.float32), d_ok, FEATURE_MAP), 0.0).to(v.dtype)
            z += tl.sum(phik.to(tl.float32), 0)
            h = tl.dot(tl.trans(phik), v, h, input_precision=DOT_PREC)
    base = off_hz.to(tl.int64) * SPLIT + split
    if not STORE_BLOCKS:
        tl.store(HS + base * BLOCK_D * BLOCK_D + offs_k[:, None] * BLOCK_D + offs_k[None, :], h)
    tl.store(ZS + base * BLOCK_D + offs_k, z)


@triton.jit
def _attn_fwd_step(acc, l_i, m_i, q, desc_k, desc_v, start_n, qk_scale, N_KV, offs_n,  #
                   FOLD_SCALE: tl.constexpr, DOT_PREC: tl.constexpr):
    # one selected key block: online softmax, then acc += p v. Scores past N_KV are -inf (only the last key block
    # can run past it; masking every step is faster than peeling that step out of the loop, NOTES.md v6).
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


def _fwd_configs():
    # BLOCK_M/BLOCK_N are fixed by blkq/blkk; only warps and pipelining depth are tuned.
    if not is_cuda():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in [4, 8] for s in [1, 2, 3, 4]]


def keep(conf):
    return True


configs = [c for c in _fwd_configs() if keep(c)]


def heuristic_warps(block_m, block_n, block_d):
    # a 128-row tile (or a 128 x 128 linear accumulator) needs 8 warps to stay in registers
    return 8 if max(block_m, block_n) * block_d >= 128 * 128 else 4


def prune_configs(configs, named_args, **kwargs):
    """Autotuning is opt-in (DIFFUSERS_SLA_AUTOTUNE=1): by default one config chosen from the block shapes, so that a
    new shape costs one compile, not a benchmark of every config."""
    if len(configs) == 1 or os.environ.get("DIFFUSERS_SLA_AUTOTUNE") == "1":
        return configs
    args = {**named_args, **kwargs}
    # manual overrides: DIFFUSERS_SLA_WARPS / _STAGES (forward), DIFFUSERS_SLA_BWD_* (both backward launches),
    # DIFFUSERS_SLA_BWD0_* (dK/dV programs only), DIFFUSERS_SLA_BWD1_* (dQ programs only)
    kind = "BWD_" if "PROGRAM" in args else ""
    if kind:
        per = f"BWD{args['PROGRAM']}_"
        if os.environ.get(f"DIFFUSERS_SLA_{per}WARPS") or os.environ.get(f"DIFFUSERS_SLA_{per}STAGES"):
            kind = per
    rows = args.get("STEP_M", args["BLOCK_M"])  # query rows per tile (backward programs: STEP_M)
    warps = int(os.environ.get(f"DIFFUSERS_SLA_{kind}WARPS", "0")) or \
        heuristic_warps(rows, args.get("BLOCK_N", 0), args["BLOCK_D"])
    # measured on the H100 (NOTES.md): 3 stages for the forward's 64 x 128 16-bit K/V tiles (-12%) and for the dK/dV
    # programs' 128 x 128 q/dO tiles with 64-row key blocks (-4%, v4); 2 for larger tiles (shared memory), for dQ and
    # for dK/dV steps of 64 x 128 tiles (v5: 1.87 ms against 1.96 with 3 stages)
    el = args["Q"].element_size()
    if not kind:
        deep = args["BLOCK_N"] * args["BLOCK_D"] * el <= 64 * 128 * 2
    else:
        q_tile = rows * args["BLOCK_D"] * el
        deep = args["PROGRAM"] == 0 and args["BLOCK_N"] <= 64 and rows >= 128 and q_tile <= 128 * 128 * 2
    stages = int(os.environ.get(f"DIFFUSERS_SLA_{kind}STAGES", "3" if deep else "2"))
    picked = [c for c in configs if c.num_warps == warps and c.num_stages == stages]
    return picked[:1] or configs[:1]


@triton.autotune(configs, key=["N_CTX_Q", "N_CTX_KV", "HEAD_DIM", "BLOCK_M", "BLOCK_N", "SPLIT", "KEPT", "REST",
                               "FEATURE_MAP", "STORE_BWD"], prune_configs_by={"early_config_prune": prune_configs})
@triton.jit
def _attn_fwd(Q, K, V, LUT, Out, M, Den, OL, RB, ZB, HT, ZT, W, Bias,  #
              stride_qz, stride_qh, stride_qm, stride_qk,  #
              stride_kz, stride_kh, stride_kn, stride_kk,  #
              stride_vz, stride_vh, stride_vn, stride_vk,  #
              stride_oz, stride_oh, stride_om, stride_ok,  #
              sm_scale, H, N_CTX_Q, N_CTX_KV, N_QBLK, N_KBLK, KEPT,  #
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  #
              SPLIT: tl.constexpr, REST: tl.constexpr, HAS_LINEAR: tl.constexpr, FEATURE_MAP: tl.constexpr,
              STORE_BWD: tl.constexpr, DOT_PREC: tl.constexpr, PROJ_PREC: tl.constexpr, EPS: tl.constexpr,
              FOLD_SCALE: tl.constexpr, HAS_PROJ: tl.constexpr):
    # BLOCK_M rows per program: a query block of SPLIT * BLOCK_M rows runs as SPLIT programs that share its LUT row
    start_m = tl.program_id(0)
    off_hz = tl.program_id(1)
    off_z = off_hz // H
    off_h = off_hz % H
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N_CTX_Q
    d_ok = offs_k < HEAD_DIM
    q_mask = m_ok[:, None] & d_ok[None, :]

    Q += off_z.to(tl.int64) * stride_qz + off_h.to(tl.int64) * stride_qh
    K += off_z.to(tl.int64) * stride_kz + off_h.to(tl.int64) * stride_kh
    V += off_z.to(tl.int64) * stride_vz + off_h.to(tl.int64) * stride_vh
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
        if REST:  # R_i, z_i of this query block (custom_ops.sla_fwd, from the per-key-block states)
            r = tl.load(RB + blk * BLOCK_D * BLOCK_D + dd_offs)
            z = tl.load(ZB + blk * BLOCK_D + offs_k)
        else:
            r = tl.load(HT + hz * BLOCK_D * BLOCK_D + dd_offs)
            z = tl.load(ZT + hz * BLOCK_D + offs_k)
        phiq = _feature_map(q.to(tl.float32), d_ok, FEATURE_MAP)
        num = tl.dot(phiq.to(q.dtype), r.to(q.dtype), input_precision=DOT_PREC)
        den = tl.sum(phiq * z[None, :], 1) + EPS
        o_l = num / den[:, None]
        # o_l @ W^T: W[n, k] loaded transposed
        wT = tl.load(W + offs_k[None, :] * HEAD_DIM + offs_k[:, None], mask=w_mask, other=0.0)
        acc = tl.dot(o_l, wT, acc, input_precision=PROJ_PREC)
        if STORE_BWD:
            tl.store(Den + row, den, mask=m_ok)
            tl.store(OL + row[:, None] * HEAD_DIM + offs_k[None, :], o_l.to(Out.dtype.element_ty), mask=q_mask)
    if HAS_PROJ:
        acc += bias[None, :]
    O_ptrs = Out + off_z.to(tl.int64) * stride_oz + off_h.to(tl.int64) * stride_oh + \
        offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok
    tl.store(O_ptrs, acc.to(Out.dtype.element_ty), mask=q_mask)
