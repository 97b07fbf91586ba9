# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The SLA backward on the kernels: the preprocess (delta and the linear branch's per-query-block gradients), proj_l's
gradients, then dK/dV over the column LUT and dQ over the LUT (Hopper or portable, `kernel_choice`). Registered as
`diffusers_sla::sla_bwd` in `custom_ops.py`.
"""

from __future__ import annotations

import torch

from . import buffers, tuning
from .buffers import geometry, head_tiles, proj_precision, query_rows, split, strides, tma_ready
from .forward import check_gate
from .kernel_choice import backward_kernel
from .kernels import gluon_bwd
from .kernels.common import FEATURE_MAPS, is_cuda
from .kernels.triton_bwd import attn_bwd, attn_bwd_preprocess, proj_grad
from .linear_state import rest_weights


def column_lut(lut: torch.Tensor, n_kblk: int):
    """For each key block, the query blocks that selected it: (col_q (B*H, n_q*kept), offsets and counts
    (B*H, n_kblk)), all int32, built with one stable sort on the device (no host synchronisation). The query blocks
    of key block j are col_q[bh, offsets[bh, j] : offsets[bh, j] + counts[bh, j]], ascending."""
    B, H, n_qblk, kept = lut.shape
    flat = lut.reshape(B * H, n_qblk * kept)
    # a stable sort by key block keeps each key block's entries in flat order, i.e. ascending query block
    sorted_kb, order = torch.sort(flat, dim=-1, stable=True)
    col_q = torch.div(order, kept, rounding_mode="floor").to(torch.int32)
    bounds = torch.arange(n_kblk + 1, device=lut.device, dtype=sorted_kb.dtype).expand(B * H, n_kblk + 1)
    edges = torch.searchsorted(sorted_kb.contiguous(), bounds.contiguous(), out_int32=True)
    return col_q.contiguous(), edges[:, :-1].contiguous(), (edges[:, 1:] - edges[:, :-1]).contiguous()


def _warps(block_d: int, blkq: int) -> int:
    return 4 if block_d <= 64 and blkq <= 64 else 8


def launch_preprocess(o, do, o_l, den, q, proj_weight, proj_bias, lse, delta, dd, dn, drb, dzb, *, n_qblk, blkq,
                      block_d, has_linear, proj, fm, dot_precision, gate=None, gate_lse=False, dos=None, dgate=None):
    """`triton_bwd.attn_bwd_preprocess` as `sla_bwd` launches it (one home, so that the offline compile builds the same
    launch). With a gate (a fusion's mix) it also writes dos (dO_s) and dgate."""
    B, H, Lq, D = q.shape
    mix = gate is not None
    if not mix:
        gate, dos, dgate = lse, do, delta  # unread stand-ins
    attn_bwd_preprocess[(n_qblk, B * H)](
        o, do, o_l, den, q, proj_weight, proj_bias, delta, dd, dn, drb, dzb, lse, gate, dos, dgate,
        *strides(o), *strides(do), *strides(q), H, Lq, n_qblk,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=blkq, HAS_LINEAR=has_linear, HAS_PROJ=proj, FEATURE_MAP=fm,
        DOT_PREC=dot_precision, PROJ_PREC=proj_precision(dot_precision), MIX=mix, GATE_LSE=gate_lse,
        num_warps=tuning.PREPROCESS_WIDE_WARPS if block_d * blkq >= 128 * 128 else _warps(block_d, blkq),
        num_stages=1,
    )


def sla_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
    proj_bias: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, den: torch.Tensor, o_l: torch.Tensor,
    rb: torch.Tensor, zb: torch.Tensor, ht: torch.Tensor, zt: torch.Tensor, lut: torch.Tensor, scale: float,
    feature_map: str, linear_scope: str, blkq: int, blkk: int, dot_precision: str, gate: torch.Tensor | None = None,
    gate_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> dq, dk, dv (in q's dtype, contiguous), d proj_weight (D, D) and d proj_bias (D,) in float32 (both empty
    for scope "none", whose operator has no proj_l), and d gate (B, H, Lq) float32 (empty without a gate).

    gate, gate_lse: the forward's mix (`forward.sla_fwd`); the sparse kernels then see dO_s = w dO, and
    d ln Z_sel = d gate (gate_lse) joins their dS = P (dP - delta) as delta - d gate (`triton_bwd`'s docstring)."""
    g = geometry(q, k, lut, blkq, blkk, linear_scope, mixed=gate is not None)
    B, H, Lq, Lk, D, n_qblk, n_kblk, kept, block_d, rest, has_linear, proj = g
    fm = FEATURE_MAPS[feature_map]
    dev = q.device
    warps = _warps(block_d, blkq)
    stages = 1 if not is_cuda() else 2

    # -- preprocess: delta, dN, dd, dR_i, dz_i ----
    delta = buffers.empty(B, H, Lq, device=dev, dtype=torch.float32)
    # dN = g / d can be large where d is small: keep float32 unless the compute dtype has float32's range
    dn = buffers.empty(B, H, Lq, D, device=dev, dtype=q.dtype if q.dtype == torch.bfloat16 else torch.float32) \
        if has_linear else buffers.empty(0, device=dev, dtype=q.dtype)
    dd = buffers.empty(B, H, Lq, device=dev, dtype=torch.float32) if has_linear else delta.new_empty(0)
    drb = buffers.empty(B, H, n_qblk, block_d, block_d, device=dev, dtype=q.dtype) if has_linear \
        else q.new_empty(0)
    dzb = buffers.empty(B, H, n_qblk, block_d, device=dev, dtype=torch.float32) if has_linear else delta.new_empty(0)
    mix = gate is not None
    if mix:  # the sparse kernels' dO_s = w dO, and d gate
        check_gate(gate, g)
        dos = buffers.empty(B, H, Lq, D, device=dev, dtype=do.dtype)
        dgate = buffers.empty(B, H, Lq, device=dev, dtype=torch.float32)
    else:
        dos, dgate = do, delta.new_empty(0)
    launch_preprocess(o, do, o_l, den, q, proj_weight, proj_bias, lse, delta, dd, dn, drb, dzb, n_qblk=n_qblk,
                      blkq=blkq, block_d=block_d, has_linear=has_linear, proj=proj, fm=fm,
                      dot_precision=dot_precision, gate=gate, gate_lse=gate_lse, dos=dos, dgate=dgate)

    # -- proj_l gradients: dW = sum dO^T o_l, db = sum dO ----
    if has_linear:
        n_split = split(B * H * n_qblk, 1, tuning.PROJ_GRAD_TARGET)
        dwp = buffers.empty(n_split, block_d, block_d, device=dev, dtype=torch.float32)
        dbp = buffers.empty(n_split, block_d, device=dev, dtype=torch.float32)
        proj_grad[(n_split,)](
            do, o_l, dwp, dbp, lse, gate if mix else lse, *strides(do), H, Lq, n_qblk, B * H * n_qblk, n_split,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=blkq, DOT_PREC=dot_precision, MIX=mix, GATE_LSE=gate_lse,
            num_warps=warps, num_stages=stages,
        )
        dw = dwp.sum(0)[:D, :D].contiguous()
        db = dbp.sum(0)[:D].contiguous()
        # dh_j = sum of dR_i, dz_j of dz_i over the query blocks i that did not select key block j: 0/1 products.
        # dz_j stays a float32 product (not DZ minus the selecting dz_i, as the forward forms z_i): the dz_i have
        # both signs, and the product costs ~1% of the backward.
        if rest:
            weights, weights32 = rest_weights(lut, n_kblk, q.dtype)
            dhb = torch.matmul(weights.transpose(-1, -2), drb.view(B, H, n_qblk, block_d * block_d))
            dzbk = torch.matmul(weights32.transpose(-1, -2), dzb)
            dht, dzt = ht, zt  # unused
        else:
            dht = drb.view(B * H, n_qblk, block_d, block_d).sum(1, dtype=torch.float32)
            dzt = dzb.view(B * H, n_qblk, block_d).sum(1)
            dhb, dzbk = drb, dzb  # unused
    else:
        if proj:  # an empty linear branch: proj_l's bias still reaches the output
            dw = torch.zeros(D, D, device=dev, dtype=torch.float32)
            db = do.sum(dim=(0, 1, 2), dtype=torch.float32)
        else:
            dw, db = delta.new_empty(0), delta.new_empty(0)
        dht, dzt, dhb, dzbk = ht, zt, drb, dzb  # unused

    # -- dK, dV over the column LUT, dQ over the LUT: two launches (Gluon kernels on Hopper) ----
    qd, kd, vd, dod = tma_ready(q), tma_ready(k), tma_ready(v), tma_ready(dos)
    col_q, col_off, col_cnt = column_lut(lut, n_kblk)
    dq = buffers.empty(B, H, Lq, D, device=dev, dtype=q.dtype)
    dk = buffers.empty(B, H, Lk, D, device=dev, dtype=q.dtype)
    dv = buffers.empty(B, H, Lk, D, device=dev, dtype=q.dtype)
    if backward_kernel(q, g, blkq, blkk, dot_precision) == "hopper":
        # dh and R tiles in the input dtype: "rest" one per key block / query block; "all" the per-head totals,
        # rounded as `attn_bwd` rounds them before its products
        dh_in, dz_in = (dhb, dzbk) if rest else (dht.to(q.dtype), dzt)
        r_in, z_in = (rb, zb) if rest else (ht.to(q.dtype), zt)
        gluon_bwd.launch_dkdv(qd, kd, vd, dod, dk, dv, lse, delta, col_q, col_off, col_cnt, dh_in, dz_in, scale,
                              n_qblk, n_kblk, kept, block_d, blkq, blkk, rest, has_linear, fm)
        gluon_bwd.launch_dq(qd, kd, vd, dod, dq, lut, lse, delta, dn, dd, r_in, z_in, scale, n_qblk, kept, block_d,
                            blkq, blkk, rest, has_linear, fm)
        return dq, dk, dv, dw, db, dgate
    dkdv_rows, dq_rows = query_rows(blkq, "DKDV"), query_rows(blkq, "DQ")
    for program, n_prog, rows in ((0, n_kblk, dkdv_rows), (1, n_qblk * (blkq // dq_rows), dq_rows)):
        attn_bwd[(n_prog, B * H)](
            qd, kd, vd, dod, head_tiles(qd, rows, block_d), head_tiles(kd, blkk, block_d),
            head_tiles(vd, blkk, block_d), head_tiles(dod, rows, block_d),
            lse, delta, dn, dd, lut, col_q, col_off, col_cnt,
            rb, zb, ht, zt, dhb, dzbk, dht, dzt,
            dq, dk, dv,
            *strides(qd), *strides(kd), *strides(vd), *strides(dod),
            scale, H, Lq, Lk, n_qblk, n_kblk, kept,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=blkq, BLOCK_N=blkk, STEP_M=rows,
            REST=rest, HAS_LINEAR=has_linear, FEATURE_MAP=fm, DOT_PREC=dot_precision, PROGRAM=program,
        )
    return dq, dk, dv, dw, db, dgate
