# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The SLA operator in plain PyTorch: the specification the GPU kernels must match, and the path that runs wherever
Triton does not (CPU, MPS, CI).

For query block i with selected key blocks S_i (see `selection.py`):

    o_sparse[i] = softmax(scale * q_i K_{S_i}^T) V_{S_i}                         exact attention, critical blocks
    R_i, z_i    = sum over linear blocks j of phi(k_j)^T v_j and of phi(k_j)    linear blocks: not S_i ("rest")
                                                                                 or every block ("all")
    o_linear[i] = phi(q_i) R_i / (phi(q_i) . z_i + eps)
    o[i]        = o_sparse[i] + o_linear[i] W^T + b                               W, b: the float32 `proj_l`

Scope "none" has no linear branch: o[i] = o_sparse[i], and W, b are not read (they get no gradient).

Everything is computed in float32 (float64 for float64 inputs) and the result is cast back to the input dtype.
Memory stays bounded: exact attention runs over chunks of query blocks, only on their selected key blocks, and under
autograd each chunk is recomputed in backward (activation checkpointing) instead of keeping its scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..config import ALLOWED_LINEAR_SCOPES
from .branches import LINEAR_EPS, apply_feature_map, linear_attention_reference, sparse_attention_reference
from .fusion import fused_reference
from .selection import select_blocks

# the branches are part of this module's public surface (tests and benchmarks import them from here)
__all__ = ["LINEAR_EPS", "apply_feature_map", "linear_attention_reference", "sla_reference",
           "sparse_attention_reference"]


def sla_reference(
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
    lut: torch.Tensor | None = None,
    fusion: str = "sla",
    ratio_weight: torch.Tensor | None = None,
    ratio_bias: torch.Tensor | None = None,
    forced_blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The whole SLA operator: q (B, H, Lq, D), k and v (B, H, Lk, D) -> (B, H, Lq, D) in q's dtype.

    `lut` (B, H, n_q, kept), when given, replaces block selection (tests and kernels use it to share one map).
    `forced_blocks` (start, end): key blocks every query block keeps (`selection.select_blocks`).
    `linear_scope="none"`: the sparse part alone; proj_weight and proj_bias are not read.
    `fusion` "mass" / "ratio" (with `ratio_weight`, `ratio_bias`): the fused combinations of `ops/fusion.py`."""
    if fusion != "sla":
        if lut is None and forced_blocks is not None:
            lut = select_blocks(q, k, topk, blkq, blkk, forced_blocks)
        return fused_reference(q, k, v, proj_weight, proj_bias, topk=topk, blkq=blkq, blkk=blkk,
                               feature_map=feature_map, linear_scope=linear_scope, fusion=fusion, scale=scale,
                               lut=lut, ratio_weight=ratio_weight, ratio_bias=ratio_bias)
    if linear_scope not in ALLOWED_LINEAR_SCOPES:
        raise ValueError(f"`linear_scope` must be one of {list(ALLOWED_LINEAR_SCOPES)}, got {linear_scope!r}.")
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if lut is None:
        lut = select_blocks(q, k, topk, blkq, blkk, forced_blocks)

    qc, kc, vc = (x.to(compute_dtype) for x in (q, k, v))
    o_sparse = sparse_attention_reference(qc, kc, vc, lut, blkq, blkk, scale)
    if linear_scope == "none":
        return o_sparse.to(q.dtype)
    o_linear = linear_attention_reference(qc, kc, vc, lut, blkq, blkk, feature_map, linear_scope)
    o_linear = F.linear(o_linear, proj_weight.to(compute_dtype), proj_bias.to(compute_dtype))
    return (o_sparse + o_linear).to(q.dtype)
