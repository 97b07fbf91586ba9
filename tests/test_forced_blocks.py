# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Forced key blocks (`ops/selection.py`, `ops/reference.py`, `ops/api.py`): blocks every query block keeps, e.g. a
joint attention's text tokens. The Triton selection's forced blocks: `tests/kernels/test_forced_blocks_kernels.py`."""

from __future__ import annotations

import pytest
import torch

from diffusers_sla import sparse_linear_attention
from diffusers_sla.ops.reference import sla_reference
from diffusers_sla.ops.selection import (block_scores, forced_block_range, lut_to_block_map, num_kept_blocks,
                                         select_blocks, top_blocks)
from testing_utils import rel_err


def _qkv(B=2, H=2, Lq=150, Lk=200, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, D, generator=g).to(dtype) for L in (Lq, Lk, Lk)]


def test_kept_count_semantics():
    assert num_kept_blocks(0.2, 10) == 2
    assert num_kept_blocks(0.2, 10, forced=3) == 3 + 1  # topk applies to the 7 other blocks: int(1.4) = 1
    assert num_kept_blocks(0.5, 10, forced=2) == 2 + 4
    assert num_kept_blocks(0.01, 10, forced=2) == 2 + 1  # at least one other block
    assert num_kept_blocks(1.0, 10, forced=4) == 10
    assert num_kept_blocks(0.3, 4, forced=4) == 4
    assert forced_block_range(0, 1, 64) == (0, 1) and forced_block_range(130, 200, 64) == (2, 4)
    assert forced_block_range(5, 5, 64) == (0, 0)


@pytest.mark.parametrize("forced", [(0, 2), (5, 7), (6, 7)])
def test_forced_blocks_are_in_every_row_and_the_rest_is_the_top_k_of_the_others(forced):
    q, k, _ = _qkv()
    topk, blk = 0.3, 32
    lut = select_blocks(q, k, topk, blk, blk, forced)
    n = 7  # ceil(200 / 32) key blocks
    block_map = lut_to_block_map(lut, n)
    assert block_map[..., forced[0]:forced[1]].all()
    n_forced = forced[1] - forced[0]
    assert lut.shape[-1] == num_kept_blocks(topk, n, n_forced) == n_forced + int(topk * (n - n_forced))
    # the other kept blocks: the top-k of the scores with the forced columns taken out
    scores = block_scores(q, k, blk, blk)
    others = [j for j in range(n) if not forced[0] <= j < forced[1]]
    expected = torch.tensor(others)[top_blocks(scores[..., others], lut.shape[-1] - n_forced).long()]
    assert torch.equal(block_map[..., others], lut_to_block_map(expected.int(), n)[..., others])
    # unforced selection differs somewhere, so the test above is not vacuous
    assert not lut_to_block_map(select_blocks(q, k, topk, blk, blk), n)[..., forced[0]:forced[1]].all()


def test_reference_with_forced_blocks_uses_that_block_map():
    q, k, v = _qkv()
    w, b = torch.randn(16, 16) / 4, torch.randn(16)
    kw = dict(topk=0.3, blkq=32, blkk=32, feature_map="softmax", linear_scope="rest")
    out = sla_reference(q, k, v, w, b, forced_blocks=(5, 7), **kw)
    lut = select_blocks(q, k, 0.3, 32, 32, (5, 7))
    assert torch.equal(out, sla_reference(q, k, v, w, b, lut=lut, **kw))
    assert rel_err(out, sla_reference(q, k, v, w, b, **kw)) > 1e-3


@pytest.mark.parametrize("where", ["first", "last"])
def test_api_forced_keys_follow_the_kept_keys_under_a_padding_mask(where):
    q, k, v = _qkv(B=2, Lk=200)
    w, b = torch.randn(16, 16) / 4, torch.randn(16)
    text = (0, 40) if where == "first" else (160, 200)
    keep = torch.ones(2, 200, dtype=torch.bool)
    keep[1, text[0] + 30:text[1]] = False  # sample 1: 30 real text tokens, 10 of padding
    kw = dict(topk=0.25, blkq=32, blkk=32, backend="torch")
    out = sparse_linear_attention(q, k, v, w, b, key_padding_mask=keep, forced_keys=text, **kw)
    for i in range(2):
        kept = keep[i].nonzero().squeeze(-1)
        start, end = int(keep[i, :text[0]].sum()), int(keep[i, :text[1]].sum())
        expected = sla_reference(q[i:i + 1], k[i:i + 1, :, kept], v[i:i + 1, :, kept], w, b, topk=0.25, blkq=32,
                                 blkk=32, feature_map="softmax", linear_scope="rest",
                                 forced_blocks=forced_block_range(start, end, 32))
        assert rel_err(out[i:i + 1], expected) < 1e-6


@pytest.mark.parametrize("bad", [(-1, 3), (5, 2), (0, 201)])
def test_api_forced_keys_are_checked(bad):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="`forced_keys` must be"):
        sparse_linear_attention(q, k, v, forced_keys=bad, blkq=32, blkk=32)
