# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""`ops/autograd.py`: what `sla_triton` checks before any kernel runs (the kernels' own tests: `tests/kernels`)."""

from __future__ import annotations

import pytest
import torch

from testing_utils import require_triton

pytestmark = require_triton


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"blkq": 48}, "`blkq` must be one of \\[32, 64, 128\\]"),
        ({"blkk": 256}, "`blkk` must be one of \\[32, 64, 128\\]"),
        ({"feature_map": "hedgehog"}, "`feature_map` must be one of"),
        ({"linear_scope": "sparse"}, "`linear_scope` must be one of \\['rest', 'all', 'none'\\]"),
        ({"topk": 0.0}, "`topk` must be a number in \\(0, 1\\]"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, message):
    from diffusers_sla.ops.autograd import sla_triton

    q = torch.randn(1, 1, 64, 16)
    args = dict(topk=0.5, blkq=32, blkk=32, feature_map="softmax", linear_scope="rest") | kwargs
    with pytest.raises(ValueError, match=message):
        sla_triton(q, q, q, torch.eye(16), torch.zeros(16), **args)


def test_fp32_compute_knob_rejects_unknown_modes():
    from diffusers_sla.ops.autograd import get_fp32_compute, set_fp32_compute

    with pytest.raises(ValueError, match="`mode` must be one of \\['bf16', 'tf32', 'ieee'\\]"):
        set_fp32_compute("fp8")
    assert get_fp32_compute() in ("bf16", "tf32", "ieee")
