# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""Forced key blocks on the Triton selection and kernels (`ops/fused_selection.py`, `ops/autograd.py`): the same
block map as `selection.select_blocks` with every forced block in every row, and the operator's output against the
float64 reference."""

from __future__ import annotations

import pytest
import torch

from diffusers_sla.ops import custom_ops
from diffusers_sla.ops.autograd import sla_triton
from diffusers_sla.ops.reference import sla_reference
from diffusers_sla.ops.selection import select_blocks

from testing_utils import rel_err


@pytest.mark.parametrize("dtype, forced, tol", [(torch.float32, (0, 2), 1e-4), (torch.float16, (5, 7), 2e-3)])
def test_triton_selection_forces_blocks(device, dtype, forced, tol):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, L, 32, generator=g).to(device, dtype) for L in (100, 200, 200))
    w, b = (torch.randn(32, 32, generator=g) / 6).to(device), torch.randn(32, generator=g).to(device)
    lut_triton = custom_ops.fast_select_blocks(q, k, 0.3, 32, 32, *forced)
    lut_torch = select_blocks(q, k, 0.3, 32, 32, forced)
    assert torch.equal(lut_triton, lut_torch)
    assert lut_torch.shape[-1] == 2 + int(0.3 * 5)
    assert all(((lut_triton == j).any(-1)).all() for j in range(*forced))
    kw = dict(topk=0.3, blkq=32, blkk=32, feature_map="softmax", linear_scope="rest", scale=32**-0.5)
    out = sla_triton(q, k, v, w, b, forced_blocks=forced, **kw)
    ref = sla_reference(*(x.double() for x in (q, k, v, w, b)), forced_blocks=forced, **kw)
    assert rel_err(out, ref) < tol
