# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The Triton block selection (`ops/fused_selection.py` on `ops/kernels/selection.py`) against `ops/selection.py`:
the key mean's row sums, the centred pooling, the top-k, and the whole selection's block map."""

from __future__ import annotations

import json

import pytest
import torch

from diffusers_sla.ops import fused_selection
from diffusers_sla.ops.selection import lut_to_block_map, mean_pool_blocks, num_blocks, select_blocks, top_blocks

from testing_utils import GOLDEN_DIR, require_golden


def _make(g, device, B, H, L, D, dtype, strided):
    # an offset, so that a wrong key mean shows in the pooled keys
    if strided:  # diffusers' (B, L, H, D) viewed as (B, H, L, D)
        return (torch.randn(B, L, H, D, generator=g) + 0.5).to(device, dtype).transpose(1, 2)
    return (torch.randn(B, H, L, D, generator=g) + 0.5).to(device, dtype)


def test_top_blocks_kernel_matches_selection_top_blocks(device):
    """The Triton top-k against `selection.top_blocks` (the rule both backends share): the same indices on tie-heavy
    rows, signed zeros and -inf included."""
    g = torch.Generator().manual_seed(0)
    # rows, key blocks, kept, distinct score values (few values: many ties)
    cases = ((6, 512, 25, 16), (6, 60, 3, 2), (4, 100, 100, 3), (4, 7, 1, 2), (3, 1000, 50, 999))
    for rows, n_k, kept, levels in cases:
        s = (torch.randint(0, levels, (rows, n_k), generator=g).float() - levels // 2) / 4
        s[0, :5] = -0.0  # signed zeros tie with +0.0, as in a float sort
        s[1, ::3] = float("-inf")
        s = s.to(device)
        ours, expected = fused_selection.top_blocks_triton(s, kept), top_blocks(s, kept)
        assert ours.dtype == torch.int32 and torch.equal(ours, expected), (rows, n_k, kept, ours, expected)
    s = torch.randn(1, 2, 3, 130, generator=g).to(device)
    assert torch.equal(fused_selection.top_blocks_triton(s, 13), top_blocks(s, 13))
    # 16-bit scores (what the fused selection's score product returns) rank as their float32 values: many ties
    # after rounding, values at the bfloat16 extremes, +-0 and -inf
    base = torch.randn(8, 256, generator=g) * torch.logspace(-30, 30, 8).unsqueeze(1)
    extremes = torch.tensor([3.3895e38, -3.3895e38, 1e-40, 0.0, -0.0, float("-inf"), 1.0, 1.0 + 2**-9] * 32)
    s = torch.cat([base, base + base.abs() * 2**-10, extremes.view(1, 256)], 0).to(device)
    for dtype in (torch.bfloat16, torch.float16):
        for kept in (1, 7, 40):
            half = s.to(dtype)
            assert torch.equal(fused_selection.top_blocks_triton(half, kept), top_blocks(half.float(), kept))


def test_row_sums_cover_every_row_once(device):
    """The key mean's first pass: row sums over ranges of rows (partial last range, ranges that are not whole tiles,
    strided input); padded head-dim columns stay 0."""
    g = torch.Generator().manual_seed(0)
    for B, H, L, D, dtype, strided in ((1, 2, 300, 32, torch.float32, False), (2, 1, 130, 24, torch.float16, True),
                                       (1, 3, 1, 16, torch.float32, True)):
        x = _make(g, device, B, H, L, D, dtype, strided)
        for chunk in (0, 1, 48, 64, 100, 1000):
            parts = fused_selection.row_sum_parts(x, chunk)
            expected = x.float().sum(2).reshape(B * H, D)
            assert parts.shape[1] == (num_blocks(L, chunk) if chunk else parts.shape[1]), (chunk, parts.shape)
            assert torch.allclose(parts.sum(1)[:, :D], expected, rtol=1e-5, atol=1e-4), (chunk, L)
            assert not parts[:, :, D:].any()


@pytest.mark.parametrize("chunk", [0, 48])
def test_centred_key_pooling_matches_the_torch_statement(device, monkeypatch, chunk):
    """Centred key pooling against the torch statement of `selection.block_scores`, with the few parts of the default
    launch and with many (a partial last one, a non-power-of-two count)."""
    g = torch.Generator().manual_seed(0)
    if chunk:
        default = fused_selection.row_sum_parts
        monkeypatch.setattr(fused_selection, "row_sum_parts", lambda x: default(x, chunk=chunk))
    for B, H, L, D, blk, dtype, strided in ((1, 1, 300, 32, 64, torch.float32, False),
                                            (1, 2, 200, 24, 32, torch.float16, True),
                                            (2, 1, 130, 16, 64, torch.float16, False)):
        x = _make(g, device, B, H, L, D, dtype, strided)
        mu = x.mean(dim=2, keepdim=True, dtype=torch.float32).to(dtype)
        expected = mean_pool_blocks((x - mu).to(dtype), blk)
        rounded = dtype != torch.float32
        out = fused_selection.block_means(x, blk, center=True, round_to_input=rounded).float()
        if rounded:
            expected = expected.to(dtype).float()
        # one unit in the last place at most (the float32 sums run in another order)
        assert torch.allclose(out, expected, rtol=1e-3 if rounded else 1e-6, atol=1e-3 if rounded else 1e-6), \
            (L, dtype, (out - expected).abs().max())


def test_fused_selection_picks_the_block_map_of_select_blocks(device):
    """The same LUT as `selection.select_blocks` (Lq != Lk, partial blocks, strided, fp16)."""
    g = torch.Generator().manual_seed(0)
    for Lq, Lk, D, blkq, blkk, topk, dtype, strided in ((300, 450, 32, 64, 32, 0.3, torch.float32, False),
                                                        (200, 130, 24, 32, 64, 0.5, torch.float16, True),
                                                        (128, 1000, 16, 128, 32, 0.1, torch.float16, False)):
        q, k = _make(g, device, 2, 2, Lq, D, dtype, strided), _make(g, device, 2, 2, Lk, D, dtype, strided)
        assert torch.equal(fused_selection.select_blocks_triton(q, k, topk, blkq, blkk),
                           select_blocks(q, k, topk, blkq, blkk)), (Lq, Lk, dtype)


@require_golden
def test_fused_selection_picks_the_golden_block_maps(device):
    """The Triton block selection picks exactly the public reference's block maps on the golden inputs (bf16), on the
    CPU too (the GPU tests check it through the outputs)."""
    from safetensors.torch import load_file

    for name, cfg in json.loads((GOLDEN_DIR / "index.json").read_text()).items():
        t = {key: val.to(device) for key, val in load_file(GOLDEN_DIR / f"{name}.safetensors").items()}
        # the bf16 inputs as they are: the interpreter's bf16 products do not enter the selection
        lut = fused_selection.select_blocks_triton(t["q"], t["k"], cfg["topk"], cfg["blkq"], cfg["blkk"])
        assert torch.equal(lut_to_block_map(lut, t["block_map"].shape[-1]), t["block_map"].bool()), name
