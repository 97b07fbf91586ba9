# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The Hopper backward kernels (`ops/kernels/gluon_bwd.py`: dK/dV and dQ) and how `kernel_choice` chooses them.

Gluon does not run under the Triton interpreter, so on a CPU machine only the choice is tested (which launches the
kernels can take, the error of a forced choice); on a Hopper GPU the whole backward runs with them against the
portable `triton_bwd.attn_bwd`.
"""

from __future__ import annotations

import re

import pytest
import torch

from testing_utils import HOPPER_CASES, hopper_case_inputs, rel_err, require_hopper, require_triton

pytestmark = require_triton

GOOD = dict(dtype_bytes=2, blkq=128, blkk=64, block_d=128, head_dim=128, dot_precision="tf32")


def test_supports_the_wan_launch_and_names_what_it_cannot_run(monkeypatch):
    from diffusers_sla.ops.kernels import gluon_bwd

    # the launch rules, whatever Triton is installed here (the version gate has its own test)
    monkeypatch.setattr(gluon_bwd, "GLUON_AVAILABLE", True)
    assert gluon_bwd.supports(**GOOD) is None
    assert gluon_bwd.supports(**GOOD | dict(blkq=64, head_dim=64, block_d=64)) is None
    cases = [
        (dict(dtype_bytes=4), "float16 or bfloat16"),
        (dict(dot_precision="ieee"), "ieee"),
        (dict(blkk=128), "blkk must be one of \\[64\\]"),
        (dict(blkq=32), "blkq must be a multiple of 64"),
        (dict(head_dim=100, block_d=128), "multiple of 8"),
    ]
    for change, message in cases:
        reason = gluon_bwd.supports(**GOOD | change)
        assert reason is not None and re.search(message, reason), (change, reason)


def test_backward_kernel_knob_names_its_values_and_refuses_an_impossible_choice(monkeypatch):
    from diffusers_sla.ops import buffers, kernel_choice

    q = torch.randn(1, 1, 256, 128, dtype=torch.bfloat16)  # on the CPU: never the Hopper kernel
    lut = torch.zeros(1, 1, 2, 1, dtype=torch.int32)
    g = buffers.geometry(q, q, lut, 128, 64, "rest")
    monkeypatch.delenv("DIFFUSERS_SLA_BWD_KERNEL", raising=False)
    assert kernel_choice.backward_kernel(q, g, 128, 64, "tf32") == "portable"
    monkeypatch.setenv("DIFFUSERS_SLA_BWD_KERNEL", "fast")
    with pytest.raises(ValueError, match="DIFFUSERS_SLA_BWD_KERNEL='fast': allowed values are"):
        kernel_choice.backward_kernel(q, g, 128, 64, "tf32")
    monkeypatch.setenv("DIFFUSERS_SLA_BWD_KERNEL", "hopper")
    with pytest.raises(ValueError, match="DIFFUSERS_SLA_BWD_KERNEL=hopper cannot run this call: needs a CUDA"):
        kernel_choice.backward_kernel(q, g, 128, 64, "tf32")


@pytest.mark.gpu
@require_hopper
@pytest.mark.parametrize("name", sorted(n for n, case in HOPPER_CASES.items() if case[6] == 64))
def test_hopper_backward_kernel_matches_the_portable_kernel(monkeypatch, name):
    from benchmarks.kernel import poisoned_outputs
    from diffusers_sla.ops import custom_ops

    B, H, Lq, Lk, D, blkq, blkk, topk, fm, scope, dtype, view = HOPPER_CASES[name]
    q, k, v, w, b, do = hopper_case_inputs(name)
    scale = 0.8 * D**-0.5
    lut = custom_ops.select_blocks_fused(q, k, topk, blkq, blkk)
    saved = custom_ops.forward(q, k, v, w, b, lut, scale, fm, scope, blkq, blkk, True, "tf32")
    with poisoned_outputs():  # an element a kernel does not write stays NaN
        grads = {}
        for kernel in ("portable", "hopper"):
            monkeypatch.setenv("DIFFUSERS_SLA_BWD_KERNEL", kernel)
            grads[kernel] = custom_ops.backward(do, q, k, v, w, b, *saved, lut, scale, fm, scope, blkq, blkk, "tf32")
    for what, ours, ref in zip(("dq", "dk", "dv", "d proj_weight", "d proj_bias"), grads["hopper"],
                               grads["portable"]):
        assert ours.shape == ref.shape, what
        assert torch.isfinite(ours).all(), what
        if ref.norm() == 0:  # proj_l's weight gets no gradient without a linear branch (every block selected)
            assert torch.equal(ours, ref), what
        else:
            assert rel_err(ours, ref) <= 1e-2, f"{what}: {rel_err(ours, ref):.2e}"


@pytest.mark.gpu
@require_hopper
@pytest.mark.parametrize("gate_lse", [True, False], ids=["mass", "ratio"])
@pytest.mark.parametrize("name", ["wan_like_rest_bf16_view", "d72_padded_relu_rest"])
def test_hopper_backward_kernel_mixes_like_the_portable_kernel(monkeypatch, name, gate_lse):
    """The backward of a fusion's mix (the sparse kernels read dO_s = w dO): same gradients, d gate included."""
    from benchmarks.kernel import poisoned_outputs
    from diffusers_sla.ops import custom_ops

    B, H, Lq, Lk, D, blkq, blkk, topk, fm, scope, dtype, view = HOPPER_CASES[name]
    q, k, v, w, b, do = hopper_case_inputs(name)
    scale = 0.8 * D**-0.5
    lut = custom_ops.select_blocks_fused(q, k, topk, blkq, blkk)
    gate = torch.randn(B, H, Lq, device="cuda") * 2 - (8.0 if gate_lse else 0.0)
    saved = custom_ops.forward(q, k, v, w, b, lut, scale, fm, scope, blkq, blkk, True, "tf32", gate, gate_lse)
    with poisoned_outputs():
        grads = {}
        for kernel in ("portable", "hopper"):
            monkeypatch.setenv("DIFFUSERS_SLA_BWD_KERNEL", kernel)
            grads[kernel] = custom_ops.backward(do, q, k, v, w, b, *saved, lut, scale, fm, scope, blkq, blkk, "tf32",
                                                gate, gate_lse)
    for what, ours, ref in zip(("dq", "dk", "dv", "d proj_weight", "d proj_bias", "d gate"), grads["hopper"],
                               grads["portable"]):
        assert ours.shape == ref.shape and torch.isfinite(ours).all(), what
        assert rel_err(ours, ref) <= 1e-2, f"{what}: {rel_err(ours, ref):.2e}"
