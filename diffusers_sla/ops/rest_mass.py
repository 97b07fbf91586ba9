# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Fusion "mass"'s log Zhat_rest on the Triton kernels (`kernels/rest_mass.py`), with autograd to q and to the key
blocks' moments. `fusion.rest_log_mass` pools k into the moments in PyTorch (so k's gradient flows through autograd)
and calls this where the kernels run; its PyTorch path is the reference these match to float32 rounding.
"""

from __future__ import annotations

import math

import torch
import triton

from . import tuning
from .buffers import split
from .custom_ops import eager_or_op
from .fusion import REST_MASS_KERNEL_MAX_HEAD_DIM as MAX_HEAD_DIM
from .kernels import rest_mass as kernels
from .kernels.common import is_cuda

DOT_PRECISIONS = ("tf32x3", "tf32", "ieee")


def dot_precision_default() -> str:
    # the interpreter computes float32 products whatever is asked
    return tuning.REST_MASS_PRECISION if is_cuda() else "ieee"


def block_rows(blkq: int) -> int:
    """Rows per query tile: the largest power of two <= tuning.REST_MASS_ROWS dividing blkq (tl.dot needs >= 16)."""
    rows = math.gcd(blkq, tuning.REST_MASS_ROWS)
    if rows < 16:
        raise ValueError(f"`blkq` must be a multiple of 16 for the rest-mass kernels, got {blkq!r}.")
    return rows


def _check(q, mean, var, log_count, rest, blkq):
    block_rows(blkq)
    B, H, Lq, D = q.shape
    n_k = mean.shape[2]
    n_q = -(-Lq // blkq)
    if D > MAX_HEAD_DIM:
        raise ValueError(f"`q` must have head_dim <= {MAX_HEAD_DIM} for the rest-mass kernels, got {D}.")
    for name, x in (("mean", mean), ("var", var)):
        if x.shape != (B, H, n_k, D) or x.dtype != torch.float32:
            raise ValueError(f"`{name}` must be float32 of shape {(B, H, n_k, D)}, got {x.dtype} {tuple(x.shape)}.")
    if log_count.shape != (n_k,) or log_count.dtype != torch.float32 or log_count.requires_grad:
        raise ValueError(f"`log_count` must be a constant float32 tensor of shape {(n_k,)} (it gets no gradient), "
                         f"got {log_count.dtype} {tuple(log_count.shape)} requires_grad={log_count.requires_grad}.")
    if rest.shape != (B, H, n_q, n_k) or rest.dtype != torch.bool:
        raise ValueError(f"`rest` must be bool of shape {(B, H, n_q, n_k)}, got {rest.dtype} {tuple(rest.shape)}.")


def _args(q, blkq, block_n, dot_precision, kernel):
    D = q.shape[-1]
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"`block_n` must be a power of two >= 16, got {block_n!r}.")
    if dot_precision not in DOT_PRECISIONS:
        raise ValueError(f"`dot_precision` must be one of {list(DOT_PRECISIONS)}, got {dot_precision!r}.")
    consts = dict(BLKQ=blkq, HEAD_DIM=D, BLOCK_D=max(16, triton.next_power_of_2(D)), BLOCK_M=block_rows(blkq),
                  BLOCK_N=block_n, DOT_PREC=dot_precision)
    warps = tuning.REST_MASS_WARPS if kernel == "fwd" else tuning.REST_MASS_BWD_WARPS
    launch = dict(num_warps=warps if consts["BLOCK_D"] >= 128 else 4, num_stages=2 if is_cuda() else 1)
    return consts, launch


def forward(q: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, log_count: torch.Tensor, rest: torch.Tensor,
            scale: float, blkq: int, block_n: int | None = None, dot_precision: str | None = None) -> torch.Tensor:
    """log_rest (B, H, Lq) float32. q (B, H, Lq, D) any float dtype and strides; mean, var (B, H, n_k, D) float32;
    log_count (n_k,) float32; rest (B, H, n_q, n_k) bool (True: the key block counts for that query block)."""
    B, H, Lq, _ = q.shape
    n_q, n_k = rest.shape[2], rest.shape[3]
    consts, launch = _args(q, blkq, block_n or tuning.REST_MASS_BLOCK_N, dot_precision or dot_precision_default(),
                           "fwd")
    out = torch.empty(B, H, Lq, device=q.device, dtype=torch.float32)
    kernels.rest_mass_fwd[(triton.cdiv(Lq, consts["BLOCK_M"]), B * H)](
        q, mean, var, log_count, rest, out, *q.stride(), H, Lq, n_q, n_k, float(scale), **consts, **launch)
    return out


def backward(g: torch.Tensor, q: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, log_count: torch.Tensor,
             rest: torch.Tensor, log_rest: torch.Tensor, scale: float, blkq: int, block_n: int | None = None,
             dot_precision: str | None = None, need_dq: bool = True, need_moments: bool = True,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of sum(g * log_rest) -> dq (q's dtype), dmean, dvar (float32); empty for those not asked for (an
    op returns tensors)."""
    B, H, Lq, D = q.shape
    n_q, n_k = rest.shape[2], rest.shape[3]
    block_n = block_n or tuning.REST_MASS_BLOCK_N
    consts, launch = _args(q, blkq, block_n, dot_precision or dot_precision_default(), "bwd")
    g = g.to(torch.float32).contiguous()
    common = (*q.stride(), H, Lq, n_q, n_k)
    dq = dmean = dvar = q.new_empty(0)
    if need_dq:
        dq = torch.empty(B, H, Lq, D, device=q.device, dtype=torch.float32)
        kernels.rest_mass_dq[(triton.cdiv(Lq, consts["BLOCK_M"]), B * H)](
            q, mean, var, log_count, rest, log_rest, g, dq, *common, float(scale), **consts, **launch)
        dq = dq.to(q.dtype)
    if need_moments:
        n_chunks = triton.cdiv(n_k, block_n)
        n_split = split(triton.cdiv(Lq, consts["BLOCK_M"]), n_chunks * B * H)
        parts = torch.empty(2, n_split, B, H, n_k, D, device=q.device, dtype=torch.float32)
        kernels.rest_mass_dmoments[(n_chunks * n_split, B * H)](
            q, mean, var, log_count, rest, log_rest, g, parts[0], parts[1], *common, n_split, float(scale),
            **consts, **launch)
        dmean, dvar = parts[0].sum(0), parts[1].sum(0)  # two tensors: an op's outputs may not alias
    return dq, dmean, dvar


# `torch.library` ops, opaque to torch.compile (no graph break; Dynamo cannot trace a Triton launch inside an
# autograd.Function), called as `custom_ops.py` calls the attention kernels' ops: eager calls skip the dispatch.
_fwd_op = torch.library.custom_op("diffusers_sla::rest_mass_fwd", mutates_args=())(forward)
_bwd_op = torch.library.custom_op("diffusers_sla::rest_mass_bwd", mutates_args=())(backward)


@_fwd_op.register_fake
def _(q, mean, var, log_count, rest, scale, blkq, block_n=None, dot_precision=None):
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@_bwd_op.register_fake
def _(g, q, mean, var, log_count, rest, log_rest, scale, blkq, block_n=None, dot_precision=None, need_dq=True,
      need_moments=True):
    return (torch.empty_like(q) if need_dq else q.new_empty(0),
            *(torch.empty_like(mean) if need_moments else q.new_empty(0) for _ in range(2)))


run_forward = eager_or_op(_fwd_op, forward, "rest_mass_fwd")
run_backward = eager_or_op(_bwd_op, backward, "rest_mass_bwd")


class _RestLogMass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, mean, var, log_count, rest, scale, blkq, block_n, dot_precision):
        mean, var, rest = mean.contiguous(), var.contiguous(), rest.contiguous()
        log_rest = run_forward(q, mean, var, log_count, rest, scale, blkq, block_n, dot_precision)
        ctx.save_for_backward(q, mean, var, log_count, rest, log_rest)
        ctx.args = (scale, blkq, block_n, dot_precision)
        return log_rest

    @staticmethod
    def backward(ctx, g):
        q, mean, var, log_count, rest, log_rest = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        grads = run_backward(g.contiguous(), q, mean, var, log_count, rest, log_rest, *ctx.args, needs[0],
                             needs[1] or needs[2])
        return (*(x if need else None for x, need in zip(grads, needs)), None, None, None, None, None, None)


def rest_log_mass(q, mean, var, log_count, rest, scale, blkq, *, block_n=None, dot_precision=None):
    """log Zhat_rest (B, H, Lq) float32 on the kernels, differentiable in q, mean and var (`fusion.rest_log_mass`
    holds the definition and the PyTorch reference). `kernels.NO_MASS` where a query block left no key block."""
    _check(q, mean, var, log_count, rest, blkq)
    # dot_precision None: `forward` / `backward` pick the default where they run (asking the driver which device
    # that is cannot be traced by torch.compile)
    return _RestLogMass.apply(q, mean, var, log_count, rest, float(scale), blkq, block_n or tuning.REST_MASS_BLOCK_N,
                              dot_precision)
