# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The two branches of the SLA operator in plain PyTorch, apart: exact attention over the selected key blocks and
linear attention over the others (`reference.py` sums them with proj_l; `fusion.py` combines them otherwise).

Memory stays bounded: exact attention runs over chunks of query blocks, only on their selected key blocks, and under
autograd each chunk is recomputed in backward (activation checkpointing) instead of keeping its scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..config import LINEAR_EPS
from .selection import num_blocks

# Upper bound on the elements of one chunk's score matrix (B * H * rows * kept keys): 2**23 float32 = 32 MiB.
SCORE_ELEMENTS_PER_CHUNK = 1 << 23


def apply_feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    if name == "softmax":
        return torch.softmax(x, dim=-1)
    if name == "elu":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    raise ValueError(f"`feature_map` must be one of ['softmax', 'elu', 'relu'], got {name!r}.")


def pad_to_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, n_blocks, block, D), zero rows appended."""
    B, H, L, D = x.shape
    n = num_blocks(L, block)
    return F.pad(x, (0, 0, 0, n * block - L)).view(B, H, n, block, D)


def _sparse_chunk(q_blocks, k_flat, v_flat, key_valid_flat, gather_ids, scale):
    """Exact attention of a chunk of query blocks over their selected key blocks.

    q_blocks: (B, H, c, blkq, D); k_flat, v_flat: (B*H*n_k, blkk, D); key_valid_flat: (B*H*n_k, blkk) bool;
    gather_ids: (B, H, c, kept) rows of the flat tensors. Returns (B, H, c, blkq, D)."""
    B, H, c, blkq, D = q_blocks.shape
    keys = k_flat[gather_ids].flatten(3, 4)  # (B, H, c, kept * blkk, D)
    values = v_flat[gather_ids].flatten(3, 4)
    valid = key_valid_flat[gather_ids].flatten(3, 4)  # (B, H, c, kept * blkk)
    scores = (q_blocks @ keys.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~valid[..., None, :], float("-inf"))
    return torch.softmax(scores, dim=-1) @ values


def _sparse_chunk_lse(q_blocks, k_flat, v_flat, key_valid_flat, gather_ids, scale):
    """`_sparse_chunk` that also returns lse = log Z_sel per query row, (B, H, c, blkq)."""
    keys = k_flat[gather_ids].flatten(3, 4)
    values = v_flat[gather_ids].flatten(3, 4)
    valid = key_valid_flat[gather_ids].flatten(3, 4)
    scores = ((q_blocks @ keys.transpose(-1, -2)) * scale).masked_fill(~valid[..., None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # every query block keeps >= 1 block with >= 1 valid key: finite
    return torch.exp(scores - lse[..., None]) @ values, lse


def sparse_attention_reference(q, k, v, lut, blkq, blkk, scale, return_lse: bool = False):
    """Exact softmax attention of each query block over its selected key blocks (`lut`), in q's dtype.

    `return_lse`: also return lse = log Z_sel per query row, (B, H, Lq) (the fusions of `ops/fusion.py` weigh the
    sparse part by it); the output alone keeps `torch.softmax`'s rounding."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    n_q, n_k = num_blocks(Lq, blkq), num_blocks(Lk, blkk)
    kept = lut.shape[-1]

    q_blocks = pad_to_blocks(q, blkq)
    k_flat = pad_to_blocks(k, blkk).reshape(B * H * n_k, blkk, D)
    v_flat = pad_to_blocks(v, blkk).reshape(B * H * n_k, blkk, D)
    key_valid = (torch.arange(n_k * blkk, device=q.device) < Lk).view(1, n_k, blkk).expand(B * H, n_k, blkk)
    key_valid_flat = key_valid.reshape(B * H * n_k, blkk)
    row_base = (torch.arange(B * H, device=q.device) * n_k).view(B, H, 1, 1)
    gather_ids = lut.long() + row_base  # (B, H, n_q, kept)

    chunk_fn = _sparse_chunk_lse if return_lse else _sparse_chunk
    chunk = max(1, SCORE_ELEMENTS_PER_CHUNK // (B * H * blkq * kept * blkk))
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    outputs = []
    for start in range(0, n_q, chunk):
        args = (q_blocks[:, :, start : start + chunk], k_flat, v_flat, key_valid_flat,
                gather_ids[:, :, start : start + chunk], scale)
        if needs_grad:
            outputs.append(checkpoint(chunk_fn, *args, use_reentrant=False))
        else:
            outputs.append(chunk_fn(*args))
    if not return_lse:
        return torch.cat(outputs, dim=2).reshape(B, H, n_q * blkq, D)[:, :, :Lq]
    o = torch.cat([o for o, _ in outputs], dim=2).reshape(B, H, n_q * blkq, D)[:, :, :Lq]
    return o, torch.cat([lse for _, lse in outputs], dim=2).reshape(B, H, n_q * blkq)[:, :, :Lq]


def linear_attention_reference(q, k, v, lut, blkq, blkk, feature_map, linear_scope):
    """phi(q_i) R_i / (phi(q_i) . z_i + eps) with R_i, z_i summed over the linear key blocks of query block i."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    n_q, n_k = num_blocks(Lq, blkq), num_blocks(Lk, blkk)

    # Padded key rows are zero after the feature map too, so they add nothing to the per-block sums.
    phi_k = pad_to_blocks(apply_feature_map(k, feature_map), blkk)  # (B, H, n_k, blkk, D)
    kv_per_block = phi_k.transpose(-1, -2) @ pad_to_blocks(v, blkk)  # (B, H, n_k, D, D)
    k_sum_per_block = phi_k.sum(dim=3)  # (B, H, n_k, D)

    # weights[i, j] = 1 where key block j feeds query block i's linear branch. A 0/1 matrix product instead of
    # "total minus selected" avoids cancellation.
    if linear_scope == "rest":
        weights = torch.ones(B, H, n_q, n_k, dtype=q.dtype, device=q.device)
        weights.scatter_(-1, lut.long(), 0.0)
    elif linear_scope == "all":
        weights = torch.ones(B, H, n_q, n_k, dtype=q.dtype, device=q.device)
    else:  # "none" has no linear branch: `sla_reference` does not call this
        raise ValueError(f"`linear_scope` of a linear branch must be one of ['rest', 'all'], got {linear_scope!r}.")
    kv = (weights @ kv_per_block.flatten(-2)).view(B, H, n_q, D, D)
    k_sum = (weights @ k_sum_per_block).view(B, H, n_q, 1, D)

    phi_q = pad_to_blocks(apply_feature_map(q, feature_map), blkq)  # (B, H, n_q, blkq, D)
    numerator = phi_q @ kv  # (B, H, n_q, blkq, D)
    denominator = (phi_q * k_sum).sum(dim=-1, keepdim=True)
    out = numerator / (denominator + LINEAR_EPS)
    return out.reshape(B, H, n_q * blkq, D)[:, :, :Lq]
