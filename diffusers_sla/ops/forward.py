# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The SLA forward on the kernels: the linear state, R_i and z_i for scope "rest", then the attention kernel (Hopper
or portable, `kernel_choice`). Registered as `diffusers_sla::sla_fwd` in `custom_ops.py`.
"""

from __future__ import annotations

import torch

from ..config import LINEAR_EPS
from . import buffers
from .buffers import Geometry, geometry, proj_precision, query_rows, side_shapes, strides, tma_addressable, tma_ready
from .kernel_choice import forward_kernel
from .kernels import gluon_fwd
from .kernels.common import FEATURE_MAPS
from .kernels.triton_fwd import attn_fwd
from .linear_state import LinearState, linear_state_of, rest_weights


def sla_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
    lut: torch.Tensor, scale: float, feature_map: str, linear_scope: str, blkq: int, blkk: int, store_bwd: bool,
    dot_precision: str, gate: torch.Tensor | None = None, gate_lse: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor]:
    """-> o (B, H, Lq, D) in q's dtype and memory layout, lse (B, H, Lq) float32 in log2 units, and what backward
    needs: the linear denominator (B, H, Lq) float32, o_l before proj_l (B, H, Lq, D), R_i and z_i per query block
    ("rest"), the per-head totals H and Z (empty for "rest", which reads R_i, z_i). Unused side outputs are empty.

    gate (B, H, Lq) float32, scope "rest" only: the fusions' mix (`ops/fusion.py`) instead of SLA's sum,
    o = w o_s + (1 - w) (o_l + proj_l(o_l)) with w = sigmoid(gate + ln Z_sel) if gate_lse else sigmoid(gate)."""
    g = geometry(q, k, lut, blkq, blkk, linear_scope, mixed=gate is not None)
    buffers.use_descriptors()
    qd, kd, vd = tma_ready(q), tma_ready(k), tma_ready(v)
    state = linear_state_of(kd, vd, g, blkk, feature_map, dot_precision)
    return attend(q, qd, kd, vd, proj_weight, proj_bias, lut, state, g, scale, feature_map, blkq, blkk, store_bwd,
                  dot_precision, gate=gate, gate_lse=gate_lse)


def check_gate(gate, g: Geometry) -> None:
    if gate is None:
        return
    if not (g.rest and g.has_linear):
        raise ValueError("`gate` (a fusion's mix) needs linear_scope 'rest' and a linear branch.")
    if gate.shape != (g.B, g.H, g.Lq) or gate.dtype != torch.float32 or not gate.is_contiguous():
        raise ValueError(f"`gate` must be a contiguous float32 tensor of shape {(g.B, g.H, g.Lq)}, got {gate.dtype} "
                         f"{tuple(gate.shape)}.")


def attend(q, qd, kd, vd, proj_weight, proj_bias, lut, state: LinearState, g: Geometry, scale, feature_map,
           blkq, blkk, store_bwd, dot_precision, rest_weights_and_z=None, gate=None, gate_lse=False):
    """The forward after the linear state: R_i, z_i ("rest"), then the attention kernel. -> `sla_fwd`'s outputs.
    rest_weights_and_z: ("rest") the 0/1 matrix and z_i when the top-k already made them
    (`fused_selection.top_blocks_and_rest`)."""
    B, H, Lq, Lk, D, n_qblk, n_kblk, kept, block_d, rest, has_linear, proj = g
    check_gate(gate, g)
    ht, zt, hb, zkb, z_parts = state
    o = buffers.empty_like_input(q)
    lse = buffers.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    s_den, s_ol, s_rb, _ = side_shapes(q, n_qblk, block_d, store_bwd, rest, has_linear)
    den = buffers.empty(s_den, device=q.device, dtype=torch.float32)
    o_l = buffers.empty(s_ol, device=q.device, dtype=q.dtype)
    if rest and has_linear:
        # R_i = sum of h_j over the key blocks query block i did not select, a 0/1 matrix product; z_i = Z - the
        # selected z_j, formed in the matrix's launch (cheaper than a float32 product for z_i)
        weights, zb = rest_weights_and_z or rest_weights(lut, n_kblk, q.dtype, zkb, z_parts)
        rb = torch.matmul(weights, hb.view(B, H, n_kblk, block_d * block_d)).view(s_rb)
    else:
        rb = q.new_empty(0)
        zb = zt.new_empty(0)
    if forward_kernel(q, g, blkq, blkk, dot_precision) == "hopper":
        # R tiles in the input dtype: "rest" R_i per query block; "all" the per-head totals, rounded as
        # `attn_fwd` rounds them before its product
        r_in, z_in = (rb, zb) if rest else (ht.to(q.dtype), zt)
        if not tma_addressable(o):  # the output leaves by TMA: q's layout when it can, else contiguous
            o = buffers.empty(B, H, Lq, D, device=q.device, dtype=q.dtype)
        gluon_fwd.launch(qd, kd, vd, lut, o, lse, den, o_l, r_in, z_in, proj_weight, proj_bias, scale, n_qblk, kept,
                         block_d, blkq, blkk, rest, has_linear, FEATURE_MAPS[feature_map], store_bwd, LINEAR_EPS,
                         has_proj=proj, gate=gate, gate_lse=gate_lse)
        return o, lse, den, o_l, rb, zb, ht, zt
    rows = query_rows(blkq, "FWD")
    attn_fwd[(n_qblk * (blkq // rows), B * H)](
        qd, kd, vd, lut, o, lse, den, o_l, rb, zb, ht, zt, proj_weight, proj_bias, lse if gate is None else gate,
        *strides(qd), *strides(kd), *strides(vd), *strides(o),
        scale, H, Lq, Lk, n_qblk, n_kblk, kept,
        HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=rows, BLOCK_N=blkk, SPLIT=blkq // rows,
        REST=rest, HAS_LINEAR=has_linear, HAS_PROJ=proj, FEATURE_MAP=FEATURE_MAPS[feature_map], STORE_BWD=store_bwd,
        DOT_PREC=dot_precision, PROJ_PREC=proj_precision(dot_precision), EPS=LINEAR_EPS,
        FOLD_SCALE=scale > 0, MIX=gate is not None, GATE_LSE=gate_lse,
    )
    return o, lse, den, o_l, rb, zb, ht, zt
