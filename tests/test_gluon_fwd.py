# Copyright 2026 The diffusers-sla authors. Licensed under the Apache License, Version 2.0.
"""The Hopper forward kernel (`ops/kernels/gluon_fwd.py`) and how `kernel_choice` chooses it.

Gluon does not run under the Triton interpreter, so on a CPU machine only the choice is tested (which launches the
kernel can take, the error of a forced choice); on a Hopper GPU the kernel runs against the portable one
(`triton_fwd.attn_fwd`), including the side outputs that the backward reads.
"""

from __future__ import annotations

import re

import pytest
import torch

from testing_utils import HOPPER_CASES, hopper_case_inputs, rel_err, require_hopper, require_triton

pytestmark = require_triton

GOOD = dict(dtype_bytes=2, blkq=128, blkk=64, block_d=128, head_dim=128, kept=25, dot_precision="tf32")


def test_supports_the_wan_launch_and_names_what_it_cannot_run(monkeypatch):
    from diffusers_sla.ops.kernels import gluon_fwd

    # the launch rules, whatever Triton is installed here (the version gate has its own test)
    monkeypatch.setattr(gluon_fwd, "GLUON_AVAILABLE", True)
    assert gluon_fwd.supports(**GOOD) is None
    assert gluon_fwd.supports(**GOOD | dict(blkq=128, blkk=128)) is None
    cases = [
        (dict(dtype_bytes=4), "float16 or bfloat16"),
        (dict(dot_precision="ieee"), "ieee"),
        (dict(blkk=32), "blkk must be one of \\[64, 128\\]"),
        (dict(blkq=64, blkk=128), "blkq must be a multiple of 128"),
        (dict(head_dim=100, block_d=128), "multiple of 8"),
        (dict(head_dim=32, block_d=32), "multiple of 8 in 33..128"),
        (dict(kept=0), "at least one key block"),
    ]
    for change, message in cases:
        reason = gluon_fwd.supports(**GOOD | change)
        assert reason is not None and re.search(message, reason), (change, reason)


def test_hopper_kernels_build_wherever_gluon_has_the_names_they_use():
    from diffusers_sla.ops import gluon_compat
    from diffusers_sla.ops.kernels import gluon_bwd, gluon_fwd

    assert gluon_fwd.GLUON_AVAILABLE == gluon_bwd.GLUON_AVAILABLE == gluon_compat.AVAILABLE
    if gluon_compat.TRITON_VERSION in gluon_compat.COMPILE_CHECKED:
        assert gluon_fwd.GLUON_AVAILABLE, gluon_compat.IMPORT_ERROR  # a release they compile on: Gluon must import
    if not gluon_fwd.GLUON_AVAILABLE:
        bwd_launch = {k: v for k, v in GOOD.items() if k != "kept"}
        for reason in (gluon_fwd.supports(**GOOD), gluon_bwd.supports(**bwd_launch)):
            assert re.search(r"Triton \d+\.\d+.*'s Gluon lacks what the Hopper kernels use", reason), reason


def _choose(monkeypatch, value, q):
    from diffusers_sla.ops import buffers, kernel_choice

    if value is None:
        monkeypatch.delenv("DIFFUSERS_SLA_FWD_KERNEL", raising=False)
    else:
        monkeypatch.setenv("DIFFUSERS_SLA_FWD_KERNEL", value)
    lut = torch.zeros(1, 1, 2, 1, dtype=torch.int32, device=q.device)
    g = buffers.geometry(q, q, lut, 128, 64, "rest")
    return kernel_choice.forward_kernel(q, g, 128, 64, "tf32")


def test_forward_kernel_knob_names_its_values_and_refuses_an_impossible_choice(monkeypatch):
    q = torch.randn(1, 1, 256, 128, dtype=torch.bfloat16)  # on the CPU: never the Hopper kernel
    assert _choose(monkeypatch, None, q) == "portable"
    assert _choose(monkeypatch, "portable", q) == "portable"
    with pytest.raises(ValueError, match="DIFFUSERS_SLA_FWD_KERNEL='fast': allowed values are"):
        _choose(monkeypatch, "fast", q)
    with pytest.raises(ValueError, match="DIFFUSERS_SLA_FWD_KERNEL=hopper cannot run this call: needs a CUDA"):
        _choose(monkeypatch, "hopper", q)


@pytest.mark.gpu
@require_hopper
@pytest.mark.parametrize("name", sorted(HOPPER_CASES))
def test_hopper_kernel_matches_the_portable_kernel(monkeypatch, name):
    from benchmarks.kernel import poisoned_outputs
    from diffusers_sla.ops import custom_ops

    B, H, Lq, Lk, D, blkq, blkk, topk, fm, scope, dtype, view = HOPPER_CASES[name]
    q, k, v, w, b, _ = hopper_case_inputs(name)
    lut = custom_ops.select_blocks_fused(q, k, topk, blkq, blkk)
    with poisoned_outputs():  # an element a kernel does not write stays NaN
        outs = {}
        for kernel in ("portable", "hopper"):
            monkeypatch.setenv("DIFFUSERS_SLA_FWD_KERNEL", kernel)
            outs[kernel] = custom_ops.forward(q, k, v, w, b, lut, 0.8 * D**-0.5, fm, scope, blkq, blkk, True, "tf32")
    # o, lse, and the denominator and o_l the backward reads (R_i, z_i and the totals are built before the launch)
    for i, what in enumerate(("o", "lse", "den", "o_l")):
        ours, ref = outs["hopper"][i], outs["portable"][i]
        assert ours.shape == ref.shape, what
        if ref.numel():
            assert torch.isfinite(ours).all(), what
            assert rel_err(ours, ref) <= 1e-2, f"{what}: {rel_err(ours, ref):.2e}"
    assert outs["hopper"][0].stride() == q.stride()  # the output keeps q's memory layout


@pytest.mark.gpu
@require_hopper
def test_host_descriptors_hold_what_the_checked_constructor_holds():
    """`gluon_fwd.descriptor` skips `TensorDescriptor.__post_init__`'s checks (host time): same fields."""
    from diffusers_sla.ops.kernels import gluon_fwd
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    for x, box, bits in ((torch.randn(1, 12, 300, 2, 128, device="cuda").to(torch.bfloat16)[:, :, :, 0]
                          .transpose(1, 2), [1, 1, 64, 128], 16),
                         (torch.randn(128, 128, device="cuda"), [128, 128], 32)):
        ours = gluon_fwd.descriptor(x, box, bits)
        checked = TensorDescriptor(x, list(x.shape), list(x.stride()), box, gluon_fwd.tile_layout(bits, len(box)))
        assert vars(ours) == vars(checked)


@pytest.mark.gpu
@require_hopper
@pytest.mark.parametrize("gate_lse", [True, False], ids=["mass", "ratio"])
@pytest.mark.parametrize("name", ["wan_like_rest_bf16_view", "d72_padded_relu_rest", "every_block_selected"])
def test_hopper_kernel_mixes_like_the_portable_kernel(monkeypatch, name, gate_lse):
    """A fusion's mix in the epilogue (`forward.sla_fwd(gate=...)`): same output and side outputs on both kernels,
    and different from SLA's sum (a kernel that ignored the gate would fail)."""
    from benchmarks.kernel import poisoned_outputs
    from diffusers_sla.ops import custom_ops

    B, H, Lq, Lk, D, blkq, blkk, topk, fm, scope, dtype, view = HOPPER_CASES[name]
    q, k, v, w, b, _ = hopper_case_inputs(name)
    lut = custom_ops.select_blocks_fused(q, k, topk, blkq, blkk)
    gate = torch.randn(B, H, Lq, device="cuda") * 2 - (8.0 if gate_lse else 0.0)
    args = (q, k, v, w, b, lut, 0.8 * D**-0.5, fm, scope, blkq, blkk, True, "tf32")
    with poisoned_outputs():
        outs = {}
        for kernel in ("portable", "hopper"):
            monkeypatch.setenv("DIFFUSERS_SLA_FWD_KERNEL", kernel)
            outs[kernel] = custom_ops.forward(*args, gate, gate_lse)
        summed = custom_ops.forward(*args)[0]
    for i, what in enumerate(("o", "lse", "den", "o_l")):
        ours, ref = outs["hopper"][i], outs["portable"][i]
        assert ours.shape == ref.shape and torch.isfinite(ours).all(), what
        if ref.norm() == 0:  # o_l with every block selected: the empty linear branch, exactly zero on both
            assert torch.equal(ours, ref), what
        elif what != "den" or name != "every_block_selected":  # there den is eps plus rounding residue
            assert rel_err(ours, ref) <= 1e-2, f"{what}: {rel_err(ours, ref):.2e}"
    assert rel_err(outs["portable"][0], summed) > 5e-2
