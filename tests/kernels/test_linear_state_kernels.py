# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Scope "rest"'s linear state (`ops/linear_state.py` on `ops/kernels/linear_state.py`): z_i formed as Z minus the
selected z_j, against the float32 0/1 product it replaces, and the top-k launch that builds it alongside."""

from __future__ import annotations

import pytest
import torch

from diffusers_sla.ops import fused_selection, linear_state
from diffusers_sla.ops.buffers import block_d as padded_head_dim
from diffusers_sla.ops.selection import num_blocks, select_blocks, top_blocks


@pytest.mark.parametrize("B, H, Lq, Lk, D, blkq, blkk, topk, fm, dtype", [
    (1, 1, 200, 300, 24, 32, 32, 0.3, "softmax", torch.float32),
    (1, 2, 96, 160, 32, 32, 32, 0.25, "elu", torch.float16),
    (2, 1, 64, 1100, 16, 64, 16, 0.6, "relu", torch.float32),
])
def test_rest_z_matches_the_product_over_unselected_blocks(device, B, H, Lq, Lk, D, blkq, blkk, topk, fm, dtype):
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(B, H, Lq, D, generator=g) + 0.5).to(device, dtype)
    k = (torch.randn(B, Lk, H, D, generator=g) + 0.5).to(device, dtype).transpose(1, 2)
    v = (torch.randn(B, H, Lk, D, generator=g) + 0.5).to(device, dtype)
    lut = select_blocks(q, k, topk, blkq, blkk)
    n_k = num_blocks(Lk, blkk)
    _, z_parts, _, zkb = linear_state.linear_totals(k, v, blkk, padded_head_dim(D), fm, "ieee", store_blocks=True)
    assert z_parts.shape[0] == B * H and torch.allclose(z_parts.sum(1).view(B, H, -1), zkb.sum(2), rtol=1e-5)
    w, zi = linear_state.rest_weights(lut, n_k, dtype, zkb, z_parts)
    w_bwd, w32 = linear_state.rest_weights(lut, n_k, dtype)
    expected = torch.matmul(w32, zkb)
    assert torch.equal(w, w_bwd) and torch.equal(w.float(), w32) and zi.shape == expected.shape
    assert ((zi - expected).norm() / expected.norm()).item() < 1e-5, fm
    assert not zi[..., D:].any()


def test_rest_z_with_many_splits_and_the_top_k_launch_that_builds_it(device):
    """Many splits and more selected blocks than one gather step (synthetic positive states); then the eager
    forward's top-k launch that also builds W and z_i: the same LUT, W and z_i, bit for bit, as the top-k and
    `rest_weights` apart (tied scores, and more splits and selected blocks than one unrolled step)."""
    g = torch.Generator().manual_seed(0)
    B, H, n_q, n_k, kept, block_d, n_split = 1, 2, 5, 90, 70, 32, 37
    lut = torch.stack([torch.randperm(n_k, generator=g)[:kept].sort().values for _ in range(B * H * n_q)])
    lut = lut.view(B, H, n_q, kept).to(device, torch.int32)
    zkb = torch.rand(B, H, n_k, block_d, generator=g).to(device)
    z_parts = torch.rand(B * H, n_split, block_d, generator=g).to(device)
    w, zi = linear_state.rest_weights(lut, n_k, torch.float32, zkb, z_parts)
    selected = torch.gather(zkb, 2, lut.long()[..., None].expand(-1, -1, -1, -1, block_d).flatten(2, 3))
    expected = z_parts.sum(1).view(B, H, 1, block_d) - selected.view(B, H, n_q, kept, block_d).sum(3)
    assert torch.allclose(zi, expected, rtol=1e-5, atol=1e-5), (zi - expected).abs().max()
    assert int(w.sum()) == B * H * n_q * (n_k - kept)
    for kept_fused, dtype in ((kept, torch.bfloat16), (3, torch.float16), (n_k, torch.float32)):
        scores = (torch.randint(0, 7, (B, H, n_q, n_k), generator=g).float() / 4).to(device, dtype)
        lut_f, w_f, zi_f = fused_selection.top_blocks_and_rest(scores, kept_fused, dtype, zkb, z_parts)
        lut_a = fused_selection.top_blocks_triton(scores, kept_fused)
        w_a, zi_a = linear_state.rest_weights(lut_a, n_k, dtype, zkb, z_parts)
        assert torch.equal(lut_f, lut_a) and torch.equal(lut_a, top_blocks(scores.float(), kept_fused)), kept_fused
        assert w_f.dtype == dtype and torch.equal(w_f, w_a) and torch.equal(zi_f, zi_a), kept_fused
