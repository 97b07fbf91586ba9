# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Block selection in PyTorch (`ops/selection.py`): kept counts, pooling, the top-k and its tie rule. Forced blocks:
`test_forced_blocks.py`; the Triton selection against this one: `kernels/test_selection_kernels.py`."""

import torch

from diffusers_sla.ops.selection import mean_pool_blocks, num_kept_blocks, select_blocks, top_blocks


def test_num_kept_blocks_never_zero_never_more_than_all():
    assert num_kept_blocks(0.2, 512) == 102
    assert num_kept_blocks(0.05, 10) == 1  # int(0.5) == 0 in the reference: NaN there
    assert num_kept_blocks(1.0, 7) == 7
    assert num_kept_blocks(0.99, 1) == 1


def test_mean_pool_averages_real_rows_of_partial_blocks():
    x = torch.randn(1, 2, 70, 8, dtype=torch.float64)
    pooled = mean_pool_blocks(x, 32)
    assert pooled.shape == (1, 2, 3, 8)
    torch.testing.assert_close(pooled[:, :, 2].double(), x[:, :, 64:].mean(dim=2), rtol=1e-5, atol=1e-6)


def test_selection_picks_the_highest_scoring_blocks():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, L, 16, generator=g, dtype=torch.float64) for L in (96, 160))
    lut = select_blocks(q, k, 0.4, 32, 32)
    assert lut.shape == (1, 2, 3, 2) and lut.dtype == torch.int32
    assert (lut[..., 1:] > lut[..., :-1]).all(), "LUT rows must be ascending"
    pooled_q = mean_pool_blocks(q, 32)
    pooled_k = mean_pool_blocks(k - k.mean(dim=2, keepdim=True), 32)
    scores = pooled_q @ pooled_k.transpose(-1, -2)
    expected = scores.topk(2, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(lut.long(), expected)


def test_top_blocks_breaks_ties_towards_the_lower_index():
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0, 0.0]])
    # 3.0 at 1 and 3, then three 2.0s for the last two places: indices 2 and 4 win over 5
    assert top_blocks(scores, 4).tolist() == [[1, 2, 3, 4]]
    tied = torch.randint(0, 4, (64, 40)).float()  # many ties: same rule as a stable descending sort
    expected = torch.sort(tied, dim=-1, descending=True, stable=True).indices[:, :7].sort(dim=-1).values
    assert torch.equal(top_blocks(tied, 7).long(), expected)
    untied = torch.randn(64, 40)
    assert torch.equal(top_blocks(untied, 7).long(), untied.topk(7, dim=-1).indices.sort(dim=-1).values)
