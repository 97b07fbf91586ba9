# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`ops/buffers.py` and the backward's column LUT (`ops/backward.py`): host-side pieces that need no kernel."""

from __future__ import annotations

import torch

from diffusers_sla.ops.selection import lut_to_block_map, select_blocks

from testing_utils import require_triton

pytestmark = require_triton


def test_unaligned_inputs_are_copied_to_an_aligned_tensor():
    """A contiguous view at an offset that is not a multiple of 16 bytes cannot back a tensor descriptor: `tma_ready`
    must hand the kernels a fresh (aligned) copy with the same values, not the view itself."""
    from diffusers_sla.ops.buffers import tma_addressable, tma_ready

    buffer = torch.randn(1 + 2 * 3 * 8 * 16).to(torch.bfloat16)
    view = buffer[1:].view(2, 3, 8, 16)
    assert view.is_contiguous() and not tma_addressable(view)
    ready = tma_ready(view)
    assert tma_addressable(ready) and torch.equal(ready, view)


def test_column_lut_lists_exactly_the_query_blocks_that_selected_each_key_block():
    from diffusers_sla.ops.backward import column_lut

    q, k = torch.randn(2, 3, 300, 16), torch.randn(2, 3, 450, 16)
    lut = select_blocks(q, k, 0.3, 32, 32)  # (2, 3, 10, 4) over 15 key blocks
    col_q, offsets, counts = column_lut(lut, 15)
    block_map = lut_to_block_map(lut, 15)  # (B, H, n_q, n_k)
    for bh in range(6):
        bmap = block_map.view(6, 10, 15)[bh]
        for j in range(15):
            start, n = offsets[bh, j].item(), counts[bh, j].item()
            listed = col_q[bh, start : start + n].tolist()
            assert listed == bmap[:, j].nonzero().squeeze(-1).tolist()
    assert counts.sum().item() == lut.numel()
