# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`sla_triton`: the Triton SLA backend (registered as "triton" in `ops/api.py`), with its autograd Function.

Same contract as `reference.sla_reference`: same block selection (`selection.select_blocks`), linear denominator
`+ LINEAR_EPS`, proj_l in float32, output in q's dtype, gradients for q, k, v, proj_weight and proj_bias (none for
proj_l with `linear_scope="none"`: the kernels then get empty stand-ins, never proj_l itself).

Precision policy for float32 (and float64) inputs, set with `set_fp32_compute` or the environment switch
`tuning.FP32_COMPUTE_ENV` (read at import):

* `"bf16"` (default on CUDA): q, k, v are cast to bfloat16 and the kernels run on the bf16 tensor cores;
* `"tf32"`: the kernels run on float32 tensors with tf32 matrix products;
* `"ieee"`: full float32 products (slow on the GPU; what the Triton interpreter always does on the CPU).

float16 and bfloat16 inputs always run in their own dtype. Block selection always sees the caller's tensors.

Block selection: `tuning.SELECT = "fused"` (default) pools q and k with one Triton pass each
(`fused_selection`: the same roundings, scores and top-k as `selection.select_blocks`, only the order of the float32
sums inside a block differs); `"torch"` calls `selection.select_blocks` itself. In eager calls the fused selection
runs inside the Function's forward (`custom_ops.select_and_forward`: its pooling on a second CUDA stream beside the
linear branch's first pass, unless `tuning.OVERLAP` is off); under `torch.compile` it is its own op, ahead of the
forward op.
"""

from __future__ import annotations

import logging

import torch

from ..config import ALLOWED_BLOCK_SIZES, ALLOWED_LINEAR_SCOPES
from . import custom_ops, tuning
from . import fusion as fusion_ops
from .reference import sla_reference
from .selection import select_blocks

logger = logging.getLogger(__name__)

FP32_COMPUTE_MODES = tuning.FP32_COMPUTE_MODES
MAX_HEAD_DIM = 128

_fp32_compute = tuning.FP32_COMPUTE
_warned_fallback = False


def set_fp32_compute(mode: str) -> None:
    """How the Triton backend computes float32/float64 inputs on the GPU: "bf16" (default), "tf32" or "ieee"."""
    global _fp32_compute
    if mode not in FP32_COMPUTE_MODES:
        raise ValueError(f"`mode` must be one of {list(FP32_COMPUTE_MODES)}, got {mode!r}.")
    _fp32_compute = mode


def get_fp32_compute() -> str:
    return _fp32_compute


def _compute_dtype_and_precision(dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, str]:
    if dtype in (torch.float16, torch.bfloat16):
        return dtype, "tf32"  # the precision flag only matters for float32 operands
    if device.type != "cuda":
        return torch.float32, "ieee"  # Triton interpreter: bf16 products are not emulated faithfully there
    if _fp32_compute == "bf16":
        return torch.bfloat16, "tf32"
    return torch.float32, _fp32_compute


class _SLATriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, proj_weight, proj_bias, lut, scale, feature_map, linear_scope, blkq, blkk,
                dot_precision, selection=None, gate=None, gate_lse=False):
        # lut None: selected here from selection = (q_sel, k_sel, topk, forced_blocks), beside the forward's first
        # kernels. gate (B, H, Lq) float32: a fusion's mix instead of SLA's sum (`forward.sla_fwd`).
        store_bwd = any(ctx.needs_input_grad[:5]) or any(ctx.needs_input_grad[13:14])
        args = (scale, feature_map, linear_scope, blkq, blkk, store_bwd, dot_precision)
        if lut is None:
            q_sel, k_sel, topk, forced = selection
            lut, outs = custom_ops.select_and_forward(q_sel, k_sel, q, k, v, proj_weight, proj_bias, topk, *args,
                                                      forced)
        else:
            outs = custom_ops.forward(q, k, v, proj_weight, proj_bias, lut, *args, gate, gate_lse)
        o, lse, den, o_l, rb, zb, ht, zt = outs
        if store_bwd:
            ctx.save_for_backward(q, k, v, proj_weight, proj_bias, o, lse, den, o_l, rb, zb, ht, zt, lut, gate)
            ctx.args = (scale, feature_map, linear_scope, blkq, blkk, dot_precision, gate_lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, proj_weight, proj_bias, o, lse, den, o_l, rb, zb, ht, zt, lut, gate = ctx.saved_tensors
        *args, gate_lse = ctx.args
        dq, dk, dv, dw, db, dgate = custom_ops.backward(
            do, q, k, v, proj_weight, proj_bias, o, lse, den, o_l, rb, zb, ht, zt, lut, *args, gate,
            gate_lse)
        if ctx.args[2] == "none":  # no projection in the operator: its stand-ins get no gradient
            dw = db = None
        return (dq, dk, dv, dw, db, None, None, None, None, None, None, None, None,
                dgate if gate is not None else None, None)


def _fused(q, k, v, proj_weight, proj_bias, lut, *, blkq, blkk, feature_map, linear_scope, scale, fusion,
           ratio_weight, ratio_bias):
    """Fusion "mass" / "ratio" (`ops/fusion.py`) on the kernels: each row's gate first ("mass": -ln Zhat_rest on the
    rest-mass kernels; "ratio": q . u + c), then the attention kernels mix the two branches in their epilogue.
    Output in q's dtype."""
    fusion_ops.check_fusion(fusion, linear_scope)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute_dtype, dot_precision = _compute_dtype_and_precision(q.dtype, q.device)
    qc, kc, vc = (x.to(compute_dtype) for x in (q, k, v))
    # the gate sees the same (rounded) inputs as the kernels, in float32
    if fusion == "mass":
        gate = -fusion_ops.rest_log_mass(qc, kc, lut, blkq, blkk, scale)
    else:
        gate = qc.to(torch.float32) @ ratio_weight.to(torch.float32) + ratio_bias.to(torch.float32)
    o = _SLATriton.apply(qc, kc, vc, proj_weight.to(torch.float32).contiguous(),
                         proj_bias.to(torch.float32).contiguous(), lut, float(scale), feature_map, linear_scope, blkq,
                         blkk, dot_precision, None, gate.to(torch.float32).contiguous(), fusion == "mass")
    return o.to(q.dtype)


def _check_args(q, topk, blkq, blkk, feature_map, linear_scope):
    for name, value in (("blkq", blkq), ("blkk", blkk)):
        if value not in ALLOWED_BLOCK_SIZES:
            raise ValueError(f"`{name}` must be one of {list(ALLOWED_BLOCK_SIZES)} for backend='triton', got {value!r}.")
    if feature_map not in ("softmax", "elu", "relu"):
        raise ValueError(f"`feature_map` must be one of ['softmax', 'elu', 'relu'], got {feature_map!r}.")
    if linear_scope not in ALLOWED_LINEAR_SCOPES:
        raise ValueError(f"`linear_scope` must be one of {list(ALLOWED_LINEAR_SCOPES)}, got {linear_scope!r}.")
    if isinstance(topk, bool) or not isinstance(topk, (int, float)) or not 0.0 < topk <= 1.0:
        raise ValueError(f"`topk` must be a number in (0, 1], got {topk!r}.")
    if q.ndim != 4:
        raise ValueError(f"`q` must have 4 dims (batch, heads, seq, head_dim), got shape {tuple(q.shape)}.")


def sla_triton_with_lut(q, k, v, proj_weight, proj_bias, lut, *, blkq, blkk, feature_map, linear_scope, scale=None,
                        fusion="sla", ratio_weight=None, ratio_bias=None):
    """`sla_triton` with a given block map `lut` (int32 (B, H, n_q, kept), ascending rows): tests and benchmarks
    share one map with the reference through this."""
    if fusion != "sla":
        return _fused(q, k, v, proj_weight, proj_bias, lut.to(torch.int32).contiguous(), blkq=blkq, blkk=blkk,
                      feature_map=feature_map, linear_scope=linear_scope, scale=scale, fusion=fusion,
                      ratio_weight=ratio_weight, ratio_bias=ratio_bias)
    return _run(q, k, v, proj_weight, proj_bias, lut.to(torch.int32).contiguous(), None, blkq=blkq, blkk=blkk,
                feature_map=feature_map, linear_scope=linear_scope, scale=scale)


def _run(q, k, v, proj_weight, proj_bias, lut, selection, *, blkq, blkk, feature_map, linear_scope, scale):
    # inputs in the compute dtype, proj_l in float32; lut None: the Function selects from `selection`
    if scale is None:
        scale = q.shape[-1] ** -0.5
    compute_dtype, dot_precision = _compute_dtype_and_precision(q.dtype, q.device)
    qc, kc, vc = (x.to(compute_dtype) for x in (q, k, v))
    if linear_scope == "none":
        # proj_l stays out of the graph (no gradient, None allowed); the ops' schema takes tensors: empty ones
        w, b = qc.new_empty(0, dtype=torch.float32), qc.new_empty(0, dtype=torch.float32)
    else:
        w = proj_weight.to(torch.float32).contiguous()
        b = proj_bias.to(torch.float32).contiguous()
    o = _SLATriton.apply(qc, kc, vc, w, b, lut, float(scale), feature_map, linear_scope, blkq, blkk,
                         dot_precision, selection)
    return o.to(q.dtype)


def sla_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    *,
    topk: float,
    blkq: int,
    blkk: int,
    feature_map: str,
    linear_scope: str,
    scale: float | None = None,
    fusion: str = "sla",
    ratio_weight: torch.Tensor | None = None,
    ratio_bias: torch.Tensor | None = None,
    forced_blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """SLA on the Triton kernels: q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D) in q's dtype.
    `forced_blocks` (start, end): key blocks every query block keeps (`selection.select_blocks`).

    head_dim up to 128 (any size: non-powers of two run padded inside the kernels); larger heads fall back to the
    PyTorch operator with a warning. The fusions "mass" and "ratio" (`ops/fusion.py`) mix the branches in the
    kernels' epilogue by a per-row gate computed first (`_fused`)."""
    global _warned_fallback
    _check_args(q, topk, blkq, blkk, feature_map, linear_scope)
    if q.shape[-1] > MAX_HEAD_DIM:
        if not _warned_fallback:
            logger.warning("backend='triton' supports head_dim <= %d; head_dim=%d runs on the PyTorch operator.",
                           MAX_HEAD_DIM, q.shape[-1])
            _warned_fallback = True
        return sla_reference(q, k, v, proj_weight, proj_bias, topk=topk, blkq=blkq, blkk=blkk,
                             feature_map=feature_map, linear_scope=linear_scope, scale=scale,
                             forced_blocks=forced_blocks, fusion=fusion,
                             ratio_weight=ratio_weight, ratio_bias=ratio_bias)
    forced = (0, 0) if forced_blocks is None else tuple(forced_blocks)
    kw = dict(blkq=blkq, blkk=blkk, feature_map=feature_map, linear_scope=linear_scope, scale=scale)
    if fusion == "sla" and tuning.SELECT == "fused" and not torch.compiler.is_compiling():
        # eager: the forward selects the blocks itself, beside its first kernels (`custom_ops.select_and_forward`);
        # the fusions need the block map first, for their gate (`_fused`)
        return _run(q, k, v, proj_weight, proj_bias, None, (q.detach(), k.detach(), topk, forced), **kw)
    if tuning.SELECT == "fused":
        lut = custom_ops.select_blocks_fused(q.detach(), k.detach(), topk, blkq, blkk, *forced)
    else:
        lut = select_blocks(q, k, topk, blkq, blkk, forced_blocks)
    return sla_triton_with_lut(q, k, v, proj_weight, proj_bias, lut, **kw, fusion=fusion, ratio_weight=ratio_weight,
                               ratio_bias=ratio_bias)
